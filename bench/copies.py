"""One prediction per picture from all its copies across the OOD files (`ensemble --copies`) against
each cell's own predictions, on a labelled suite that already exists, for each submission JSON
given: so the rule can be chosen on a choose-role suite (a pool of a fold the runs exclude) from
logits already predicted, and measured the same way on a measure suite.

    python bench/copies.py SUBMISSION.json [...] --suite models/honest-fs0/pool-f1-bal1000 [--balance]
    python bench/copies.py --cost [--rows 10000]       # its cost at the competition's size

Every suite `score suite` builds holds the same images in every cell, in one order, as CIFAR-100-C
does; competition.copies finds that from the pixels. Rules compared (each picture's consensus is
given to all its copies): the mean of the copies' probabilities (the product's), the mean of their
log-probabilities, the mean within each file only (the 5 severities of one corruption), the mean with
the cell's own prediction counted as 5, 10 or 20 copies, and the cell's own prediction wherever it is
surer than the consensus. Figures:
mean accuracy over the cells, its paired difference from the cells' own predictions (s.e. over
images: each image's mean over its cells), severity 5, and the worst cell's change with its s.e. (the
issue's no-collapse rule: no cell below its own accuracy minus 1 point; on 500-image cells one cell's
change has an s.e. near 1 point, so the worst of 95 sits below its mean by chance).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from competition import copies, data  # noqa: E402
from competition.files import CompetitionError  # noqa: E402
from competition.metrics import log_softmax  # noqa: E402
from competition.runs import members_from_json, ood_logits, recorded_balance  # noqa: E402


def rules(logp: np.ndarray, groups: list[list[int]], own_weights=(5, 10, 20)) -> dict:
    """{rule: (cells, n, C) log-scores} for cell log-probabilities (cells, n, C)."""
    out = {"own": logp}
    for lam in own_weights:  # the cell's own prediction counted as `lam` copies
        z = logp.copy()
        for g in groups:
            p = np.exp(logp[g].astype(np.float64))
            z[g] = np.log((p.sum(0) + (lam - 1) * p) / (len(g) + lam - 1))
        out[f"own x{lam}"] = z
    for name in ("probability mean", "log-probability mean", "within each file", "own where surer"):
        z = logp.copy()
        for g in groups:
            if name == "within each file":
                for f in sorted({c // data.SEVERITIES for c in g}):
                    part = [c for c in g if c // data.SEVERITIES == f]
                    z[part] = copies.consensus(np.exp(logp[part]))
            elif name == "own where surer":
                cons = copies.consensus(np.exp(logp[g]))
                own = logp[g]
                z[g] = np.where((own.max(2) > cons.max(1))[..., None], own, cons)
            else:
                z[g] = copies.consensus(np.exp(logp[g])) if name == "probability mean" else logp[g].mean(0)
        out[name] = z
    return out


def detector(suite: data.OodSet, seed: int = 1) -> str:
    """The detector's margins on a suite: the weakest pair of cells (same-row minus other-row mean
    correlation) and the median, and the same for the suite with every cell's rows shuffled apart."""
    n = suite.rows[0] // data.SEVERITIES
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, copies.SAMPLE), replace=False))
    out = []
    for shuffled in (False, True):
        sigs = np.stack([copies.signatures(suite.images(k)[s * n + (rng.permutation(rows) if shuffled else rows)])
                         for k in range(len(suite.files)) for s in range(data.SEVERITIES)])
        g = copies.link_gain(sigs)
        g = g[~np.eye(len(g), dtype=bool)]
        out.append(f"{'shuffled cells' if shuffled else 'as stored'}: min {g.min():.3f} median {np.median(g):.3f} "
                   f"max {g.max():.3f}")
    return f"same-row minus other-row correlation over {len(rows)} rows (links at >= {copies.MIN_GAIN}): " + "; ".join(out)


