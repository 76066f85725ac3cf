"""Transductive adaptation per slice (competition/adapt.py: TENT over several passes, SHOT-IM,
EATA; BN affine, + head, or all parameters learning; ROID weight ensembling), measured under the
honest protocol on the repeats of bench/test_time.py.

    # 1. choose the settings on the pool (fold 1's images under the 19 x 5 corruptions; the
    #    unlabelled files' stand-in, never the measure), seed 0's model of one repeat:
    python bench/adaptation_methods.py tune models/honest-fs1 --grid tent:1:1e-3 tent:3:1e-3 shot:3:1e-3 eata:3:1e-3 \\
        tent:5:1e-2:all tent:5:1e-2:norm+head:0.99
    # 2. measure the chosen settings on each repeat's measure reserve, every member:
    python bench/adaptation_methods.py measure models/honest-fs0 models/honest-fs1 models/honest-fs2 \\
        --methods tent,shot,eata --steps 3 --lr 1e-3 --params bn --ensemble 0.99

A grid setting is METHOD:STEPS:LR[:PARAMS[:ALPHA]] (predict's --learn-params and --learn-ensemble;
defaults bn and off); --params / --ensemble give measure's. The guards (predict's --collapse-tol,
--max-disagree) stay at predict's defaults unless --collapse-tol / --max-disagree are given here;
their fallbacks are in the log.

Each repeat folder is what `bench/test_time.py --out DIR` made: DIR/models/base, base-s1, ... (the
members, trained with fold 0 held out, fold 1 excluded), DIR/measure-n<N> (the measure suite) and
DIR/pool-f1-n<N> (the pool). Predictions go through `python -m competition.predict` (one view
unless --tta), so they land in each run's pred/<setting>/ as the pipeline's do; accuracies are read here
from those logits and the suites' labels, per slice (corruption x severity). The ensemble is
the members' logits averaged with equal weights: with three near-equal seeds, Caruana weights fitted
on the choose images stay near equal (bench/NOTES.md, "An honest local score").

Printed, and written to DIR/adaptation-<mode>.json: per setting, accuracy mean and per severity,
the slices where it falls below BN (count, worst), and the wall time of its prediction.
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

from competition import adapt  # noqa: E402
from competition.metrics import file_accuracy  # noqa: E402

TTA = "none"  # --tta: the methods are compared on one view (6-view TTA costs 6x; checked for the best)


def suite(repeat: Path, kind: str, prefer: str | None = None) -> Path:
    """The repeat's first `kind`-* suite with labels, or the one named `prefer` where it has one."""
    found = sorted(repeat.glob(f"{kind}-*"), key=lambda f: f.name != prefer)
    found = [f for f in found if f.is_dir() and (f / "labels.npy").exists()]
    if not found:
        raise SystemExit(f"{repeat}: no {kind}-* suite with labels (made by bench/test_time.py)")
    return found[0]


def members(repeat: Path, only: list[str] | None) -> list[Path]:
    runs = sorted(p for p in (repeat / "models").iterdir() if (p / "summary.json").exists() and "-st" not in p.name)
    return [r for r in runs if not only or r.name in only]


GUARDS: list[str] = []  # predict's guard flags as given here (main); none: predict's defaults


