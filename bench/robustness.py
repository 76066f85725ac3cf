"""Robust-training recipes side by side: train each variant of a preset on one fold, predict the
local CIFAR-C suite built from that fold's held-out images, and print one table of clean and
corrupted accuracy (plain and with BN adaptation), the mean over the corruption families the
recipe did not train on, and the training time.

    python bench/robustness.py --data PATH/cifar10-jpg-train.tar.gz               # the default variants
    python bench/robustness.py --data PATH --variant base: --variant "nb:noise_blur=0.5 epochs=10"
    python bench/robustness.py --data PATH --suite-n 500 --variant base:   # the same runs on a quicker, noisier suite

A variant is NAME:KEY=VALUE KEY=VALUE ... (overrides on the preset). Runs land in
models/bench-robustness/<name>/ and are reused when their config is unchanged (train.py's
rule), so the table can be rebuilt without retraining; `--retrain` forces them. Times are the
training loop of each run as it was trained: run the variants in one sitting on an otherwise
idle machine for a fair comparison (the table says when each was trained).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from competition import corruptions, folds, predict, score, train
from competition.config import resolve
from competition.runs import RunDir

DEFAULT_VARIANTS = [
    "base:",
    "noise_blur:noise_blur=0.5",
    "augmix:augmix=true",
    "augmix_jsd:augmix=true jsd=12",
    "corrupt:cpu_aug=corrupt workers=0",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name, shlex.split(rest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz"))
    p.add_argument("--preset", default="part1_cpu")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--variant", action="append", help="NAME:KEY=VALUE ... (repeatable; default: the five recipes)")
    p.add_argument("--suite-n", type=int, default=2000, help="held-out images of the suite, the same ones under every "
                   "corruption and severity (as in CIFAR-C), so every figure carries their sampling noise: +-1.6 "
                   "points (one s.e., measured at 78%%) with 500, +-0.8 with 2,000")
    p.add_argument("--suite-seed", type=int, default=0)
    p.add_argument("--tta", default="shift1")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--out", default=str(ROOT / "models" / "bench-robustness"))
    args = p.parse_args(argv)

    out = Path(args.out)
    suite = out / f"suite-f{args.fold}-n{args.suite_n}-s{args.suite_seed}"
    base = ["dataset=imagefolder", f"data={args.data}", f"models_dir={out}"]
    cfg0 = resolve(None, [args.preset], base, fold=args.fold)
    folds.main(["--dataset", "imagefolder", "--data", args.data, "--data-dir", cfg0["data_dir"],  # train's default split
                "--folds-dir", cfg0["folds_dir"]])
    score.build_suite(suite, "imagefolder", args.data, cfg0["data_dir"], cfg0["folds_dir"], args.suite_n,
                      args.suite_seed)
    rows = []
    for name, overrides in map(parse_variant, args.variant or DEFAULT_VARIANTS):
        cfg = resolve(None, [args.preset], base + overrides, fold=args.fold, name=name)
        run = RunDir(train.train(cfg, force=args.retrain))
        predict.predict_run(run, [suite], predict.tta.parse_tta(args.tta), bn_adapt=True, test=False)
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
    print(f"\n{args.preset} variants, fold {args.fold} held out; suite {suite.name} ({args.suite_n} images x 19 x 5); "
          f"TTA {args.tta}\n")
    print("| variant | overrides | clean | clean TTA | OOD | OOD +BN | unseen OOD | unseen OOD +BN | families seen "
          "| train loop s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | `{r['overrides']}` | {fmt(r['clean'])} | {fmt(r['clean_tta'])} | {fmt(r['ood'])} | "
              f"{fmt(r['ood_bn'])} | {fmt(r['unseen'])} | {fmt(r['unseen_bn'])} | {r['seen']}/19 | {r['train_s']} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
