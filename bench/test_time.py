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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz"))
    p.add_argument("--preset", default="part1_cpu")
    p.add_argument("--measure-n", type=int, default=2000, help="the measure reserve, and its suite: images no member "
                   "trains on and no choice sees, the same ones under "
                   "every corruption and severity (as in CIFAR-C): the figure carries their sampling noise, +-1.6 "
                   "points (one s.e., measured at 78%%) with 500, +-0.8 with 2,000")
    p.add_argument("--pool-n", type=int, default=500, help="unlabelled pool: images per corruption and severity")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="members trained with seeds 0..K-1 on the same folds; K > 1 "
                                                        "adds the ensemble's rows (no adaptation, then --adapt)")
    p.add_argument("--k", type=int, default=10, help="folds of the bench's own split besides the measure reserve "
                   "(fold 0: the choose images, 1: the pool)")
    p.add_argument("--folds-seed", type=int, default=0, help="seed of that split: another seed draws other images "
                   "for members, pool and measure (an independent repeat of the whole table)")
    p.add_argument("--tta", default="shift1")
    p.add_argument("--no-tent", action="store_true", help="skip TENT (its predictions are the slowest step)")
    p.add_argument("--adapt", default="auto", choices=("auto", "bn", "none"),
                   help="the ensemble's adaptation, the one self-training starts from (auto: per member, on its "
                        "corrupted out-of-fold images)")
    p.add_argument("--train-args", default="", help="extra KEY=VALUE overrides for the members, e.g. 'epochs=11'")
    p.add_argument("--selftrain-args", default="", help="extra selftrain flags, e.g. '--lr 0.01 --epochs 1'")
    p.add_argument("--out", default=str(ROOT / "models" / "bench-test-time"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a")
    data = ["--dataset", "imagefolder", "--data", args.data]
    fdir = out / "folds"
    sh(["-m", "competition.folds", *data, "--k", str(args.k), "--seed", str(args.folds_seed), "--folds-dir", str(fdir),
        "--measure-n", str(args.measure_n)], log)
    data += ["--folds-dir", str(fdir)]
    measure, pool = out / f"measure-n{args.measure_n}", out / f"pool-f1-n{args.pool_n}"
    run = out / "models" / "base"
    seeds = [run] + [out / "models" / f"base-s{k}" for k in range(1, args.seeds)]
    times = {}
    times["train"] = sum(sh(["-m", "competition.train", "--preset", args.preset, "--fold", "0", "dataset=imagefolder",
                             f"data={args.data}", "exclude_folds=[1]", f"folds_dir={fdir}",
                             f"models_dir={out / 'models'}",
                             f"name={r.name}", f"seed={k}", *args.train_args.split()], log)
                         for k, r in enumerate(seeds))
    suite = ["-m", "competition.score", "suite", *data, "--out"]
    times["suites"] = (sh([*suite, str(measure), "--n", str(args.measure_n)], log)  # the whole measure reserve
                       + sh([*suite, str(pool), "--fold", "1", "--n", str(args.pool_n), "--seed", "1"], log))
    modes = ("none", "bn") if args.no_tent else ("none", "bn", "tent")
    for adapt in modes:
        how = ["--adapt", adapt] if adapt != "none" else []
        times[adapt] = sum(sh(["-m", "competition.predict", str(r), "--ood-dir", str(measure), "--ood-dir",
                               str(pool), "--tta", args.tta, *how, "--no-test"], log) for r in seeds)
    rows = []
    for adapt in modes:
        sh(["-m", "competition.score", str(run), "--ood-dir", str(measure), "--tta", args.tta, "--adapt", adapt], log)
    scores = {s["settings"][0]: s for s in (json.loads(p.read_text()) for p in run.rglob("score.json"))
              if Path(s["ood_dir"]).name == measure.name}
    summary = json.loads((run / "summary.json").read_text())
    for adapt in modes:
        s, t = scores[args.tta if adapt == "none" else f"{args.tta}+{adapt}"], times[adapt]
        rows.append((f"part1_cpu, {'no adaptation' if adapt == 'none' else adapt}", summary["oof_tta_accuracy"],
                     s["ood_accuracy"], None, t))
    subs = out / "subs"
    ensembles = [("plain", "none")] if len(seeds) > 1 else []  # one model alone has its own rows above
    for name, adapt in ensembles + [("st", args.adapt)]:
        t = sh(["-m", "competition.ensemble", *map(str, seeds), "--name", name, "--ood-dir", str(pool), "--tta",
                args.tta, "--adapt", adapt, "--out-dir", str(subs), "--overwrite"], log)
        if len(seeds) > 1:  # the ensemble scored on the measuring suite (its JSON's own score is the pool's)
            sh(["-m", "competition.score", str(subs / f"{name}.json"), "--ood-dir", str(measure)], log)
            info = json.loads((subs / f"{name}.json").read_text())
            rows.append((f"ensemble of {len(seeds)} seeds, {', '.join(m['setting'] for m in info['members'])}",
                         info["oof"]["accuracy"], _suite_score(info, measure)["ood_accuracy"],
                         _csv_accuracy(subs / f"{name}.csv", pool), t))
    for r in range(1, args.rounds + 1):
        source = subs / ("st.json" if r == 1 else f"st-st{r - 1}.json")
        t = sh(["-m", "competition.selftrain", str(source), "--rounds", "1", "--suite", str(measure), "--out-dir",
                str(subs), "--force", *args.selftrain_args.split()], log)
        info = json.loads((subs / f"st-st{r}.json").read_text())
        st = info["selftrain"]
        rows.append((f"self-training round {r} ({st['images']} pseudo-labels, "
                     f"{100 * st['pseudo_label_accuracy']:.1f}% right; "
                     f"{', '.join(m['setting'] for m in info['members'])})",
                     info["oof"]["accuracy"], _suite_score(info, measure)["ood_accuracy"],
                     _csv_accuracy(subs / f"st-st{r}.csv", pool), t))
    print(f"\n{args.preset} ({len(seeds)} seed(s)) trained on folds 2-{args.k - 1} of {args.k} (fold 1 excluded: "
          f"the unlabelled pool), fold 0 held out (choose: best epoch, weights, adaptation); measure: {measure.name}, "
          f"the folds' measure reserve (no member trained on it, no choice saw it); TTA {args.tta}; the first rows\n"
          f"are seed 0's model, their times every member's; an ensemble's clean figure is its own (its members' TTA "
          f"logits)\n")
    print("| method | clean held-out (TTA) | local-suite OOD | pool OOD (transductive after self-training) "
          "| wall s of the step |\n|---|---:|---:|---:|---:|")
    for name, clean, ood, on_pool, secs in rows:
        cell = "" if on_pool is None else f"{100 * on_pool:.2f}"
        print(f"| {name} | {100 * clean:.2f} | {100 * ood:.2f} | {cell} | {secs:.0f} |")
    print(f"\n(training {times['train']:.0f} s, suites {times['suites']:.0f} s)")


if __name__ == "__main__":
    main()
