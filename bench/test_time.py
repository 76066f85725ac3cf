"""Learning from the unlabelled OOD images, measured on the CIFAR-10 stand-in: no adaptation, BN
adaptation, TENT, and pseudo-label self-training (1 and 2 rounds), each with its clean held-out
accuracy, its local-suite OOD accuracy and the wall time of each step.

    python bench/test_time.py --data PATH/cifar10-jpg-train.tar.gz
    python bench/test_time.py --data PATH --rounds 1 --measure-n 500    # quicker, noisier
    python bench/test_time.py --data PATH --seeds 3      # an ensemble of 3 seeds instead of one model
    python bench/test_time.py --data PATH --k 5          # folds of 9,600: members train on 28,800
    python bench/test_time.py --data PATH --folds-seed 1 --out models/bench-test-time-fs1   # other images throughout

Three roles, disjoint (README, "An honest local score"): the bench's folds file reserves
--measure-n images (fold -1, stratified) as the *measure*: no member trains on them, no choice
sees them, and the measuring suite is built from them. Fold 0 is held out by every member: its
clean and corrupted copies (ood_check, oof_ood) are the *choose* images (best epoch, ensemble
weights, --adapt auto). Fold 1 is excluded from training (exclude_folds=[1]) and its images,
corrupted by the suite generator, play the competition's 19 OOD files (the unlabelled
pseudo-label pool). The other folds *train*. The pseudo-labels never see a label, and the
measure's images are never pseudo-labelled.
The table's last accuracy column is the ensembles' accuracy on the pool itself, read from their
CSVs: after self-training it is transductive (the members trained on pseudo-labels of those very
images, never their labels), which is the leaderboard's situation, as the real OOD files are the
ones pseudo-labelled; the measuring suite's column is the figure for images nothing learned from.
With k=10 folds of the 50,000-image stand-in less a 2,000-image measure reserve, members train
on 38,400 images (a k=5 member of the competition trains on 40,000 of CIFAR-100's 50,000 less
its reserve); the pool holds 4,800 images, the choose fold 4,800.
Every step is a pipeline command (train, score suite, predict, ensemble, selftrain, score).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # as the other bench scripts: runs from a checkout without the package installed

from bench import protocol  # noqa: E402
from competition import submit  # noqa: E402


def sh(args: list[str], log) -> float:
    t0 = time.time()
    print("$", " ".join(args), file=log, flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def _suite_score(info: dict, measure: Path) -> dict:
    """A submission JSON's score on the measuring suite (score.py adds it next to the pool's)."""
    for key in ("local_score_adapted", "local_score"):
        if Path(info.get(key, {}).get("ood_dir", "")).name == measure.name:
            return info[key]
    raise SystemExit(f"{info['name']}: no score on {measure} in its JSON")


def _csv_accuracy(csv: Path, pool: Path) -> float:
    """A submission CSV's accuracy on the labelled pool it predicts, from its ids (distortionNN_s_i:
    row i of severity s) and the pool's labels.npy: from the CSV, not score.py's logits, as a check."""
    sub, labels = submit.read_csv(csv), np.load(pool / "labels.npy")
    row = sub["id"].str.extract(submit.ID_PATTERN)[2].astype(int).to_numpy()
    return float((sub["label"].astype(int).to_numpy() == labels[row]).mean())


def train_members(args, proto: protocol.Protocol, log) -> tuple[list[Path], float]:
    """Seed 0's member (`base`) and seeds 1..K-1 (`base-sK`) on the protocol's folds, fold 0 held out."""
    runs = [proto.models_dir / "base"] + [proto.models_dir / f"base-s{k}" for k in range(1, args.seeds)]
    secs = sum(sh(["-m", "competition.train", "--preset", args.preset, "--fold", "0", *proto.member(),
                   f"name={r.name}", f"seed={k}", *args.train_args.split()], log) for k, r in enumerate(runs))
    return runs, secs


def single_rows(args, run: Path, measure: Path, modes, times: dict, log) -> list[tuple]:
    """Seed 0's model alone, one row per adaptation, scored on the measure."""
    for adapt in modes:
        sh(["-m", "competition.score", str(run), "--ood-dir", str(measure), "--tta", args.tta, "--adapt", adapt], log)
    scores = {s["settings"][0]: s for s in (json.loads(p.read_text()) for p in run.rglob("score.json"))
              if Path(s["ood_dir"]).name == measure.name}
    summary = json.loads((run / "summary.json").read_text())
    return [(f"{args.preset}, {'no adaptation' if adapt == 'none' else adapt}", summary["oof_tta_accuracy"],
             scores[args.tta if adapt == "none" else f"{args.tta}+{adapt}"]["ood_accuracy"], None, times[adapt])
            for adapt in modes]


