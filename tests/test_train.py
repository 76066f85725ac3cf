"""The training engine end to end on tiny digits runs (CPU, seconds each)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from competition import data, folds, train, tta
from competition.files import CompetitionError
from competition.runs import RunDir

import background  # tests/background.py

ROOT = Path(__file__).resolve().parent.parent
TINY_CNN = ["model_args.widths=[8,16,16]", "model_args.hidden=16", "batch_size=64"]


def seven_folds(root: Path) -> list[str]:
    # 7 folds: the held-out fold (206 images) is not a multiple of the batch or of 2 processes,
    # so padding of the last shard is exercised.
    folds.write_folds(folds.folds_frame(np.asarray(data.load_digits().labels), k=7), root / "folds" / "digits.csv")
    return [f"folds_dir={root / 'folds'}", f"models_dir={root / 'models'}"]


@pytest.fixture()
def dirs(tmp_path):
    return seven_folds(tmp_path)


def run(args, dirs):
    return train.main(args + dirs)


def test_part1_writes_every_artifact(tiny_run):
    run_dir, _ = tiny_run  # the session's finished Part 1 run (conftest.py: TINY_RUN), read only
    for name in ("config.yaml", "best.safetensors", "last.safetensors", "metrics.csv", "curves.png", "oof_logits.npy", "oof_index.npy",
                 "summary.json"):
        assert (run_dir / name).exists(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert metrics["updates"].iloc[-1] == 2 * (128 // 32)  # TINY_RUN's 128 images in the demo's batches of 32
    assert np.isfinite(metrics[["train_loss", "val_loss"]].to_numpy()).all()
    oof = np.load(run_dir / "oof_logits.npy")
    frame = pd.read_csv(run_dir.parent.parent / "folds" / "digits.csv")
    assert np.array_equal(np.load(run_dir / "oof_index.npy"), np.flatnonzero(frame["fold"] == 0))
    assert oof.shape == ((frame["fold"] == 0).sum(), 10) and oof.dtype == np.float32
    # The OOF logits are the best checkpoint's: its held-out accuracy is the one logged for the
    # best epoch (the demo selects on corrupted images, so not necessarily the best val_acc).
    acc = (oof.argmax(1) == frame["label"][frame["fold"] == 0].to_numpy()).mean()
    best = RunDir(run_dir).summary()["best_epoch"]
    assert acc == pytest.approx(metrics.set_index("epoch")["val_acc"][best], abs=1e-6)
    model, cfg, data_cfg = RunDir(run_dir).load_model()
    assert data_cfg["num_classes"] == 10 and len(data_cfg["mean"]) == 3
    # The user's config is saved as given; what the data decided is saved beside it.
    assert "num_classes" not in cfg and "mean" not in cfg
    assert RunDir(run_dir).data_config() == data_cfg
    # summary.json: the plain OOF accuracy, and the TTA one (the demo's oof_tta: shift) recomputed
    # here from the best weights.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["oof_accuracy"] == pytest.approx(acc) and summary["epochs"] == 2
    rows = np.flatnonzero(frame["fold"] == 0)
    ds = data.load_digits()
    logits = tta.tta_logits(model.eval(), torch.from_numpy(ds.images[rows]), data_cfg, tta.parse_tta("shift"))
    assert summary["oof_tta"] == "shift"
    assert summary["oof_tta_accuracy"] == pytest.approx((logits.argmax(1).numpy() == ds.labels[rows]).mean(), abs=1e-6)


def test_rerun_is_skipped_and_a_changed_config_refused(tiny_run_copy):
    run_dir, args = tiny_run_copy  # a copy of the session's finished tiny run (conftest.py)
    stamp = (run_dir / "last.safetensors").stat().st_mtime_ns
    assert train.main(args) == run_dir and (run_dir / "last.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(CompetitionError, match="trained with other values of lr: "):
        train.main(args + ["lr=0.01"])


def test_part2_both_stems(dirs):
    # ood_check=1, val_subset=32 and no OOF TTA: 95 corrupted and 32 clean held-out images through each
    # ResNet-18 in its epoch instead of the demo's 950 and the whole fold, one view of the fold at the end
    tiny = ["--part", "2", "--preset", "demo", "epochs=1", "train_subset=64", "batch_size=32", "ood_check=1",
            "val_subset=32", "oof_tta=none"]
    run_dir = run(tiny, dirs)
    assert np.load(run_dir / "oof_logits.npy").shape[1] == 10
    run_dir = run(tiny + ["model_args.stem=imagenet", "image_size=48", "name=imagenet-stem"], dirs)
    assert RunDir(run_dir).load_model()[2]["image_size"] == 48


def test_part3_local_weights_and_progressive_unfreezing(dirs, random_resnet50):
    weights = random_resnet50  # models.save_random_resnet50's file (conftest.py), read only
    saved = torch.load(weights)
    # ood_check=1, val_subset=32 and no OOF TTA: 95 corrupted and 32 clean held-out images per epoch through
    # the ResNet-50 instead of the demo's 950 and the whole fold, and one view of the held-out fold at the end
    # instead of 3 (TTA: test_part1_writes_every_artifact); one update an epoch (32 images) moves what it opens
    run_dir = run(["--part", "3", "--preset", "demo", "epochs=2", "train_subset=32", "batch_size=32", "mixup=0.0",
                   "unfreeze={0: [head], 1: [layer4]}", "ema=null", f"weights={weights}", "lr=0.05", "ood_check=1",
                   "val_subset=32", "oof_tta=none"], dirs)
    trained = RunDir(run_dir).load_weights("last")["model"]
    # Epoch 1 trained the head, epoch 2 head + layer4; the stem and layers 1-3 never moved.
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer3.5.conv3.weight", "bn1.weight"):
        assert torch.equal(trained[name], saved[name]), name
    # ... and their BatchNorm statistics stayed the file's (frozen stages run in eval mode)
    for name in ("bn1.running_mean", "layer1.0.bn1.running_var", "layer3.5.bn3.running_mean"):
        assert torch.equal(trained[name], saved[name]), name
    assert not torch.equal(trained["layer4.2.bn3.running_mean"], saved["layer4.2.bn3.running_mean"])
    assert not torch.equal(trained["layer4.2.conv3.weight"], saved["layer4.2.conv3.weight"])
    assert trained["fc.weight"].shape == (10, 2048)


def test_part3_without_weights_offline_is_one_clear_error(dirs, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: patch the constant too, so no network wait
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CompetitionError, match="weights=PATH"):
        run(["--part", "3", "--preset", "demo", "epochs=1", "train_subset=32"], dirs)


def test_resume_matches_an_uninterrupted_run(uninterrupted_run, tmp_path, monkeypatch):
    """Bit for bit, from this code's checkpoints and from one Accelerate's save_state wrote (runs
    saved before the pickle-free format: the resume loads it, the next save writes the new format).
    The uninterrupted run is the session's (conftest.py: EXACT_RUN on 7 folds, these folds)."""
    from test_security import assert_pickle_free, save_like_before

    full, args = uninterrupted_run
    dirs = [f"models_dir={tmp_path / 'models'}"]
    part = run(args + ["--name", "split", "stop_after=1"], dirs)
    assert len(pd.read_csv(part / "metrics.csv")) == 1
    monkeypatch.setattr(train, "save_checkpoint", save_like_before)
    legacy = run(args + ["--name", "legacy", "stop_after=1"], dirs)
    monkeypatch.undo()
    assert RunDir.is_legacy_checkpoint(RunDir(legacy).latest_checkpoint())
    cols = ["epoch", "lr", "updates", "train_loss", "train_acc", "val_loss", "val_acc"]
    for name in ("split", "legacy"):
        part = run(args + ["--name", name, "--resume"], dirs)
        a, b = pd.read_csv(full / "metrics.csv"), pd.read_csv(part / "metrics.csv")
        pd.testing.assert_frame_equal(a[cols], b[cols])
        np.testing.assert_array_equal(np.load(full / "oof_logits.npy"), np.load(part / "oof_logits.npy"))
        assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
        for ckpt in RunDir(part).checkpoints():
            assert_pickle_free(ckpt)


