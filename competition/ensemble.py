"""Stage 4: weighted logit average of trained runs -> submissions/<name>.csv + <name>.json.

    python -m competition.ensemble models/part1-demo-f0-s0 models/part2-demo-f0-s0 --name demo \\
        --ood-dir data/ood-local/digits
    python -m competition.ensemble 'models/part3-f*-s0' 'models/part2-f*-s0' --name p23 --ood-dir data/ood-test
    python -m competition.ensemble 'models/part*' --name equal --method equal --ood-dir data/ood-test

Runs that differ only in their fold (`<preset>-f<k>-s<seed>`) form one *member*: its out-of-fold
logits are the union of its runs' held-out folds (rows of the folds CSV), and its test and OOD
logits the mean of its fold models (the usual k-fold bagging). Member weights are fitted on the
out-of-fold logits only (oof_tta_logits.npy: the same TTA as the OOD logits), never on test data.
When the members' out-of-fold rows differ (one preset trained on folds 0-4, another on fold 0),
weights are fitted on the rows all members share, and the run says so.

The JSON sidecar records the runs, members, weights, each member's and the ensemble's OOF
accuracy and log-loss, clean test accuracy when every run has test logits, and the local OOD
scores when --ood-dir is a labelled local suite (python -m competition.score suite). The CSV is
validated with competition.submit.check_submission before the command returns.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from competition import data, folds, predict
from competition.files import CompetitionError, cli, save_json

# ---------------------------------------------------------------------------- metrics on logits


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean()) if len(labels) else float("nan")


def log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    if not len(labels):
        return float("nan")
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


# ---------------------------------------------------------------------------- weights


def fit_weights(logits: list[np.ndarray], labels: np.ndarray, rounds: int = 40) -> np.ndarray:
    """Member weights by greedy ensemble selection with replacement (Caruana et al. 2004).

    Why this rather than minimising log-loss over free weights: it climbs the leaderboard's
    own metric (accuracy), its weights are counts / rounds (non-negative, summing to 1, few
    degrees of freedom, so little room to overfit the OOF rows), and starting from the best
    single member while keeping the best step seen makes the ensemble's OOF accuracy at least
    that member's by construction. Accuracy ties are frequent on a few thousand rows, so
    log-loss breaks them, which also lets a member that sharpens good predictions in.
    """
    if not logits:
        raise CompetitionError("no members to ensemble")
    stack = np.stack([np.asarray(z, np.float32) for z in logits])  # (M, N, C)
    m = len(stack)
    if m == 1:
        return np.ones(1)

    def key(avg):  # larger is better
        return (accuracy(avg, labels), -log_loss(avg, labels))

    singles = [key(z) for z in stack]
    first = max(range(m), key=lambda i: singles[i])
    counts = np.zeros(m)
    counts[first] = 1
    total = stack[first].astype(np.float64)
    best_key, best_counts = singles[first], counts.copy()
    for _ in range(rounds):
        k = counts.sum()
        scores = [key((total + stack[i]) / (k + 1)) for i in range(m)]
        pick = max(range(m), key=lambda i: scores[i])
        total += stack[pick]
        counts[pick] += 1
        if scores[pick] > best_key:
            best_key, best_counts = scores[pick], counts.copy()
    return best_counts / best_counts.sum()


# ---------------------------------------------------------------------------- runs and members


@dataclass
class Member:
    name: str
    runs: list[Path]
    cfgs: list[dict] = field(default_factory=list)
    oof_index: np.ndarray | None = None  # rows of the folds CSV, sorted
    oof_logits: np.ndarray | None = None  # (len(oof_index), C) TTA logits
    weight: float = 0.0


def member_key(run_dir) -> str:
    """The run folder's name without its fold tag: part1-demo-f3-s0 -> part1-demo-s0."""
    return re.sub(r"-f\d+(?=-|$)", "", Path(run_dir).name)


def run_config(run_dir) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CompetitionError(f"{path} is missing: {run_dir} is not a run folder written by competition/train.py")
    return yaml.safe_load(path.read_text()) or {}


def load_members(runs: list[Path]) -> list[Member]:
    """Group runs into members and gather each member's out-of-fold TTA logits."""
    members: dict[str, Member] = {}
    for run in runs:
        members.setdefault(member_key(run), Member(member_key(run), [])).runs.append(Path(run))
    for mem in members.values():
        idx, logits = [], []
        for run in mem.runs:
            cfg = run_config(run)
            mem.cfgs.append(cfg)
            path = run / "oof_tta_logits.npy"
            if not (run / "oof_index.npy").exists():
                raise CompetitionError(f"{run} has no oof_index.npy (trained with fold=-1?): without out-of-fold "
                                       f"logits it cannot be weighted; leave it out of the ensemble")
            if not path.exists():
                raise CompetitionError(f"{path} is missing: run `python -m competition.predict {run}` first "
                                       f"(out-of-fold logits with the same TTA as the OOD logits)")
            i, z = np.load(run / "oof_index.npy"), np.load(path)
            if len(i) != len(z):
                raise CompetitionError(f"{path}: {len(z)} rows but oof_index.npy has {len(i)}; rerun predict --force")
            idx.append(i)
            logits.append(z.astype(np.float32))
        idx_all = np.concatenate(idx)
        if len(np.unique(idx_all)) != len(idx_all):
            raise CompetitionError(f"member {mem.name}: runs {', '.join(r.name for r in mem.runs)} hold out "
                                   f"overlapping rows (the same fold twice?); name the runs to combine explicitly")
        order = np.argsort(idx_all)
        mem.oof_index, mem.oof_logits = idx_all[order], np.concatenate(logits)[order]
    return list(members.values())


