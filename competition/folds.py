"""Stage 1: write the k-fold split once, so every model and the ensemble share it.

    python -m competition.folds --dataset digits                  # folds/digits.csv
    python -m competition.folds --dataset imagefolder --data ../shared/data/cifar10-jpg-train.tar.gz
    python -m competition.folds --dataset cifar100 --k 5 --seed 0

The CSV has columns index,label,fold (index = row of the dataset's train split). The same
dataset, k and seed always give the same file; a different split is never written over one
that exists (models trained on the old folds would leak validation images) unless --force.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from competition import data
from competition.files import CompetitionError, atomic_path, cli


def make_folds(labels: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per sample, stratified by label."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if k < 2 or counts[counts > 0].min() < k:
        raise CompetitionError(f"cannot make {k} stratified folds: the rarest class has {counts[counts > 0].min()} "
                               f"images; use a smaller --k (at least 2)")
    from sklearn.model_selection import StratifiedKFold  # here: sklearn adds ~2 s to every training start

    fold = np.empty(len(labels), np.int64)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        fold[val] = f
    return fold


def folds_frame(labels: np.ndarray, k: int = 5, seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"index": np.arange(len(labels)), "label": labels, "fold": make_folds(labels, k, seed)})


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
    return frame


def folds_path(dataset: str, folds_dir="folds") -> Path:
    return Path(folds_dir) / f"{dataset}.csv"


def dataset_name(source: str, path=None) -> str:
    """Name used for folds/<name>.csv and in run names: the source, or the image folder's file
    name (characters other than letters, digits, . _ - become -, so it is a safe file name)."""
    if source == "imagefolder" and path is not None:
        return re.sub(r"[^\w.-]+", "-", Path(path).name.split(".")[0]).strip("-") or "images"
    return source


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=data.SOURCES)
    p.add_argument("--data", default=None, help="imagefolder: folder or .tar.gz")
    p.add_argument("--data-dir", default="data", help="where datasets and caches live")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds-dir", default="folds")
    p.add_argument("--force", action="store_true", help="replace an existing different split")
    args = p.parse_args(argv)
    ds = data.load(args.dataset, "train", args.data_dir, args.data)
    out = folds_path(dataset_name(args.dataset, args.data), args.folds_dir)
    status = write_folds(folds_frame(ds.labels, args.k, args.seed), out, args.force)
    print(f"{out}: {status} ({len(ds.labels)} images, {len(ds.classes)} classes, k={args.k}, seed={args.seed})")
    return out


if __name__ == "__main__":
    cli(main)()
