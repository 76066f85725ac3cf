"""Copies of one picture across the OOD files, found from the pixels, and one prediction for all of them.

Every OOD file is the same test images at 5 severities: the competition's are CIFAR-100's test
split under 19 corruptions, and its ids (`distortion{NN}_{severity}_{index}`) keep the index. Where
the files also keep one order, row i of every (file, severity) cell is the same picture: 95 copies
of it, some barely corrupted. A prediction made from all of them (the mean of their predicted
probabilities) is the picture's class for every copy; a copy that a corruption ruined is carried
by the copies it spared. It needs no label: which cells share an order is read from the images.

Finding the cells: each image's signature is its grey 8 x 8 block means, centred and scaled to unit
length, so the dot product of two signatures is their correlation, unchanged by the brightness and
contrast shifts corruptions make and little moved by noise and blur (averaged out over a block).
For two cells, the mean correlation of row i with row i (same picture, if aligned) is compared with
the mean correlation of row i with row i + 1 (other pictures): the two cells are linked when the
first exceeds the second by MIN_GAIN. Measured on local suites (bench/NOTES.md, "Copies"): cells in
other orders differ by 0.00 +- 0.02 at 500 rows (at most 0.08 over 4,465 pairs), the weakest pair of
truly aligned cells (fog at severity 4-5 among the 19) by 0.31-0.36, so 0.2 is far from both. Cells
linked directly or through others form a group; a cell in no group keeps its own predictions.

Written here: no library finds aligned copies across image sets (the nearest choices, image
hashing packages, compare two files at a time and would be a dependency for a block mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from competition import data
from competition.files import CompetitionError

GRID = 8            # signature: block means on an 8 x 8 grid (4 x 4 pixel blocks at 32 x 32)
SAMPLE = 1000       # rows per cell compared (a seeded sample; all when a cell has fewer)
MIN_ROWS = 100      # fewer rows per cell: too few to tell copies from chance; nothing is linked
MIN_GAIN = 0.2      # mean same-row correlation above the other-row one that links two cells


@dataclass
class Copies:
    """Which (file, severity) cells hold the same pictures in the same order. A cell is numbered
    file * SEVERITIES + severity - 1; `groups` lists the groups of two or more linked cells."""
    cells: int
    rows: int
    groups: list[list[int]]
    gain: np.ndarray  # (cells, cells) same-row minus other-row mean correlation

    def summary(self) -> dict:
        """What a submission JSON records and a report prints."""
        linked = sum(map(len, self.groups))
        return {"cells": self.cells, "linked_cells": linked, "groups": [len(g) for g in self.groups],
                "rows_per_cell": self.rows, "sample": min(self.rows, SAMPLE), "min_gain": MIN_GAIN}

    def words(self) -> str:
        s = self.summary()
        if not self.groups:
            return (f"no copies found: no two of the {s['cells']} file-severity cells hold the same pictures in the "
                    f"same order ({'too few rows to tell' if self.rows < MIN_ROWS else 'the files are in different orders'}); "
                    f"every cell keeps its own predictions")
        return (f"{s['linked_cells']} of {s['cells']} file-severity cells hold the same {self.rows} pictures in one order "
                f"({len(self.groups)} group(s) of {', '.join(map(str, s['groups']))}): each picture's prediction is the "
                f"mean of its copies' probabilities")


def signatures(images: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(n, grid * grid) float32 unit vectors of uint8 images (n, H, W, 3) or (n, H, W): grey block
    means, centred. A flat image has a zero signature (correlates with nothing)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x.mean(axis=3)
    if x.ndim != 3:
        raise CompetitionError(f"images of shape {images.shape}: expected (n, H, W, 3) or (n, H, W)")
    for axis in (1, 2):
        g = min(grid, x.shape[axis])
        edges = np.linspace(0, x.shape[axis], g + 1).astype(int)
        x = np.add.reduceat(x, edges[:-1], axis=axis) / np.diff(edges).reshape([-1 if a == axis else 1
                                                                                for a in range(3)])
    x = x.reshape(len(x), -1)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)


def link_gain(sigs: np.ndarray) -> np.ndarray:
    """(cells, cells) mean correlation of row i with row i minus that of row i with row i + 1, for
    signatures (cells, n, d) of the same n rows of every cell."""
    same = np.einsum("and,bnd->ab", sigs, sigs) / sigs.shape[1]
    other = np.einsum("and,bnd->ab", sigs, np.roll(sigs, 1, axis=1)) / sigs.shape[1]
    return same - other


def groups_of(linked: np.ndarray) -> list[list[int]]:
    """Connected components of two or more cells of a boolean (cells, cells) link matrix."""
    n, seen, out = len(linked), set(), []
    for start in range(n):
        if start in seen:
            continue
        group, todo = [], [start]
        seen.add(start)
        while todo:
            a = todo.pop()
            group.append(a)
            for b in np.flatnonzero(linked[a]):
                if int(b) not in seen:
                    seen.add(int(b))
                    todo.append(int(b))
        if len(group) > 1:
            out.append(sorted(group))
    return out


def find(ood: data.OodSet, sample: int = SAMPLE, seed: int = 0) -> Copies:
    """The cells of `ood` that hold the same pictures in the same order (read from a seeded sample
    of rows; the same files give the same answer)."""
    n = ood.rows[0] // data.SEVERITIES
    cells = len(ood.files) * data.SEVERITIES
    if n < MIN_ROWS:
        return Copies(cells, n, [], np.zeros((cells, cells)))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    sigs = np.stack([signatures(ood.images(k)[s * n + rows]) for k in range(len(ood.files))
                     for s in range(data.SEVERITIES)])
    gain = link_gain(sigs)
    linked = gain >= MIN_GAIN
    np.fill_diagonal(linked, False)
    return Copies(cells, n, groups_of(linked & linked.T), gain)


def consensus(probs: np.ndarray) -> np.ndarray:
    """Log of the mean probability over copies: probs (copies, n, C) -> (n, C) float32. The mean of
    probabilities rather than of log-probabilities: a copy a corruption ruined can be confidently
    wrong, and in a product its one vote could outweigh many (on the choose pool the two were within
    0.2 points of each other)."""
    p = np.asarray(probs, np.float64)
    return log_mean(p.sum(axis=0), len(p))


def log_mean(total: np.ndarray, count: int) -> np.ndarray:
    """log(total / count) as float32, for probabilities summed over `count` copies (streamed)."""
    return np.log(np.clip(np.asarray(total, np.float64) / count, 1e-30, None)).astype(np.float32)