def oof_labels(members: list[Member]) -> np.ndarray:
    """Labels of the folds CSV every run was trained with (they must all share it)."""
    paths = {folds.folds_path(folds.dataset_name(c["dataset"], c.get("data")), c["folds_dir"])
             for m in members for c in m.cfgs}
    if len(paths) != 1:
        raise CompetitionError(f"the runs were trained on different folds files ({', '.join(map(str, paths))}): "
                               f"an ensemble needs one dataset and one split")
    return folds.read_folds(paths.pop())["label"].to_numpy()


def num_classes(members: list[Member]) -> int:
    ks = {int(c["num_classes"]) for m in members for c in m.cfgs}
    if len(ks) != 1:
        raise CompetitionError(f"the runs predict different numbers of classes {sorted(ks)}")
    return ks.pop()


def member_mean(paths: list[Path]) -> np.ndarray:
    """Mean over a member's fold models of one logits file each (float32)."""
    total = None
    for p in paths:
        z = np.load(p).astype(np.float32)
        if total is not None and z.shape != total.shape:
            raise CompetitionError(f"{p}: shape {z.shape} differs from {paths[0]}'s {total.shape}; rerun predict")
        total = z if total is None else total + z
    return total / len(paths)


def combine(member_logits: list[np.ndarray], weights) -> np.ndarray:
    return sum(float(w) * z for w, z in zip(weights, member_logits) if w > 0)


def test_logits(members: list[Member], weights) -> tuple[np.ndarray, np.ndarray] | None:
    """Ensembled clean-test logits and labels, when every run has them."""
    paths = [[r / "test_logits.npy" for r in m.runs] for m in members]
    if not all(p.exists() for ps in paths for p in ps):
        return None
    labels = np.load(members[0].runs[0] / "test_labels.npy")
    return combine([member_mean(ps) for ps in paths], weights), labels


def ood_logits(members: list[Member], weights, ood_dir, bn_adapt: bool = False):
    """Yield (OOD file, ensembled logits float32 (rows, C)) file by file: never all in memory."""
    per_run = {r: predict.ood_logits_paths(r, ood_dir, bn_adapt) for m in members for r in m.runs}
    for k, src in enumerate(data.ood_files(ood_dir, expected=None)):
        rows = data.open_ood(src, image_shape=None).shape[0]
        zs = []
        for m in members:
            z = member_mean([per_run[r][k] for r in m.runs])
            if len(z) != rows:
                raise CompetitionError(f"{per_run[m.runs[0]][k]} has {len(z)} rows but {src} has {rows}; "
                                       f"rerun predict with --force")
            zs.append(z)
        yield src, combine(zs, weights)


def members_from_json(path) -> tuple[list[Member], np.ndarray, dict]:
    """The members and weights a submission's JSON sidecar recorded (for competition.score)."""
    import json

    path = Path(path)
    try:
        spec = json.loads(path.read_text())
        members = [Member(m["name"], [Path(r) for r in m["runs"]], [run_config(r) for r in m["runs"]])
                   for m in spec["members"]]
        weights = np.asarray([m["weight"] for m in spec["members"]], float)
    except FileNotFoundError:
        raise CompetitionError(f"{path} does not exist: make it with python -m competition.ensemble") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CompetitionError(f"{path} is not an ensemble JSON written by competition.ensemble ({e})") from None
    return members, weights, spec


# ---------------------------------------------------------------------------- the ensemble


