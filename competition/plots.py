"""Every figure the pipeline draws, as PNG: training curves of one run (`plot_run`) or of several
overlaid (`plot_overlay`, for studies), and the OOD accuracy heat map (`heatmap`). `pyplot()`
and `save()` are the one matplotlib setup (no display needed; written atomically). Accuracies
are drawn in percent on every figure (the board's tables print them so too); titles name
prediction settings in words (tta.setting_words)."""
from __future__ import annotations

import math
import textwrap
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


# ---------------------------------------------------------------------------- training curves

# metrics.csv columns in words: which images each figure is measured on.
_CURVES = {"train": "train (augmented, as trained)", "train_eval": "train images (eval mode)",
           "val": "held-out fold (clean)", "ood": "held-out fold, corrupted"}
_COLOURS = {"train": "tab:blue", "train_eval": "tab:blue", "val": "tab:orange", "ood": "tab:green"}


def selection_column(frame: pd.DataFrame, select_on: str | None = None) -> str:
    """The metrics.csv column best.pt is chosen on: ood_acc when select_on is 'ood' (None: when
    the frame has ood_acc figures), else val_acc (select_on 'clean', the config's default)."""
    has_ood = "ood_acc" in frame and frame["ood_acc"].notna().any()
    if select_on is None:
        select_on = "ood" if has_ood else "val"
    return "ood_acc" if select_on == "ood" and "ood_acc" in frame else "val_acc"


def best_epoch(frame: pd.DataFrame, select_on: str | None = None) -> int | None:
    """The epoch best.pt holds, as train.py keeps it: the highest selection accuracy, a tie going
    to the later epoch; the last epoch when nothing was measured (no held-out fold)."""
    if frame.empty:
        return None
    col = selection_column(frame, select_on)
    acc = frame[col] if col in frame else pd.Series(np.nan, index=frame.index)
    if acc.isna().all():
        return int(frame["epoch"].iloc[-1])
    return int(frame.loc[acc == acc.max(), "epoch"].max())


def curve_options(cfg: dict, data_cfg: dict | None = None) -> dict:
    """plot_run's keyword arguments from a run's config and data config: what best.pt is chosen
    on, the unfreezing schedule, and the number of classes (the chance line)."""
    return {"select_on": cfg.get("select_on"), "stages": cfg.get("unfreeze") or None,
            "num_classes": (data_cfg or {}).get("num_classes") or cfg.get("num_classes")}


def plot_run(frame: pd.DataFrame, path, title: str = "", *, select_on: str | None = None, stages=None,
             num_classes: int | None = None, best: int | None = None) -> Path:
    """Loss, accuracy and learning rate per epoch from a metrics.csv frame, accuracy on a fixed
    0-100% axis. The accuracy best.pt is chosen on (`select_on`: 'ood' or 'clean'; None: ood_acc when
    the frame has it) is drawn bold and its best epoch (`best`; None: as train.py picks it) marked
    on every panel. `stages`: the epochs (0-based, as a config's `unfreeze` schedule counts them) a
    training stage starts at, or the schedule {epoch: groups} itself (each line then names what it
    opens). `num_classes`: draws chance accuracy, so a model that learned nothing looks so."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    select = selection_column(frame, select_on)
    best = best_epoch(frame, select_on) if best is None else best
    dots = "o" if len(frame) <= 20 else None  # a few epochs: a line alone would hide a 1-epoch run
    for col, style in (("train_loss", "-"), ("train_eval_loss", ":"), ("val_loss", "-"), ("ood_loss", "-")):
        if col in frame and frame[col].notna().any():
            axes[0].plot(frame["epoch"], frame[col], style, marker=dots, ms=3, color=_COLOURS[col[:-5]],
                         label=_CURVES[col[:-5]])
    for col, style in (("train_acc", "-"), ("train_eval_acc", ":"), ("val_acc", "-"), ("ood_acc", "-")):
        if col in frame and frame[col].notna().any():
            chosen = col == select
            axes[1].plot(frame["epoch"], 100 * frame[col], style, marker=dots, ms=4 if chosen else 3,
                         color=_COLOURS[col[:-4]], lw=2.6 if chosen else 1.2, zorder=3 if chosen else 2,
                         label=_CURVES[col[:-4]] + (": picks the best weights" if chosen else ""))
    if num_classes:
        chance = chance_level(num_classes)
        axes[1].axhline(100 * chance, color="0.3", ls="--", lw=1,
                        label=f"chance (1/{num_classes} = {100 * chance:.3g}%)")
    axes[1].set_ylim(0, 100)
    axes[2].plot(frame["epoch"], frame["lr"], marker=dots, ms=3, color="tab:purple")
    for ax in axes:
        _epoch_axis(ax)
    for k, (at, what) in enumerate(_stage_lines(stages)):
        for ax in axes:
            ax.axvline(at, color="0.5", ls=":", lw=1.2, label="unfreezing stage starts" if k == 0 and ax is axes[0]
                       else None)
        axes[2].annotate(f"unfreeze{': ' + what if what else ''}", (at, 1), xycoords=("data", "axes fraction"),
                         rotation=90, fontsize=7, color="0.35", ha="right", va="top", xytext=(-2, -2),
                         textcoords="offset points")
    if best is not None:
        row = frame[frame["epoch"] == best]
        for ax in axes:
            ax.axvline(best, color="tab:red", ls="--", lw=1.2, label="best epoch (the best weights)" if ax is axes[1] else None)
        if len(row) and select in row and pd.notna(row[select].iloc[0]):
            v = 100 * row[select].iloc[0]
            axes[1].plot([best], [v], "*", color="tab:red", ms=13, zorder=4)
            axes[1].annotate(f"best epoch {best}: {v:.1f}%", (best, v), xytext=(-6, 8), textcoords="offset points",
                             ha="right", fontsize=8, color="tab:red")
    axes[0].set(title="loss (cross-entropy)")
    axes[1].set(title="accuracy", ylabel="accuracy, %")
    axes[2].set(title="learning rate (end of epoch)")
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    head = f"{title}: " if title else ""
    if best is None:
        return save(fig, path, title)
    if select not in frame or frame[select].isna().all():
        return save(fig, path, f"{head}last epoch {best} kept (no held-out images to choose on)")
    how = "the corrupted held-out fold" if select == "ood_acc" else "the clean held-out fold"
    return save(fig, path, f"{head}best epoch {best} (chosen on {how})")


def chance_level(num_classes: int) -> float:
    """The accuracy of a model that guesses (balanced classes)."""
    return 1.0 / num_classes


def _stage_lines(stages) -> list[tuple[float, str]]:
    """(x, what opens) per stage boundary: a stage starting at 0-based epoch k first trains the
    metrics' epoch k+1, so its line sits between epochs k and k+1. The first stage has none."""
    if not stages:
        return []
    items = stages.items() if isinstance(stages, dict) else ((k, None) for k in stages)
    out = []
    for k, groups in sorted(((int(k), g) for k, g in items), key=lambda kv: kv[0]):
        if k > 0:
            what = ", ".join(map(str, groups)) if isinstance(groups, (list, tuple)) else (groups or "")
            out.append((k + 0.5, str(what)))
    return out


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