def test_nan_loss_is_one_clear_error(dirs):
    with pytest.raises(CompetitionError, match="loss became"):
        run(["--part", "1", "--preset", "demo", "epochs=1", "train_subset=128", "lr=1.0e+30", "warmup_epochs=0",
             *TINY_CNN], dirs)


# The 2-process run trains 256 images (4 updates an epoch): what it checks is the launch, the
# split of each batch and the held-out fold's coverage, none of which the training set's size
# changes. ood_check=3: 285 corrupted held-out images, an odd number, so their gather pads too.
DDP_ARGS = ["--part", "1", "--preset", "demo", "epochs=2", "mixed_precision=bf16", "channels_last=true",
            "train_subset=256", "ood_check=3", *TINY_CNN]


def launch_ddp(folder: Path) -> background.Started:
    """2 DDP processes (torchrun, gloo) train epoch 1 of DDP_ARGS and stop; started when the
    session starts (conftest.py: start_early), as it spends most of its time importing torch."""
    dirs = seven_folds(folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "competition" / "train.py"), *DDP_ARGS, "stop_after=1", *dirs]
    return background.Started(cmd, folder, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, beside=True)


@pytest.mark.start_early.with_args(launch_ddp)  # with_args: a lone function argument would be decorated
def test_two_processes_bf16_channels_last_cover_the_fold_once_and_resume_on_one(early, capsys):
    """The GPU code paths on a CPU: 2 DDP processes (gloo), bf16 autocast, channels-last, the
    global batch split in two; then the checkpoint they wrote resumes in one process (this one:
    a 1-process run is the same code in or out of a subprocess)."""
    out = early.result()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2 process(es) on cpu:0, bf16 autocast" in out.stdout
    assert "batch 64 per update (global) = 2 process(es) x 32 images" in out.stdout
    dirs = [f"folds_dir={early.folder / 'folds'}", f"models_dir={early.folder / 'models'}"]
    run_dir = early.folder / "models" / "part1-demo-digits-f0-s0"
    from safetensors.torch import load_file
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert not [k for k in load_file(ckpt / "model.safetensors") if k.startswith(("module.", "_orig_mod."))]
    assert RunDir.checkpoint_rng(ckpt, 0).exists() and RunDir.checkpoint_rng(ckpt, 1).exists()  # one per process
    assert not (run_dir / "oof_index.npy").exists()  # stopped after epoch 1: the OOF files come from the resume

    try:
        train.main(DDP_ARGS + ["--resume", *dirs])
    finally:
        from competition import runtime

        runtime.make_accelerator("no")  # Accelerate's process-wide precision back to fp32 for the next tests
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
    index = np.load(run_dir / "oof_index.npy")
    frame = pd.read_csv(early.folder / "folds" / "digits.csv")
    assert len(index) == len(np.unique(index))
    assert np.array_equal(index, np.flatnonzero(frame["fold"] == 0))
    assert np.load(run_dir / "oof_logits.npy").shape == (len(index), 10)
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 2


def test_compile_keeps_parameter_names(dirs, monkeypatch):
    """With compile: true, unfreezing by name and loading best.pt after the run work. The eager
    backend keeps the test fast: the names come from torch.compile's wrapper, not its backend."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, backend="eager"))
    run_dir = run(["--part", "1", "--preset", "demo", "epochs=2", "train_subset=128", "compile=true",
                   "unfreeze={0: ['1'], 1: [all]}", *TINY_CNN], dirs)
    best = RunDir(run_dir).load_weights("best")["model"]
    assert not [k for k in best if "_orig_mod" in k]
    assert (run_dir / "summary.json").exists()
