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
from pathlib import Path

import numpy as np

from competition import data, submit
from competition.files import CompetitionError, cli, save_json
from competition.metrics import accuracy, file_accuracy, log_loss, table_summary
from competition.runs import Member, RunDir, combine, expand_runs, load_members, member_mean, num_classes, \
    ood_logits, oof_labels, test_logits

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


# ---------------------------------------------------------------------------- the ensemble


def shared_oof(members: list[Member], labels_all: np.ndarray, say=print):
    """(rows all members hold out, labels there, each member's OOF logits there, aligned?)."""
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
    oof = [m.oof_logits[np.searchsorted(m.oof_index, common)] for m in members]
    return common, labels_all[common], oof, aligned


def write_csv(members: list[Member], weights, ood: data.OodSet, csv: Path, n_classes: int,
              adapted: bool) -> np.ndarray | None:
    """The submission CSV (argmax of the ensembled OOD logits), validated; returns the accuracy
    table (files x severities) when the OOD folder is a labelled local suite."""
    labels = ood.labels
    preds, table = [], []
    for _, z in ood_logits(members, weights, ood, adapted):
        preds.append(z.argmax(1).astype(np.int64))
        if labels is not None:
            table.append(file_accuracy(z, labels))
    submit.write_submission(csv, np.concatenate(preds), ood.rows)
    submit.check_submission(csv, ood_dir=ood.path, num_classes=n_classes, shape=ood.shape)
    return np.stack(table) if table else None


def sidecar(name: str, csv: Path, ood: data.OodSet, members: list[Member], weights, oof_fit: tuple,
            labels_all: np.ndarray, n_classes: int, method: str, rounds: int, adapted: bool) -> dict:
    """The JSON that says which runs and weights made the CSV, and how each scores."""
    common, labels, oof, aligned = oof_fit
    ens_oof = combine(oof, weights)
    test = test_logits(members, weights)
    member_test = {m.name: accuracy(member_mean([r / RunDir.TEST_LOGITS for r in m.runs]), test[1])
                   for m in members} if test is not None else {}
    return {
        "name": name, "csv": str(csv), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ood_dir": str(ood.path), "ood_logits": RunDir.ood_subdir(ood, adapted), "method": method,
        "rounds": rounds if method == "caruana" else None, "num_classes": n_classes,
        "tta": sorted({r.manifest().get(RunDir.OOF_TTA, {}).get("tta", "?") for m in members for r in m.runs}),
        "runs": [str(r) for m in members for r in m.runs],
        "weights": {m.name: round(float(w), 6) for m, w in zip(members, weights)},
        "members": [{"name": m.name, "runs": [str(r) for r in m.runs], "weight": round(float(w), 6),
                     "oof_rows": int(len(m.oof_index)),
                     "oof_accuracy": accuracy(m.oof_logits, labels_all[m.oof_index]),
                     "oof_accuracy_common": accuracy(z, labels), "oof_logloss_common": log_loss(z, labels),
                     "test_accuracy": member_test.get(m.name)} for m, w, z in zip(members, weights, oof)],
        "oof": {"rows": int(len(common)), "aligned": aligned, "accuracy": accuracy(ens_oof, labels),
                "logloss": log_loss(ens_oof, labels), "best_member_accuracy": max(accuracy(z, labels) for z in oof)},
        "test_accuracy": accuracy(*test) if test is not None else None,
    }


def report(info: dict, say=print) -> None:
    fitted = f"fitted on {info['oof']['rows']} OOF rows" if info["method"] == "caruana" else "equal weights"
    say(f"members ({fitted}):")
    for m in info["members"]:
        say(f"  {m['name']:<28} weight {m['weight']:.3f}  OOF acc {m['oof_accuracy_common']:.4f}  "
            f"({len(m['runs'])} run(s))")
    line = f"ensemble OOF acc {info['oof']['accuracy']:.4f} (best member {info['oof']['best_member_accuracy']:.4f})"
    if info["test_accuracy"] is not None:
        line += f", clean test acc {info['test_accuracy']:.4f}"
    if "local_score" in info:
        line += f", local OOD acc {info['local_score']['ood_accuracy']:.4f}"
    say(line)


def build(runs: list, name: str, ood_dir, out_dir="submissions", method: str = "caruana",
          rounds: int = 40, bn_adapt: bool = False, say=print, allow_partial: bool = False) -> Path:
    """Fit the weights, write submissions/<name>.csv and .json, validate the CSV; returns the CSV."""
    t0 = time.time()
    if not re.fullmatch(r"[\w.+-]+", name):
        raise CompetitionError(f"--name {name!r}: use letters, digits and . _ + - (it becomes a file name)")
    if method not in ("caruana", "equal"):
        raise CompetitionError(f"--method must be caruana or equal, not {method!r}")
    members = load_members([r if isinstance(r, RunDir) else RunDir(r) for r in runs])
    datasets = [c.get("dataset") for m in members for c in m.cfgs]
    ood = data.OodSet(ood_dir, data.OodSet.required_shape(ood_dir, datasets, allow_partial))
    labels_all, n_classes = oof_labels(members), num_classes(members)
    oof_fit = shared_oof(members, labels_all, say)
    weights = fit_weights(oof_fit[2], oof_fit[1], rounds) if method == "caruana" else \
        np.full(len(members), 1 / len(members))
    csv = Path(out_dir) / f"{name}.csv"
    table = write_csv(members, weights, ood, csv, n_classes, bn_adapt)
    info = sidecar(name, csv, ood, members, weights, oof_fit, labels_all, n_classes, method, rounds, bn_adapt)
    if table is not None:
        info["local_score"] = table_summary(table)
    save_json(csv.with_suffix(".json"), info)
    report(info, say)
    say(f"wrote {csv} ({sum(ood.rows)} rows, valid) and {csv.with_suffix('.json')} in {time.time() - t0:.1f} s")
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
    p.add_argument("--allow-partial", action="store_true",
                   help="accept fewer OOD files or rows than the competition's 19 x 50,000 (cifar100 runs)")
    args = p.parse_args(argv)
    return build(expand_runs(args.runs), args.name, args.ood_dir, args.out_dir, args.method, args.rounds,
                 args.bn_adapt, allow_partial=args.allow_partial)


if __name__ == "__main__":
    cli(main)()