def predict(run: Path, ood: Path, methods: str, steps: int, lr: float, log, params: str = "bn",
            ensemble: float | None = None) -> float:
    """Plain and `methods` (comma list) logits of `run` on `ood`; outputs already current are kept,
    ones made with other settings redone. Returns the wall time."""
    args = [sys.executable, "-m", "competition.predict", str(run), "--ood-dir", str(ood), "--tta", TTA, "--no-test",
            "--no-oof"]
    if methods:
        args += ["--adapt", methods, "--learn-steps", str(steps), "--learn-lr", str(lr), "--learn-params", params,
                 *(["--learn-ensemble", str(ensemble)] if ensemble is not None else []), *GUARDS]
    t0 = time.time()
    print("$", " ".join(args), file=log, flush=True)
    subprocess.run(args, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def logits(run: Path, method: str, ood: Path, params: str = "bn", ensemble: float | None = None) -> np.ndarray:
    """(19, 5 * N, C) float32 logits of `run` under `method` (learned: with `params` and `ensemble`)
    on the suite `ood`, one row per OOD file."""
    name = adapt.variant(method, params, ensemble) if method in adapt.OBJECTIVES else method
    setting = TTA if method == "none" else f"{TTA}+{name}"
    folders = sorted((run / "pred" / setting / "ood").glob(f"{ood.name}-*"), key=lambda f: f.stat().st_mtime)
    if not folders:
        raise SystemExit(f"{run}: no {setting} logits on {ood.name}")
    names = sorted(json.loads((ood / "corruptions.json").read_text())["names"])
    return np.stack([np.load(folders[-1] / n).astype(np.float32) for n in names])


def slice_accuracy(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(19, 5) accuracy per corruption and severity (metrics.file_accuracy of each file)."""
    return np.stack([file_accuracy(f, labels) for f in z])


def summary(acc: np.ndarray, bn: np.ndarray | None) -> dict:
    out = {"mean": round(100 * float(acc.mean()), 2),
           "per_severity": [round(100 * float(a), 2) for a in acc.mean(0)]}
    if bn is not None:
        diff = acc - bn
        out.update(slices_below_bn=int((diff < 0).sum()), worst_vs_bn=round(100 * float(diff.min()), 2),
                   gain_over_bn=round(100 * float(diff.mean()), 2))
    return out


def tune(args, log) -> dict:
    repeat = Path(args.repeats[0])
    ood = suite(repeat, "pool")
    labels = np.load(ood / "labels.npy")
    run = members(repeat, args.members or ["base"])[0]
    results = {"images": f"pool {ood} (choose role: fold 1, never the measure)", "run": str(run), "settings": {}}
    predict(run, ood, "bn", 1, 1e-3, log)  # the reference every setting is compared with, slice by slice
    bn_z = logits(run, "bn", ood)
    bn = slice_accuracy(bn_z, labels)
    results["settings"]["bn"] = summary(bn, None)
    print(f"{'bn':18s} {results['settings']['bn']}", flush=True)
    for spec in args.grid:
        method, steps, lr, params, alpha = grid_setting(spec)
        secs = predict(run, ood, method, steps, lr, log, params, alpha)
        z = logits(run, method, ood, params, alpha)
        acc = slice_accuracy(z, labels)
        results["settings"][spec] = {**summary(acc, bn), "wall_s": round(secs, 1),
                                     **guard_curve(z, bn_z, acc, bn)}
        print(f"{spec:18s} {results['settings'][spec]}", flush=True)
    return results


CURVE = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # max_disagree values the drift guard is tried at


def guard_curve(z: np.ndarray, bn_z: np.ndarray, acc: np.ndarray, bn: np.ndarray) -> dict:
    """What predict's drift guard (adapt.drifted) would give at each max_disagree in CURVE: a slice
    whose labels differ from BN's on more than that share keeps BN's accuracy. Exact for one view
    (the guard compares one-view labels) when the method was predicted with the guard off
    (--max-disagree 1); otherwise the folds it already fell back on count as BN's."""
    per_file = z.shape[1] // acc.shape[1]
    split = lambda a: a.argmax(-1).reshape(a.shape[0], acc.shape[1], per_file)  # (19, 5, N) labels
    disagree = (split(z) != split(bn_z)).mean(-1)
    curve = {f"{t:g}": round(100 * float(np.where(disagree > t, bn, acc).mean()), 2) for t in CURVE}
    return {"disagreement": {"mean": round(float(disagree.mean()), 4), "max": round(float(disagree.max()), 4)},
            "guarded_mean_by_max_disagree": curve}


def grid_setting(spec: str) -> tuple[str, int, float, str, float | None]:
    """METHOD:STEPS:LR[:PARAMS[:ALPHA]] -> (method, steps, lr, params, ensemble alpha or None)."""
    parts = spec.split(":")
    if not 3 <= len(parts) <= 5 or parts[0] not in adapt.OBJECTIVES or parts[3:4] and parts[3] not in adapt.PARAMS:
        raise SystemExit(f"--grid {spec}: METHOD:STEPS:LR[:PARAMS[:ALPHA]], METHOD one of "
                         f"{', '.join(adapt.OBJECTIVES)}, PARAMS one of {', '.join(adapt.PARAMS)}")
    return (parts[0], int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else "bn",
            float(parts[4]) if len(parts) > 4 else None)


def measure(args, log) -> dict:
    methods = ["none", "bn"] + [m for m in args.methods.split(",") if m]
    out = {"settings": {"steps": args.steps, "lr": args.lr, "params": args.params, "ensemble": args.ensemble,
                        "guards": GUARDS or "predict's defaults", "tta": TTA}, "repeats": {}}
    for repeat in map(Path, args.repeats):
        ood = suite(repeat, "measure", args.measure_suite)
        labels = np.load(ood / "labels.npy")
        runs = members(repeat, args.members)
        rec = {"images": f"measure {ood} (no member trained on them, no choice saw them)",
               "members": [r.name for r in runs], "single": {}, "ensemble": {}, "wall_s": {}}
        # One predict per member: plain, BN and every method (the wall time is all of them together;
        # bench/adaptation_cost.py has the cost per method at the real size).
        secs = [predict(r, ood, ",".join(methods[1:]), args.steps, args.lr, log, args.params, args.ensemble)
                for r in runs]
        rec["wall_s"] = {"all settings, per member": round(float(np.mean(secs)), 1)}
        per = {m: [logits(r, m, ood, args.params, args.ensemble) for r in runs] for m in methods}
        bn_single = slice_accuracy(per["bn"][0], labels)
        bn_ens = slice_accuracy(np.mean(per["bn"], 0), labels)
        for m in methods:
            rec["single"][m] = summary(slice_accuracy(per[m][0], labels), None if m == "bn" else bn_single)
            if len(runs) > 1:
                rec["ensemble"][m] = summary(slice_accuracy(np.mean(per[m], 0), labels), None if m == "bn" else bn_ens)
            print(f"{repeat.name} {m:6s} one model {rec['single'][m]}  ensemble {rec['ensemble'].get(m)}", flush=True)
        out["repeats"][repeat.name] = rec
    return out


def main(argv=None):
    global TTA, GUARDS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("tune", "measure"))
    p.add_argument("repeats", nargs="+", type=lambda s: str(Path(s).resolve()),
                   help="bench/test_time.py output folders")
    p.add_argument("--grid", nargs="*", default=["tent:1:1e-3", "tent:3:1e-3", "shot:3:1e-3", "eata:3:1e-3"],
                   help="tune: METHOD:STEPS:LR[:PARAMS[:ALPHA]] settings")
    p.add_argument("--methods", default="tent,shot,eata")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--params", default="bn", choices=adapt.PARAMS, help="measure: predict --learn-params")
    p.add_argument("--ensemble", type=float, default=None, metavar="ALPHA", help="measure: predict --learn-ensemble")
    p.add_argument("--collapse-tol", help="predict --collapse-tol (default: predict's)")
    p.add_argument("--max-disagree", help="predict --max-disagree (default: predict's)")
    p.add_argument("--members", nargs="*", help="run names to use (default: every finished member)")
    p.add_argument("--measure-suite", help="measure: the suite folder's name in each repeat where it has one (e.g. "
                   "measure-n500, a smaller measure of the same reserve; default: the first measure-*)")
    p.add_argument("--tta", default="none", help="predict's TTA (default none: one view)")
    args = p.parse_args(argv)
    TTA = args.tta
    GUARDS = [a for flag, v in (("--collapse-tol", args.collapse_tol), ("--max-disagree", args.max_disagree))
              if v is not None for a in (flag, v)]
    for spec in args.grid:
        grid_setting(spec)  # a malformed setting before any prediction
    first = Path(args.repeats[0])
    tag = f"{args.mode}-{TTA}"
    with open(first / f"adaptation-{tag}.log", "a") as log:
        result = tune(args, log) if args.mode == "tune" else measure(args, log)
    out = first / f"adaptation-{tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