# ---------------------------------------------------------------------------- the OOD heat map


def with_means(table: np.ndarray) -> np.ndarray:
    """The corruption x severity table with its margins: a column of row means at the right, a row
    of column means at the bottom, the overall mean in the corner (shape (R+1, C+1))."""
    t = np.asarray(table, dtype=float)
    out = np.empty((t.shape[0] + 1, t.shape[1] + 1))
    out[:-1, :-1], out[:-1, -1], out[-1, :-1], out[-1, -1] = t, t.mean(1), t.mean(0), t.mean()
    return out


def cell_decimals(n: int | None) -> int:
    """Decimals of a percentage of n images worth printing: one image is 100/n points, and one
    standard error is up to 50/sqrt(n) points (1.1 at n=2000), so below 5000 images the
    decimal digit is noise."""
    return 1 if n is None or n >= 5000 else 0


def heatmap(table: np.ndarray, names: list[str], path, title: str, *, trained_on=(), role: str | None = None,
            n: int | None = None) -> Path:
    """Accuracy (%) per corruption (rows) and severity (columns), each cell annotated, with row and
    column means in the margins. `trained_on`: corruptions whose family the training augmentation
    covered (their rows are starred); `role`: the role text of the images (data.suite_role: its
    first clause is shown); `n`: images per cell (shown, and it sets the decimals)."""
    plt = pyplot()
    full = 100 * with_means(table)
    rows, sev = np.asarray(table).shape
    seen = set(trained_on or ())
    labels = [f"{x} *" if x in seen else x for x in names] + ["mean"]
    fig, ax = plt.subplots(figsize=(6.2, 0.3 * (rows + 1) + 2.3))
    im = ax.imshow(full, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(sev + 1), [str(s) for s in range(1, sev + 1)] + ["mean"])
    ax.set_yticks(range(rows + 1), labels, fontsize=8)
    ax.set_xlabel("severity")
    ax.set_ylabel("corruption")
    for t in ax.get_yticklabels()[-1:] + ax.get_xticklabels()[-1:]:
        t.set_fontweight("bold")
    ax.axvline(sev - 0.5, color="white", lw=3)  # the margins apart from the cells
    ax.axhline(rows - 0.5, color="white", lw=3)
    d = cell_decimals(n)
    for (i, j), a in np.ndenumerate(full):
        ax.text(j, i, f"{a:.{d}f}", ha="center", va="center", fontsize=7, color="white" if a < 60 else "black",
                fontweight="bold" if i == rows or j == sev else "normal")
    lines = textwrap.wrap(title, 70)
    if role or n:
        who = role.split(":")[0] if role else None
        per = f"{n} images per cell (one s.e. up to {50 / math.sqrt(n):.1f} points)" if n else None
        lines.append("images: " + ", ".join(x for x in (who, per) if x))
    lines.append(f"mean {full[-1, -1]:.{d + 1}f}%")
    ax.set_title("\n".join(lines), fontsize=8.5)
    if seen:
        others = [r for name, r in zip(names, np.asarray(table)) if name not in seen]
        note = "* family seen by the training augmentation" + (
            f"; mean over the other {len(others)}: {100 * np.mean(others):.{d + 1}f}%" if others else "")
        fig.text(0.01, 0.005, note, fontsize=7.5, ha="left", va="bottom")
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy, %")
    fig.tight_layout(rect=(0, 0.03 if seen else 0, 1, 1))
    return save(fig, path, dpi=100, tight=False)
