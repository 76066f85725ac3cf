"""Every figure the pipeline draws, as PNG: training curves of one run (`plot_run`) or of several
overlaid (`plot_overlay`, for studies), and the OOD accuracy heat map (`heatmap`). `pyplot()`
and `save()` are the one matplotlib setup (no display needed; written atomically)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from competition.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, never a display (imported lazily: ~1 s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, title: str | None = None, dpi: int = 90, tight: bool = True) -> Path:
    """Write `fig` to `path` as PNG (atomically) and close it."""
    if title:
        fig.suptitle(title)
    if tight:
        fig.tight_layout()
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path


def plot_run(frame: pd.DataFrame, path, title: str = "") -> Path:
    """Loss, accuracy and learning rate per epoch from a metrics.csv frame."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for col, style in (("train_loss", "-"), ("val_loss", "-"), ("train_eval_loss", ":")):
        if col in frame and frame[col].notna().any():
            axes[0].plot(frame["epoch"], frame[col], style, label=col.replace("_loss", ""))
    for col, style in (("train_acc", "-"), ("val_acc", "-"), ("train_eval_acc", ":")):
        if col in frame and frame[col].notna().any():
            axes[1].plot(frame["epoch"], frame[col], style, label=col.replace("_acc", ""))
    axes[2].plot(frame["epoch"], frame["lr"])
    for ax, name in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)")):
        ax.set_title(name)
        _epoch_axis(ax)
        if ax.lines and name != "learning rate (end of epoch)":
            ax.legend()
    return save(fig, path, title)


def plot_overlay(frames: dict[str, pd.DataFrame], path, title: str = "",
                 columns=("train_loss", "val_loss", "train_acc", "val_acc")) -> Path:
    """One panel per metric, one line per variant, on a grid at most 3 panels wide."""
    plt = pyplot()
    cols = [c for c in columns if any(c in f for f in frames.values())]
    ncol = min(3, len(cols))
    nrow = -(-len(cols) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.4 * nrow), squeeze=False)
    for ax, col in zip(axes.flat, cols):
        for name, frame in frames.items():
            if col in frame:
                ax.plot(frame["epoch"], frame[col], label=name)
        ax.set_title(col)
        _epoch_axis(ax)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    return save(fig, path, title)


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.grid(alpha=0.3)


def heatmap(table: np.ndarray, names: list[str], path, title: str) -> Path:
    """Accuracy per corruption (rows) and severity (columns), each cell annotated."""
    plt = pyplot()
    sev = table.shape[1]
    fig, ax = plt.subplots(figsize=(5.2, 0.32 * len(names) + 1.4))
    im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(sev), [f"s{s}" for s in range(1, sev + 1)])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), a in np.ndenumerate(table):
        ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7, color="white" if a < 0.6 else "black")
    ax.set_title(f"{title}\nmean {table.mean():.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy")
    return save(fig, path, dpi=100)
