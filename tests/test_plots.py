"""The figures a Kaggler reads at a glance: curves.png marks the epoch best.pt holds (chosen on the
corrupted held-out accuracy when the run measured it), chance and the unfreezing stages; the heat
map carries its margins, the families training saw, the images' role and n; titles speak in words."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from competition import plots, tta


@pytest.fixture
def figures(monkeypatch):
    """The figures plots.save is handed, kept open for inspection instead of written."""
    kept = []
    monkeypatch.setattr(plots, "save", lambda fig, path, title=None, **kw: kept.append((fig, title)) or path)
    yield kept
    for fig, _ in kept:
        plots.pyplot().close(fig)


def metrics(ood=True) -> pd.DataFrame:
    # clean accuracy peaks at epoch 2; corrupted accuracy ties at epochs 3 and 4
    frame = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "lr": [0.1, 0.08, 0.05, 0.02, 0.0],
                          "train_loss": [2.0, 1.5, 1.2, 1.0, 0.9], "val_loss": [2.1, 1.6, 1.4, 1.3, 1.3],
                          "train_acc": [0.2, 0.4, 0.5, 0.6, 0.7], "val_acc": [0.3, 0.6, 0.5, 0.55, 0.58]})
    if ood:
        frame["ood_loss"], frame["ood_acc"] = [2.5, 2.2, 2.0, 2.0, 2.1], [0.1, 0.3, 0.4, 0.4, 0.35]
    return frame


def test_best_epoch_is_the_one_train_keeps():
    assert plots.best_epoch(metrics()) == 4  # ood_acc present: its tie goes to the later epoch
    assert plots.best_epoch(metrics(), "ood") == 4
    assert plots.best_epoch(metrics(), "clean") == 2  # a run selecting on clean images
    assert plots.best_epoch(metrics(ood=False)) == 2
    no_held_out = metrics(ood=False).assign(val_acc=np.nan)
    assert plots.best_epoch(no_held_out) == 5  # nothing measured: train keeps the last epoch


def test_curves_mark_best_epoch_chance_and_stages(figures, tmp_path):
    plots.plot_run(metrics(), tmp_path / "c.png", "r", num_classes=10, stages={0: ["head"], 2: ["all"]})
    (fig, title), = figures
    loss, acc, lr = fig.axes
    lines = {ln.get_label(): ln for ln in acc.lines}
    chance = next(ln for label, ln in lines.items() if label.startswith("chance"))
    assert list(chance.get_ydata()) == [10.0, 10.0]  # 1/10, in percent
    assert acc.get_ylim() == (0.0, 100.0)
    assert list(lines["best epoch (the best weights)"].get_xdata()) == [4, 4]
    bold = max(acc.lines, key=lambda ln: ln.get_linewidth())
    assert bold.get_label().startswith("held-out fold, corrupted") and list(bold.get_ydata()) == [10, 30, 40, 40, 35]
    # the stage starting at 0-based epoch 2 first trains epoch 3: its line lies between 2 and 3
    assert [ln.get_xdata()[0] for ln in lr.lines if ln.get_linestyle() == ":"] == [2.5]
    assert "best epoch 4" in title and "corrupted" in title


def test_curves_of_a_run_selecting_on_clean_images(figures, tmp_path):
    plots.plot_run(metrics(), tmp_path / "c.png", "r", **plots.curve_options({"select_on": "clean"},
                                                                              {"num_classes": 100}))
    (fig, title), = figures
    assert "best epoch 2" in title and "clean" in title
    assert any(ln.get_label().startswith("chance (1/100 = 1%)") for ln in fig.axes[1].lines)


def test_plot_run_writes_a_png(tmp_path):
    path = plots.plot_run(metrics(), tmp_path / "curves.png", title="r")  # train.py's call, unchanged
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_heatmap_margins_are_row_and_column_means():
    table = np.array([[1.0, 0.5, 0.0], [0.5, 0.5, 0.5]])
    full = plots.with_means(table)
    assert full.shape == (3, 4)
    np.testing.assert_allclose(full[:2, 3], [0.5, 0.5])  # row means at the right
    np.testing.assert_allclose(full[2, :3], [0.75, 0.5, 0.25])  # column means at the bottom
    assert full[2, 3] == pytest.approx(0.5)


def test_heatmap_marks_trained_families_role_and_n(figures, tmp_path):
    table = np.full((3, 5), 0.95)
    plots.heatmap(table, ["fog", "gaussian_noise", "snow"], tmp_path / "h.png", "a: OOD accuracy",
                  trained_on={"gaussian_noise"}, role="measure: 40 images of the digits test split; ...", n=40)
    (fig, _), = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fog", "gaussian_noise *", "snow", "mean"]
    assert ax.get_xlabel() == "severity" and ax.get_ylabel() == "corruption"
    assert "images: measure, 40 images per cell" in ax.get_title()
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 4 * 6 and set(cells) == {"95"}  # 40 images: whole percents, not 0.950
    assert any("family seen by the training augmentation" in t.get_text() for t in fig.texts)


def test_cell_decimals_follow_the_images_per_cell():
    assert plots.cell_decimals(40) == 0 and plots.cell_decimals(2000) == 0 and plots.cell_decimals(10000) == 1


@pytest.mark.parametrize("code, words", [
    ("none", "no TTA"),
    ("flip", "2-view TTA (mirror)"),
    ("shift1+bn", "6-view TTA (mirror x shifts) + BN adaptation"),
    ("shift2+tent", "10-view TTA (mirror x shifts of 1 and 2 px) + TENT adaptation"),
    ("flip-prob+bn0.5", "2-view TTA (mirror), probabilities averaged + BN adaptation (blend 0.5)"),
    ("id_flip_1_1+eata", "TTA over the views id_flip_1_1 + EATA adaptation"),
    (["flip", "shift1+shot"], "2-view TTA (mirror); 6-view TTA (mirror x shifts) + SHOT adaptation"),
])
def test_setting_codes_in_words(code, words):
    assert tta.setting_words(code) == words
