"""Training curves as PNG: one run (`plot_run`) or several overlaid (`plot_overlay`, for studies)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from competition.files import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    _pyplot().close(fig)
    return path


def plot_run(frame: pd.DataFrame, path, title: str = "") -> Path:
    """Loss, accuracy and learning rate per epoch from a metrics.csv frame."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for col, style in (("train_loss", "-"), ("val_loss", "-"), ("train_eval_loss", ":")):
        if col in frame and frame[col].notna().any():
            axes[0].plot(frame["epoch"], frame[col], style, label=col.replace("_loss", ""))
    for col, style in (("train_acc", "-"), ("val_acc", "-"), ("train_eval_acc", ":")):
        if col in frame and frame[col].notna().any():
            axes[1].plot(frame["epoch"], frame[col], style, label=col.replace("_acc", ""))
    axes[2].plot(frame["epoch"], frame["lr"])
    for ax, name in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines and name != "learning rate (end of epoch)":
            ax.legend()
    return _save(fig, path, title)


def plot_overlay(frames: dict[str, pd.DataFrame], path, title: str = "",
                 columns=("train_loss", "val_loss", "train_acc", "val_acc")) -> Path:
    """One panel per metric, one line per variant."""
    plt = _pyplot()
    cols = [c for c in columns if any(c in f for f in frames.values())]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for name, frame in frames.items():
            if col in frame:
                ax.plot(frame["epoch"], frame[col], label=name)
        ax.set_title(col)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path, title)
