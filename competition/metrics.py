"""Metrics on logits (numpy): accuracy, log-loss, calibration, and the OOD accuracy table.

Every stage that reports a number (train's held-out accuracy, the ensemble's weights, the
local score, the board) computes it here, so a figure means the same thing everywhere.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax as _log_softmax
from scipy.special import softmax as _softmax

from competition.data import SEVERITIES
from competition.files import CompetitionError


def member_weights(values, where) -> np.ndarray:
    """An ensemble's member weights (a submission JSON's, `where`) as floats, checked: finite, >= 0,
    not all 0. JSON reads 1e999 as inf, which made NaN logits (a traceback in the calibration
    bins); all 0 left no logits at all."""
    try:
        weights = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        weights = None
    if weights is None or weights.ndim != 1 or not len(weights) or not np.isfinite(weights).all() or \
            (weights < 0).any() or not weights.sum() > 0:
        shown = ", ".join(f"{w:g}" for w in weights.ravel()) if weights is not None else repr(values)
        raise CompetitionError(f"{where}: member weights [{shown}] are not an ensemble's (finite numbers >= 0, not "
                               f"all 0): restore the file, or rebuild it with competition.ensemble")
    return weights


def softmax(z: np.ndarray) -> np.ndarray:
    return _softmax(np.asarray(z, np.float64), axis=1)


def log_softmax(z: np.ndarray) -> np.ndarray:
    return _log_softmax(np.asarray(z, np.float64), axis=1)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax is the label (nan for no rows)."""
    return float((np.asarray(logits).argmax(1) == labels).mean()) if len(labels) else float("nan")


def log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of softmax(logits) against integer labels (nan for no rows)."""
    if not len(labels):
        return float("nan")
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


class Calibration:
    """Expected calibration error accumulated batch by batch (Guo et al. 2017): per equal-width
    confidence bin, |accuracy - mean confidence|, weighted by the bin's share of samples.
    Accumulated rather than computed at once because the OOD logits stream file by file."""

    def __init__(self, bins: int = 15):
        self.bins = bins
        self.count = np.zeros(bins)
        self.conf = np.zeros(bins)
        self.correct = np.zeros(bins)

    def add(self, logits: np.ndarray, labels: np.ndarray) -> "Calibration":
        p = softmax(logits)
        conf, pred = p.max(1), p.argmax(1)
        b = np.minimum((conf * self.bins).astype(int), self.bins - 1)
        np.add.at(self.count, b, 1)
        np.add.at(self.conf, b, conf)
        np.add.at(self.correct, b, pred == labels)
        return self

    def ece(self) -> float:
        n = self.count.sum()
        if not n:
            return float("nan")
        return float(np.abs(self.correct - self.conf).sum() / n)


def ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    return Calibration(bins).add(logits, labels).ece()


def file_right(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(5, N) right/wrong of one OOD file's logits (5*N rows, severity-major) against the suite's
    N labels (the same images at every severity)."""
    n = len(labels)
    if len(logits) != SEVERITIES * n:
        raise CompetitionError(f"{len(logits)} logit rows for a suite of {n} labels x {SEVERITIES} severities")
    return np.asarray(logits).argmax(1).reshape(SEVERITIES, n) == labels[None]


def file_accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy per severity (5,) of one OOD file's logits (see file_right)."""
    return file_right(logits, labels).mean(1)


def image_standard_error(right: np.ndarray) -> float:
    """Standard error of an OOD accuracy over its images: `right` (cells, N) marks each suite
    image right or wrong in every corruption and severity. The cells share the same N images
    (CIFAR-C's layout), so the estimate's noise is that of N images, not of cells x N: an image
    the model gets wrong tends to be wrong in many cells. Reported next to the accuracy so a
    difference between two runs can be read against it."""
    per_image = np.asarray(right, float).mean(0)
    return float(per_image.std(ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")


def table_summary(table: np.ndarray) -> dict:
    """The figures of an accuracy table (files x severities): every cell holds the same number
    of images, so the plain mean is the accuracy over the whole OOD set."""
    table = np.asarray(table, float)
    return {"ood_accuracy": float(table.mean()), "per_severity": table.mean(0).round(6).tolist(),
            "per_file": table.mean(1).round(6).tolist()}