def ensemble_rows(args, runs: list[Path], measure: Path, pool: Path, subs: Path, log) -> list[tuple]:
    """The plain ensemble (with several seeds), the one self-training starts from, then each round."""
    rows = []
    ensembles = [("plain", "none")] if len(runs) > 1 else []  # one model alone has its own rows
    for name, adapt in ensembles + [("st", args.adapt)]:
        t = sh(["-m", "competition.ensemble", *map(str, runs), "--name", name, "--ood-dir", str(pool), "--tta",
                args.tta, "--adapt", adapt, "--out-dir", str(subs), "--overwrite"], log)
        if len(runs) > 1:  # the ensemble scored on the measuring suite (its JSON's own score is the pool's)
            sh(["-m", "competition.score", str(subs / f"{name}.json"), "--ood-dir", str(measure)], log)
            info = json.loads((subs / f"{name}.json").read_text())
            rows.append((f"ensemble of {len(runs)} seeds, {', '.join(m['setting'] for m in info['members'])}",
                         info["oof"]["accuracy"], _suite_score(info, measure)["ood_accuracy"],
                         _csv_accuracy(subs / f"{name}.csv", pool), t))
    for r in range(1, args.rounds + 1):
        source = subs / ("st.json" if r == 1 else f"st-st{r - 1}.json")
        t = sh(["-m", "competition.selftrain", str(source), "--rounds", "1", "--suite", str(measure), "--out-dir",
                str(subs), "--models-dir", str(runs[0].parent), "--force", *args.selftrain_args.split()], log)
        info = json.loads((subs / f"st-st{r}.json").read_text())
        st = info["selftrain"]
        rows.append((f"self-training round {r} ({st['images']} pseudo-labels, "
                     f"{100 * st['pseudo_label_accuracy']:.1f}% right; "
                     f"{', '.join(m['setting'] for m in info['members'])})",
                     info["oof"]["accuracy"], _suite_score(info, measure)["ood_accuracy"],
                     _csv_accuracy(subs / f"st-st{r}.csv", pool), t))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol.add_args(p, out="bench-test-time")
    p.add_argument("--pool-n", type=int, default=500, help="unlabelled pool: images per corruption and severity")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="members trained with seeds 0..K-1 on the same folds; K > 1 "
                                                        "adds the ensemble's rows (no adaptation, then --adapt)")
    p.add_argument("--no-tent", action="store_true", help="skip TENT (its predictions are the slowest step)")
    p.add_argument("--adapt", default="auto", choices=("auto", "bn", "none"),
                   help="the ensemble's adaptation, the one self-training starts from (auto: per member, on its "
                        "corrupted out-of-fold images)")
    p.add_argument("--train-args", default="", help="extra KEY=VALUE overrides for the members, e.g. 'epochs=11'")
    p.add_argument("--selftrain-args", default="", help="extra selftrain flags, e.g. '--lr 0.01 --epochs 1'")
    args = p.parse_args(argv)
    t0 = time.time()
    proto = protocol.prepare(args)
    log = open(proto.out / "log.txt", "a")
    measure, pool = proto.measure, proto.out / f"pool-f1-n{args.pool_n}"
    runs, train_s = train_members(args, proto, log)
    suites_s = time.time() - t0 - train_s + sh(["-m", "competition.score", "suite", "--dataset", "imagefolder",
                                                "--data", args.data, "--folds-dir", str(proto.folds_dir), "--out",
                                                str(pool), "--fold", "1", "--n", str(args.pool_n), "--seed", "1"], log)
    modes = ("none", "bn") if args.no_tent else ("none", "bn", "tent")
    times = {adapt: sum(sh(["-m", "competition.predict", str(r), "--ood-dir", str(measure), "--ood-dir", str(pool),
                            "--tta", args.tta, *(["--adapt", adapt] if adapt != "none" else []), "--no-test"], log)
                        for r in runs) for adapt in modes}
    rows = single_rows(args, runs[0], measure, modes, times, log) + \
        ensemble_rows(args, runs, measure, pool, proto.out / "subs", log)
    print(f"\n{args.preset} ({len(runs)} seed(s)) trained on folds 2-{args.k - 1} of {args.k} (fold 1 excluded: "
          f"the unlabelled pool), fold 0 held out (choose: best epoch, weights, adaptation); measure: {measure.name}, "
          f"the folds' measure reserve (no member trained on it, no choice saw it); TTA {args.tta}; the first rows\n"
          f"are seed 0's model, their times every member's; an ensemble's clean figure is its own (its members' TTA "
          f"logits)\n")
    print("| method | clean held-out (TTA) | local-suite OOD | pool OOD (transductive after self-training) "
          "| wall s of the step |\n|---|---:|---:|---:|---:|")
    for name, clean, ood, on_pool, secs in rows:
        cell = "" if on_pool is None else f"{100 * on_pool:.2f}"
        print(f"| {name} | {100 * clean:.2f} | {100 * ood:.2f} | {cell} | {secs:.0f} |")
    print(f"\n(training {train_s:.0f} s, suites {suites_s:.0f} s)")


if __name__ == "__main__":
    main()
