"""Robust training: AugMix + JSD trains on three views per image with a positive consistency
term, noise/blur changes what it should, the corruption-family augmentation never calls the
suite's own code, OOD-aware selection writes corrupted out-of-fold logits, and weights fitted
on them are never worse than the best member there."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from competition import augment, corruptions, ensemble, folds, train
from competition.runs import RunDir
from competition.specs import EnsembleSpec, PredictSpec

TINY = ["--part", "1", "--preset", "demo", "epochs=1", "train_subset=128", "model_args.widths=[8,16,16]",
        "model_args.hidden=16", "batch_size=64"]


def test_augmix_jsd_sees_three_views_and_a_positive_consistency_term(tmp_path, monkeypatch):
    from timm.loss import JsdCrossEntropy

    seen = []
    real = JsdCrossEntropy.__call__

    def spy(self, output, target):
        loss = real(self, output, target)
        n = len(target)
        assert output.shape[0] == 3 * n  # clean + 2 AugMix views of every image
        ce = torch.nn.functional.cross_entropy(output[:n], target, label_smoothing=0.1)
        seen.append((loss.item(), ce.item()))
        return loss

    monkeypatch.setattr(JsdCrossEntropy, "__call__", spy)
    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    run = train.main(TINY + dirs + ["augmix=true", "jsd=12", "label_smoothing=0.1", "noise_blur=0"])
    assert seen and all(np.isfinite(loss) for loss, _ in seen)
    assert all(loss > ce + 1e-6 for loss, ce in seen)  # the JSD term: the views differ, so it is > 0
    assert np.isfinite(pd.read_csv(RunDir(run).metrics_csv)["train_loss"]).all()


def test_augmix_views_differ_per_group_and_keep_the_batch():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8))
    a, b = augment.augmix_views(x, 2)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert not torch.equal(a, b) and not torch.equal(a, x)


def test_noise_blur_changes_the_chosen_share_of_images():
    torch.manual_seed(0)
    x = torch.randn(400, 3, 16, 16)
    out = augment.NoiseBlur(0.5, [0.25] * 3, 0.1, 1.0)(x)
    changed = (out - x).abs().flatten(1).max(1).values > 1e-6
    assert 0.4 < changed.float().mean() < 0.6 and out.shape == x.shape
    assert torch.equal(augment.NoiseBlur(0.0, [0.25] * 3)(x), x)


def test_corruption_augmentation_never_calls_the_suite(monkeypatch):
    # the local estimate must not score the training augmentation against itself
    for name in list(corruptions.CORRUPTIONS) + ["corrupt", "corrupted_copies", "make_suite"]:
        monkeypatch.setattr(corruptions, name, lambda *a, **k: pytest.fail("the suite's code was called"),
                            raising=False)
    pipe = augment.cpu_pipeline("corrupt")
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    pipe.set_random_seed(0)
    outs = [pipe(image=im)["image"] for im in images]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, im) for o, im in zip(outs, images)) > 10  # about half are corrupted
    assert corruptions.trained_on({"cpu_aug": "corrupt"}) == sorted(set(corruptions.CORRUPTIONS) - {"frost", "fog"})


def test_ood_check_selects_and_writes_corrupted_oof(tmp_path):
    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    run = RunDir(train.main(TINY + dirs + ["epochs=2", "ood_check=4", "select_on=ood"]))
    metrics = pd.read_csv(run.metrics_csv)
    index = run.oof_ood_index()
    assert "ood_acc" in metrics and index.shape == (19 * 5, 4)
    assert set(index.ravel()) <= set(run.oof_index())  # held-out rows only
    logits = np.load(run / RunDir.OOF_OOD)
    assert logits.shape == (19 * 5 * 4, 10)
    np.save(run / RunDir.OOF_OOD_INDEX, index[0])  # an older run's index: one row set for every cell
    assert run.oof_ood_index().shape == (19 * 5, 4) and (run.oof_ood_index() == index[0]).all()
    # best.pt is the epoch with the best corrupted accuracy (a tie: the later one)
    best = metrics.index[metrics["ood_acc"] == metrics["ood_acc"].max()][-1]
    assert run.summary()["best_epoch"] == int(metrics["epoch"][best])


def test_each_corruption_and_severity_checks_its_own_held_out_images():
    val = np.arange(1000, 3000)
    cells = folds.ood_check_cells(val, 20, seed=7, cells=95)
    assert cells.shape == (95, 20) and len(np.unique(cells)) == 95 * 20  # 1,900 distinct of 2,000
    assert set(cells.ravel()) <= set(val) and (np.diff(cells, axis=1) > 0).all()
    small = folds.ood_check_cells(val, 10, seed=7, cells=95)  # a smaller ood_check: a subset of each cell
    assert all(set(a) <= set(b) for a, b in zip(small, cells))
    few = folds.ood_check_cells(np.arange(50), 4, seed=7, cells=95)  # a small fold repeats images, across cells
    assert few.shape == (95, 4) and set(few.ravel()) == set(range(50))
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    rows = np.tile(np.arange(3), (95, 1)) + np.arange(95)[:, None] % 4 * 3  # cell k: images 3j..3j+2, j = k % 4
    copies = corruptions.corrupted_copies(images, 0, cells=rows)
    assert copies.shape == (95 * 3, 8, 8, 3)
    # cell k is the corruption of its own rows: the same as corrupting those images alone
    name, severity = corruptions.CORRUPTIONS[1], 2
    k = 1 * 5 + severity - 1
    assert np.array_equal(copies[3 * k:3 * k + 3], corruptions.corrupt(images[rows[k]], name, severity, 0))


def test_fitting_on_corrupted_oof_is_never_worse_than_the_best_member_there(tmp_path):
    from competition import data, predict

    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    runs = [train.main(TINY + dirs + ["epochs=2", "ood_check=4", f"name=m{i}", f"lr={lr}"])
            for i, lr in enumerate((0.05, 0.02))]
    suite = tmp_path / "suite"
    test = data.load_digits("test")
    corruptions.make_suite(test.images[:6], suite, names=["fog"], labels=test.labels[:6], workers=1)
    for r in runs:
        predict.predict_run(r, [suite], PredictSpec("flip"), test=False)
    csv = ensemble.build(runs, "o", suite, tmp_path / "subs", EnsembleSpec(tta="flip", fit_on="ood"))
    info = __import__("json").loads(csv.with_suffix(".json").read_text())
    assert info["fit_on"] == "ood" and info["oof_ood"]["rows"] == 19 * 5 * 4
    assert info["oof_ood"]["accuracy"] >= info["oof_ood"]["best_member"]
    clean = ensemble.build(runs, "c", suite, tmp_path / "subs", EnsembleSpec(tta="flip", fit_on="clean"))
    assert __import__("json").loads(clean.with_suffix(".json").read_text())["fit_on"] == "clean"


def test_augment_does_not_import_the_suite():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(augment))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("corruptions" in str(x) for x in names)
