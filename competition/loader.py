"""uint8 image arrays in memory (or memory-mapped) -> batches, for training and prediction.

A batch is one fancy-index of the array, not N `__getitem__` calls: DataLoader calls
`__getitems__` with the batch's positions, and `collate_fn=as_batch` passes the result on.
"""
from __future__ import annotations

import numpy as np
import torch


class ImageRows(torch.utils.data.Dataset):
    """Rows `rows` of a uint8 (N, H, W, 3) array, with their labels when given.

    Items are (images uint8 (B, H, W, 3), labels int64 (B,), positions int64 (B,)): positions
    index `rows`, so gathered predictions can be put back in order (and mapped to rows of the
    folds CSV) after Accelerate has sharded the batches. Without labels the labels are -1.
    `transform` is a per-image albumentations pipeline (DataLoader workers run it)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None = None, transform=None):
        self.images, self.rows, self.labels, self.transform = images, np.asarray(rows), labels, transform

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, positions):
        pos = np.asarray(positions, dtype=np.int64)
        r = self.rows[pos]
        if len(r) and r[-1] - r[0] == len(r) - 1 and (np.diff(r) == 1).all():
            x = np.array(self.images[r[0]:r[-1] + 1])  # contiguous: a slice reads an mmap sequentially
        else:
            x = self.images[r]  # fancy indexing copies (a memory-mapped file is read-only)
        if self.transform is not None:
            x = np.stack([self.transform(image=im)["image"] for im in x])
        y = self.labels[r] if self.labels is not None else np.full(len(r), -1, np.int64)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64)), torch.from_numpy(pos)

    def __getitem__(self, i):
        return self.__getitems__([i])


def as_batch(batch):
    """collate_fn: __getitems__ already returns the batch (a module-level function, so workers can pickle it)."""
    return batch


def eval_loader(images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None = None,
                batch_size: int = 512) -> torch.utils.data.DataLoader:
    """Batches of images[rows] in order, for evaluation and prediction (not yet prepared)."""
    return torch.utils.data.DataLoader(ImageRows(images, rows, labels), batch_size=batch_size, shuffle=False,
                                       collate_fn=as_batch)