def build(runs: list[Path], name: str, ood_dir, out_dir="submissions", method: str = "caruana",
          rounds: int = 40, bn_adapt: bool = False, say=print) -> Path:
    """Fit the weights, write submissions/<name>.csv and .json, validate the CSV; returns the CSV."""
    from competition import score, submit

    t0 = time.time()
    if not re.fullmatch(r"[\w.+-]+", name):
        raise CompetitionError(f"--name {name!r}: use letters, digits and . _ + - (it becomes a file name)")
    members = load_members(runs)
    labels_all = oof_labels(members)
    n_classes = num_classes(members)
    common = members[0].oof_index
    for m in members[1:]:
        common = np.intersect1d(common, m.oof_index)
    if not len(common):
        raise CompetitionError("the members share no out-of-fold rows (trained on disjoint folds?): weights cannot "
                               "be fitted; train every member on at least one common fold")
    aligned = all(len(m.oof_index) == len(common) for m in members)
    if not aligned:
        say(f"note: members' out-of-fold rows differ ({', '.join(f'{m.name} {len(m.oof_index)}' for m in members)}); "
            f"weights are fitted on the {len(common)} rows all of them hold")
    labels = labels_all[common]
    oof = [m.oof_logits[np.searchsorted(m.oof_index, common)] for m in members]

    if method == "caruana":
        weights = fit_weights(oof, labels, rounds)
    elif method == "equal":
        weights = np.full(len(members), 1 / len(members))
    else:
        raise CompetitionError(f"--method must be caruana or equal, not {method!r}")
    for m, w in zip(members, weights):
        m.weight = float(w)
    ens_oof = combine(oof, weights)

    # ---- clean test (reported only: never used for the weights)
    test = test_logits(members, weights)
    member_test = {}
    if test is not None:
        for m in members:
            member_test[m.name] = accuracy(member_mean([r / "test_logits.npy" for r in m.runs]), test[1])

    # ---- OOD: labels for the CSV, and local scores when the folder is a labelled suite
    suite_labels = score.suite_labels(ood_dir)
    preds, rows, per_file = [], [], []
    for src, z in ood_logits(members, weights, ood_dir, bn_adapt):
        preds.append(z.argmax(1).astype(np.int64))
        rows.append(len(z))
        if suite_labels is not None:
            per_file.append(score.file_accuracy(z, suite_labels))
    csv = Path(out_dir) / f"{name}.csv"
    submit.write_submission(csv, np.concatenate(preds), rows)
    submit.check_submission(csv, ood_dir=ood_dir, num_classes=n_classes)

    info = {
        "name": name, "csv": str(csv), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ood_dir": str(ood_dir), "ood_logits": predict.ood_subdir(ood_dir, bn_adapt), "method": method,
        "rounds": rounds if method == "caruana" else None, "num_classes": n_classes,
        "tta": sorted({predict.read_manifest(r).get("oof_tta_logits.npy", {}).get("tta", "?")
                       for m in members for r in m.runs}),
        "runs": [str(r) for m in members for r in m.runs],
        "weights": {m.name: round(m.weight, 6) for m in members},
        "members": [{"name": m.name, "runs": [str(r) for r in m.runs], "weight": round(m.weight, 6),
                     "oof_rows": int(len(m.oof_index)),
                     "oof_accuracy": accuracy(m.oof_logits, labels_all[m.oof_index]),
                     "oof_accuracy_common": accuracy(z, labels), "oof_logloss_common": log_loss(z, labels),
                     "test_accuracy": member_test.get(m.name)} for m, z in zip(members, oof)],
        "oof": {"rows": int(len(common)), "aligned": aligned, "accuracy": accuracy(ens_oof, labels),
                "logloss": log_loss(ens_oof, labels),
                "best_member_accuracy": max(accuracy(z, labels) for z in oof)},
        "test_accuracy": accuracy(*test) if test is not None else None,
    }
    if per_file:
        info["local_score"] = score.summary(np.stack(per_file))
    save_json(Path(out_dir) / f"{name}.json", info)

    say(f"members ({'fitted on ' + str(len(common)) + ' OOF rows' if method == 'caruana' else 'equal weights'}):")
    for m in info["members"]:
        say(f"  {m['name']:<28} weight {m['weight']:.3f}  OOF acc {m['oof_accuracy_common']:.4f}  "
            f"({len(m['runs'])} run(s))")
    line = f"ensemble OOF acc {info['oof']['accuracy']:.4f} (best member {info['oof']['best_member_accuracy']:.4f})"
    if info["test_accuracy"] is not None:
        line += f", clean test acc {info['test_accuracy']:.4f}"
    if "local_score" in info:
        line += f", local OOD acc {info['local_score']['ood_accuracy']:.4f}"
    say(line)
    say(f"wrote {csv} ({sum(rows)} rows, valid) and {csv.with_suffix('.json')} in {time.time() - t0:.1f} s")
    return csv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or quoted glob patterns (runs differing only in fold "
                                           "form one member)")
    p.add_argument("--name", required=True, help="submission name: submissions/NAME.csv and NAME.json")
    p.add_argument("--ood-dir", default="data/ood-test", help="the distortionNN.npy files the CSV is for")
    p.add_argument("--bn-adapt", action="store_true", help="use the BN-adapted OOD logits (predict --bn-adapt)")
    p.add_argument("--method", default="caruana", choices=("caruana", "equal"))
    p.add_argument("--rounds", type=int, default=40, help="greedy selection rounds (weights are multiples of 1/k)")
    p.add_argument("--out-dir", default="submissions")
    args = p.parse_args(argv)
    runs = predict.expand_runs(args.runs)
    return build(runs, args.name, args.ood_dir, args.out_dir, args.method, args.rounds, args.bn_adapt)


if __name__ == "__main__":
    cli(main)()
