"""Mean and spread over independent repeats of bench/test_time.py (other fold splits: --folds-seed),
one row per method: what a method claim in NOTES/README rests on (the honest-protocol issue).

    python bench/repeats.py models/honest-fs0 models/honest-fs1 models/honest-fs2

Each folder is one repeat's --out; its log.txt ends with the bench's table. Rows are matched by
method (the pseudo-label counts in a self-training row's name are dropped); a cell is
"mean +- sd (min-max)" over the repeats that have the row; n says how many.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np


def table(out_dir: Path) -> dict[str, list[float]]:
    """{method: [clean, measure OOD, pool OOD or nan, wall s]} from the last table in the repeat's log."""
    text = (out_dir.parent / f"{out_dir.name}.out").read_text() if (out_dir.parent / f"{out_dir.name}.out").exists() \
        else (out_dir / "log.txt").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"[\d.]+", cells[1] or "x"):
            continue
        name = re.sub(r" \(\d+ pseudo-labels, [\d.]+% right;", " (", cells[0])
        rows[name] = [float(c) if c else float("nan") for c in cells[1:]]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repeats", nargs="+", type=Path, help="the --out folders of bench/test_time.py runs")
    args = p.parse_args(argv)
    tables = [table(r) for r in args.repeats]
    names = list(dict.fromkeys(n for t in tables for n in t))
    print(f"{len(tables)} repeats: {', '.join(str(r) for r in args.repeats)}\n")
    print("| method | n | clean held-out (TTA) | measure OOD | pool OOD (transductive after ST) |\n|---|---:|---:|---:|---:|")
    for name in names:
        vals = np.array([t[name] for t in tables if name in t])
        cells = []
        for k in range(3):
            v = vals[:, k][~np.isnan(vals[:, k])]
            cells.append("" if not len(v) else f"{v.mean():.2f} +- {v.std(ddof=1) if len(v) > 1 else 0:.2f} "
                                              f"({v.min():.2f}-{v.max():.2f})")
        print(f"| {name} | {len(vals)} | " + " | ".join(cells) + " |")
    # A method's gain, repeat by repeat (each repeat's rows are on the same images): its spread is
    # the one a claim has to beat, not the s.e. of one repeat's images. Rows by their place in
    # test_time's table: single plain, single adapted, ensemble plain, ensemble adapted, rounds.
    pairs = [(1, 0, "adaptation, one model"), (2, 0, "ensemble of the seeds, plain"),
             (3, 2, "adaptation, ensemble"), (3, 1, "ensemble, adapted")] + \
        [(k, k - 1, f"self-training round {k - 3}") for k in range(4, max(map(len, tables)))]
    print("\n| gain on the measure (paired images within a repeat) | n | mean +- sd over repeats | per repeat |\n"
          "|---|---:|---:|---|")
    for a, b, label in pairs:
        d = [list(t.values())[a][1] - list(t.values())[b][1] for t in tables if len(t) > max(a, b)]
        if d:
            print(f"| {label} | {len(d)} | {np.mean(d):+.2f} +- {np.std(d, ddof=1) if len(d) > 1 else 0:.2f} "
                  f"| {', '.join(f'{x:+.2f}' for x in d)} |")

if __name__ == "__main__":
    main()
