"""Stage 1: write the k-fold split once, so every model and the ensemble share it.

    python -m competition.folds --dataset digits                  # folds/digits.csv
    python -m competition.folds --dataset imagefolder --data PATH/cifar10-train.tar.gz --measure-n 0.04
    python -m competition.folds --dataset cifar100 --k 5 --seed 0 --measure-n 5000

The CSV has columns index,label,fold (index = row of the dataset's train split). The same
dataset, k, seed and measure size always give the same file; a different split is never written
over one that exists (models trained on the old folds would leak validation images) unless --force.

Three roles for labelled images (README, "An honest local score"): rows of folds 0..k-1 are
*train* for the members that do not hold them out and *choose* for those that do (best epoch,
ensemble weights and adaptation are decided on their corrupted copies, ood_check); rows of fold
-1 (--measure-n, stratified, seeded) are the *measure* reserve: no member trains on them, no
choice looks at them, and `score suite` builds the local leaderboard estimate from them.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from competition import data
from competition.files import CompetitionError, atomic_path, cli, count


MEASURE = -1  # the fold value of the measure reserve's rows


def make_folds(labels: np.ndarray, k: int = 5, seed: int = 0, measure_n: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per sample, stratified by label; with measure_n, that many rows
    (stratified too) get MEASURE first and the folds are made of the rest."""
    labels = np.asarray(labels)
    fold = np.full(len(labels), MEASURE, np.int64)
    from sklearn.model_selection import StratifiedKFold, train_test_split  # here: sklearn adds ~2 s to every start

    rest = np.arange(len(labels))
    if measure_n:
        counts = np.bincount(labels)
        if counts[counts > 0].min() < 2:
            raise CompetitionError(f"--measure-n: class(es) {np.flatnonzero(counts == 1)[:10].tolist()} have a single "
                                   f"image, which cannot be both reserved and trained on: add images or drop the reserve")
        if not 0 < measure_n <= len(labels) // 2 or measure_n < (counts > 0).sum():
            raise CompetitionError(f"--measure-n {measure_n}: must be at least one image per class "
                                   f"({(counts > 0).sum()}) and at most half the {len(labels)} images")
        rest, _ = train_test_split(rest, test_size=measure_n, stratify=labels, random_state=seed)
        rest = np.sort(rest)
    counts = np.bincount(labels[rest])
    if k < 2:
        raise CompetitionError(f"--k {k}: k-fold needs at least 2 folds (one held out, the rest to train on)")
    if counts[counts > 0].min() < k:
        raise CompetitionError(f"cannot make {k} stratified folds: the rarest class has {counts[counts > 0].min()} "
                               f"images; use a smaller --k (at least 2)")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(skf.split(np.zeros(len(rest)), labels[rest])):
        fold[rest[val]] = f
    return fold


def folds_frame(labels: np.ndarray, k: int = 5, seed: int = 0, measure_n: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"index": np.arange(len(labels)), "label": labels,
                         "fold": make_folds(labels, k, seed, measure_n)})


def measure_rows(frame: pd.DataFrame) -> np.ndarray:
    """Rows of the measure reserve (empty when the split has none)."""
    return np.flatnonzero(frame["fold"].to_numpy() == MEASURE)


def reserve_id(rows) -> str | None:
    """A short fingerprint of a measure reserve's rows (None: no reserve). A run records the one
    it was trained beside and a suite the one it was drawn from: equal ids mean the run never
    trained on the suite's images; a run without it (or with another) may have."""
    import hashlib

    rows = np.sort(np.asarray(rows, np.int64))
    return hashlib.sha1(rows.tobytes()).hexdigest()[:16] if len(rows) else None


def write_folds(frame: pd.DataFrame, path, force: bool = False) -> str:
    """Write `frame` to `path`; returns 'written' or 'unchanged'. Refuses to replace a different split."""
    path = Path(path)
    if path.exists():
        old = read_folds(path)
        if old.equals(frame):
            return "unchanged"
        if not force:
            raise CompetitionError(f"{path} already holds a different split; models trained on it would leak "
                                   f"validation images. Keep it, or pass --force to replace it")
    with atomic_path(path, ".csv") as tmp:
        frame.to_csv(tmp, index=False)
    return "written"