def compare(spec_path, suite: data.OodSet, balance: bool | None = None) -> dict:
    members, weights, spec = members_from_json(spec_path)
    balance = recorded_balance(spec) if balance is None else balance
    n = suite.rows[0] // data.SEVERITIES
    logp = np.concatenate([log_softmax(z).reshape(data.SEVERITIES, n, -1)
                           for _, z in ood_logits(members, weights, suite, balance)]).astype(np.float32)
    found = copies.find(suite)
    right = {k: z.argmax(2) == suite.labels for k, z in rules(logp, found.groups).items()}  # (cells, n) each
    return {"found": found.words(), "balance": balance, "right": right}


def cost(rows: int, classes: int = 100) -> None:
    """Seconds to find the copies in 19 files of 5 x `rows` images (written to a temporary folder, then
    read back cold from the page cache's point of view: it is dropped only by the OS) and to form
    the consensus of 95 cells of `rows` x `classes` logits, as ensemble --copies does."""
    import tempfile
    import time

    from competition.metrics import softmax
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for f in range(data.OOD_FILES):
            out = np.lib.format.open_memmap(Path(tmp) / f"distortion{f:02d}.npy", mode="w+", dtype=np.uint8,
                                            shape=(data.SEVERITIES * rows, 32, 32, 3))
            for lo in range(0, len(out), 10_000):
                out[lo:lo + 10_000] = rng.integers(0, 256, size=out[lo:lo + 10_000].shape, dtype=np.uint8)
            out.flush()
            del out
        t = time.perf_counter()
        found = copies.find(data.OodSet(tmp))
        t_find = time.perf_counter() - t
    z = rng.normal(size=(data.SEVERITIES * rows, classes)).astype(np.float32)
    t = time.perf_counter()
    total = 0.0
    for _ in range(data.OOD_FILES):  # pass 1: each file's probabilities summed per picture
        p = softmax(z)
        total = total + p.reshape(data.SEVERITIES, rows, classes).sum(0)
    shared = copies.consensus(total[None] / (data.OOD_FILES * data.SEVERITIES))
    for _ in range(data.OOD_FILES):  # pass 2: every row replaced
        np.broadcast_to(shared, (data.SEVERITIES, rows, classes)).reshape(-1, classes).copy()
    t_mix = time.perf_counter() - t
    print(f"{data.OOD_FILES} files x {data.SEVERITIES} x {rows} images, {classes} classes: finding copies "
          f"{t_find:.1f} s ({found.words()[:40]}...), consensus {t_mix:.1f} s; the logits are read twice")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submissions", nargs="*", help="submission JSONs (competition.ensemble's sidecars)")
    p.add_argument("--suite", help="a labelled suite the members were predicted on")
    p.add_argument("--cost", action="store_true", help="time it at the competition's size instead")
    p.add_argument("--rows", type=int, default=10_000, help="--cost: images per file and severity")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="balance each cell first (default: as the submission was made)")
    a = p.parse_args(argv)
    if a.cost:
        return cost(a.rows)
    if not a.submissions or not a.suite:
        p.error("give submission JSONs and --suite, or --cost")
    try:
        suite = data.OodSet(a.suite)
        if suite.labels is None:
            raise CompetitionError(f"{a.suite} has no labels.npy: a labelled suite is needed")
        for path in a.submissions:
            r = compare(path, suite, a.balance)
            own = r["right"]["own"]
            print(f"{path} on {suite.path} ({suite.role()}), {'balanced cells' if r['balance'] else 'cells as predicted'}")
            print(f"  {r['found']}")
            print(f"  {detector(suite)}")
            for name, right in r["right"].items():
                diff = (right.mean(0) - own.mean(0)) * 100  # per image, over its cells
                cell = (right.mean(1) - own.mean(1)) * 100
                worst = int(cell.argmin())
                d = (right[worst].astype(float) - own[worst]) * 100
                worst_se = d.std(ddof=1) / np.sqrt(len(d))
                print(f"  {name:<22} {right.mean() * 100:6.2f}  {'' if name == 'own' else f'{diff.mean():+.2f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.2f}'}"
                      f"  severity 5 {right[data.SEVERITIES - 1::data.SEVERITIES].mean() * 100:6.2f}"
                      f"  worst cell {cell.min():+.2f} +- {worst_se:.2f} (cell {worst})")
    except CompetitionError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
