"""Balanced predictions per OOD file and severity (`ensemble --balance`) against plain argmax, on a
labelled suite that already exists, for each submission JSON given: so the choice can be made on
a choose-role suite (a pool of a fold the runs exclude) from logits already predicted.

    python bench/balance.py SUBMISSION.json [...] --suite models/honest-fs0/pool-f1-n200

A suite drawn at random holds its classes unequally; the competition's files do not. So each slice
is scored on its largest class-balanced subset (the first min-count images of every class, the
same rows in every slice): balancing runs on that subset alone, as it would on a balanced file.
`score suite --balanced` builds a suite that needs no subset (the measure, through the product's
own path: ensemble --balance, score).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from competition import data  # noqa: E402
from competition.files import CompetitionError  # noqa: E402
from competition.runs import balance_classes, members_from_json, ood_logits  # noqa: E402


def balanced_subset(labels: np.ndarray, per_class: int | None = None) -> np.ndarray:
    """Rows of the first `per_class` (default: the smallest class's count) images of every class, sorted."""
    counts = np.bincount(labels)
    k = min(per_class or counts.min(), counts.min())
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(len(counts))]))


def compare(spec_path, suite: data.OodSet, per_class: int | None = None) -> dict:
    """Per slice (file x severity) accuracy, plain and balanced, on the balanced subset."""
    members, weights, _ = members_from_json(spec_path)
    keep = balanced_subset(suite.labels, per_class)
    n, y = len(suite.labels), suite.labels[keep]
    plain, bal = [], []
    for _, z in ood_logits(members, weights, suite):
        blocks = [z[s * n:(s + 1) * n][keep] for s in range(data.SEVERITIES)]
        plain += [(b.argmax(1) == y).mean() for b in blocks]
        bal += [(balance_classes(b, slices=1).argmax(1) == y).mean() for b in blocks]
    plain, bal = np.array(plain), np.array(bal)
    return {"images": len(keep), "plain": plain, "balanced": bal}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submissions", nargs="+", help="submission JSONs (competition.ensemble's sidecars)")
    p.add_argument("--suite", required=True, help="a labelled suite the members were predicted on")
    p.add_argument("--per-class", type=int, nargs="*", default=[None], help="slice sizes to try: images per class "
                   "(default: the smallest class's count); the gain depends on it, so compare at the real one")
    a = p.parse_args(argv)
    try:
        suite = data.OodSet(a.suite)
        if suite.labels is None:
            raise CompetitionError(f"{a.suite} has no labels.npy: a labelled suite is needed")
        print(f"suite {a.suite} ({suite.role()}); each slice scored on its class-balanced subset")
        print("| submission | images/slice | plain | balanced | diff (s.e. over slices) | sev 5 diff | "
              "slices below plain -1 | worst slice |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for s, k in ((s, k) for s in a.submissions for k in a.per_class):
            r = compare(s, suite, k)
            d = r["balanced"] - r["plain"]
            print(f"| {Path(s).stem} | {r['images']} | {100 * r['plain'].mean():.2f} | {100 * r['balanced'].mean():.2f} "
                  f"| {100 * d.mean():+.2f} +- {100 * d.std(ddof=1) / np.sqrt(len(d)):.2f} | "
                  f"{100 * d[data.SEVERITIES - 1::data.SEVERITIES].mean():+.2f} | {int((d < -0.01).sum())} of {len(d)} "
                  f"| {100 * d.min():+.1f} |")
    except CompetitionError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