def read_folds(path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise CompetitionError(f"{path} is missing: run `python -m competition.folds` for this dataset first")
    try:
        frame = pd.read_csv(path, dtype="int64")
    except Exception as e:
        raise CompetitionError(f"{path} is not a folds CSV ({e}); delete it and run competition.folds again") from None
    if list(frame.columns) != ["index", "label", "fold"]:
        raise CompetitionError(f"{path}: columns {list(frame.columns)}, expected index,label,fold")
    if (frame["fold"] < MEASURE).any():
        raise CompetitionError(f"{path}: fold values below {MEASURE} (the measure reserve); rewrite it with "
                               f"python -m competition.folds --force")
    return frame


def folds_path(dataset: str, folds_dir="folds") -> Path:
    return Path(folds_dir) / f"{dataset}.csv"


def dataset_name(source: str, path=None) -> str:
    """Name used for folds/<name>.csv and in run names: the source, or the image folder's file
    name (characters other than letters, digits, . _ - become -, so it is a safe file name)."""
    if source == "imagefolder" and path is not None:
        return re.sub(r"[^\w.-]+", "-", Path(path).name.split(".")[0]).strip("-") or "images"
    return source


# ---------------------------------------------------------------- a run's rows


def fold_rows(fold: np.ndarray, held_out: int, path, exclude_folds: list[int] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out rows of a run held out on fold `held_out`, given every row's fold
    (from the folds file `path`): exclude_folds and the measure reserve (fold value MEASURE) in
    neither; fold -1 trains on all the others and holds out none."""
    k = int(fold.max()) + 1
    excluded_folds = list(exclude_folds or [])
    # A reserve: neither trained on nor held out. The measure reserve always is: no run, whatever
    # its config, learns from or is selected on the images the local estimate is measured on.
    excluded = np.isin(fold, excluded_folds) | (fold == MEASURE)
    if held_out in excluded_folds:
        raise CompetitionError(f"fold={held_out} is also in exclude_folds {excluded_folds}")
    if held_out == -1:
        return np.flatnonzero(~excluded), np.arange(0)
    if not 0 <= held_out < k:
        raise CompetitionError(f"fold={held_out} but {path} has folds 0..{k - 1} (or -1 to train on all)")
    return np.flatnonzero((fold != held_out) & ~excluded), np.flatnonzero(fold == held_out)


def ood_check_seed(fold: int) -> int:
    """The seed of a fold's corrupted check images: the fold's alone, so every run held out on
    that fold (any seed, any preset) is checked, selected and ensembled on the same images."""
    return 10_000 + int(fold)


def ood_check_cells(val_rows: np.ndarray, n: int, seed: int, cells: int) -> np.ndarray:
    """(cells, n) held-out rows, sorted per row: each corruption and severity gets its own n
    images (repeating only when the fold has fewer than cells * n). Why not the same n images in
    every cell: the estimate's noise would then be that of n images, not of cells * n (with
    n = 100, +-4 points), and weights fitted on it chase those few images. A larger n keeps a
    smaller n's rows as the first of each cell, so runs with other ood_check sizes still share rows."""
    order = np.random.default_rng(seed).permutation(np.asarray(val_rows))
    return np.sort(np.resize(order, cells * n).reshape(n, cells).T, axis=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m competition.folds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=data.SOURCES)
    p.add_argument("--data", default=None, help="imagefolder: folder or .tar.gz")
    p.add_argument("--data-dir", default="data", help="where datasets and caches live")
    p.add_argument("--k", type=count, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure-n", type=float, default=0, help="reserve this many images (or this share, below 1; "
                   "stratified; fold -1) to "
                   "measure the local OOD estimate on: no member trains on them, no choice sees them. It costs "
                   "their share of training images; the final submission may drop it (--measure-n 0 --force, "
                   "then retrain), with no local estimate left for it")
    p.add_argument("--folds-dir", default="folds")
    p.add_argument("--force", action="store_true", help="replace an existing different split")
    args = p.parse_args(argv)
    x = args.measure_n
    if not np.isfinite(x) or x < 0 or (x >= 1 and x != int(x)):
        raise CompetitionError(f"--measure-n {x}: a count of images (0: no reserve) or a share between 0 and 1")
    ds = data.load(args.dataset, "train", args.data_dir, args.data)
    out = folds_path(dataset_name(args.dataset, args.data), args.folds_dir)
    measure_n = int(round(x * len(ds.labels))) if x < 1 else int(x)
    status = write_folds(folds_frame(ds.labels, args.k, args.seed, measure_n), out, args.force)
    print(f"{out}: {status} ({len(ds.labels)} images, {len(ds.classes)} classes, k={args.k}, seed={args.seed}, "
          f"measure reserve {measure_n} images)")
    return out


if __name__ == "__main__":
    cli(main)()
