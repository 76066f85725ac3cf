"""Robust-training recipes side by side, under the honest protocol (README, "An honest local
score"): train each variant of a preset with fold 0 held out, predict the *measure* suite (the
folds file's reserve, which no member trains on and no choice sees), and print one table of clean
held-out and corrupted accuracy (plain and with BN adaptation), the mean over the corruption
families the recipe did not train on, and the training time.

    python bench/robustness.py --data PATH/cifar10-jpg-train.tar.gz               # the default variants
    python bench/robustness.py --data PATH --variant base: --variant "nb:noise_blur=0.5 epochs=10"
    python bench/robustness.py --data PATH --folds-seed 1 --measure-n 1000 --out models/honest-fs1   # another repeat

Roles: *train* = folds 2..k-1 (fold 1 is excluded, as in bench/test_time.py, so that a variant
with no overrides is that bench's `base` member and is reused); *choose* = fold 0 (its corrupted
copies pick each run's best epoch under select_on: ood); *measure* = the reserve of --measure-n
images, corrupted 19 x 5. An independent repeat is another --folds-seed (other images in every
role). A variant is NAME:KEY=VALUE KEY=VALUE ... (overrides on the preset). Runs land in
OUT/models/<name>/ and are reused when their config is unchanged (train.py's rule), so the table
can be rebuilt without retraining; `--retrain` forces them. Times are the training loop of each run
as it was trained: run the variants in one sitting on an otherwise idle machine for a fair
comparison.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import protocol  # noqa: E402
from competition import corruptions, predict, score, train  # noqa: E402
from competition.config import resolve  # noqa: E402
from competition.runs import RunDir  # noqa: E402
from competition.specs import PredictSpec  # noqa: E402

DEFAULT_VARIANTS = [  # overrides on part1_cpu, whose own recipe is noise_blur 0.5
    "base:",
    "clean_only:noise_blur=0",
    "augmix:noise_blur=0 augmix=true",
    "augmix_jsd:noise_blur=0 augmix=true jsd=12",
    "corrupt:noise_blur=0 cpu_aug=corrupt workers=0",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, shlex.split(rest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol.add_args(p, out="bench-robustness")
    p.add_argument("--variant", action="append", help="NAME:KEY=VALUE ... (repeatable; default: the five recipes)")
    p.add_argument("--seed", type=int, default=0, help="every variant's training seed")
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args(argv)

    proto = protocol.prepare(args)
    out, suite = proto.out, proto.measure
    rows = []
    for name, overrides in map(parse_variant, args.variant or DEFAULT_VARIANTS):
        cfg = resolve(None, [args.preset], proto.member() + [f"seed={args.seed}"] + overrides, fold=0, name=name)
        run = RunDir(train.train(cfg, force=args.retrain))
        predict.predict_run(run, [suite], PredictSpec(args.tta, adapts=["bn"]), test=False)
        seen = corruptions.trained_on(cfg)
        plain = score.score_target(run.path, suite, args.tta, say=lambda *_: None)
        adapted = score.score_target(run.path, suite, args.tta, adapt="bn", say=lambda *_: None)
        summary = run.summary()
        rows.append({"variant": name, "overrides": " ".join(overrides), "clean": summary.get("oof_accuracy"),
                     "clean_tta": plain["oof_accuracy"], "ood": plain["ood_accuracy"],
                     "ood_bn": adapted["ood_accuracy"], "unseen": plain["unseen_accuracy"],
                     "unseen_bn": adapted["unseen_accuracy"], "seen": len(seen),
                     "train_s": summary.get("training_loop_s"), "trained": summary.get("finished")})
        print(json.dumps(rows[-1]), flush=True)
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    print(f"\n{args.preset} variants (seed {args.seed}); train: folds 2-{args.k - 1} of {args.k} (folds seed "
          f"{args.folds_seed}); choose: fold 0 (best epoch); measure: {suite} ({args.measure_n} reserve images x 19 x "
          f"5, seen by no run and no choice); clean: fold 0 held out; TTA {args.tta}\n")
    print("| variant | overrides | clean | clean TTA | OOD | OOD +BN | unseen OOD | unseen OOD +BN | families seen "
          "| train loop s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | `{r['overrides']}` | {fmt(r['clean'])} | {fmt(r['clean_tta'])} | {fmt(r['ood'])} | "
              f"{fmt(r['ood_bn'])} | {fmt(r['unseen'])} | {fmt(r['unseen_bn'])} | {r['seen']}/19 | {r['train_s']} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
