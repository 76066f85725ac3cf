"""Nothing lost, nothing silent: every bad input or interruption a user can cause gets one clear
message that names the file or key and the fix, and whatever was good before is unchanged
(compared by file hashes)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from competition import data, ensemble, folds, predict, runtime, submit, train
from competition.files import CompetitionError, Interrupted, check_writable
from competition.runs import RunDir, run_name

import background  # tests/background.py

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--part", "1", "--preset", "demo", "epochs=2", "train_subset=128", "model_args.widths=[8,16,16]",
        "model_args.hidden=16"]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(tiny_run_copy):
    """A private copy of the session's finished tiny run (conftest.py: TINY_RUN, the same as TINY):
    (run dir, train args that address it)."""
    return tiny_run_copy


# ---------------------------------------------------------------------------- configs: checked before anything is written


@pytest.mark.parametrize("bad, key", [("model=nosuchnet", "nosuchnet"), ("epochs=abc", "epochs"),
                                      ("lr=abc", "lr"), ("lr=-0.1", "lr"), ("batch_size=0", "batch_size"),
                                      ("epochs=0", "epochs"), ("image_size=7", "image_size"),
                                      ("image_size=0", "image_size"), ("image_size=-5", "image_size"),
                                      ("image_size=33.5", "image_size"), ("image_size=1000", "image_size"),
                                      ("model_args.widths=[8,8,8,8,8,8]", "cannot take 32x32"),
                                      ("lr=1e400", "lr=inf: must be a finite number"),  # YAML reads it as inf
                                      ("model_args.dropout=1.5", "model_args .*dropout probability"),
                                      ("model_args.hidden=-1", "model_args .*negative dimension"),
                                      ("model_args.widths=[1000000000000,8,8]", "too large for this machine")])
def test_force_with_a_bad_config_changes_nothing(copy, bad, key):
    run_dir, args = copy
    before = hashes(run_dir)
    with pytest.raises(CompetitionError, match=key):
        train.main(args + ["--force", bad])
    assert hashes(run_dir) == before  # best.pt, last.pt, OOF logits, checkpoints: all still there


def test_a_bad_config_leaves_no_folder_and_the_fix_runs(tmp_path):
    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    with pytest.raises(CompetitionError, match="epochs"):
        train.main(TINY + dirs + ["epochs=abc", "name=r"])
    assert not (tmp_path / "models" / "r").exists()  # no config.yaml to refuse the corrected command
    assert RunDir(train.main(TINY + dirs + ["epochs=1", "name=r"])).finished


def test_force_moves_the_old_run_aside_until_the_new_one_has_an_epoch(copy, monkeypatch):
    run_dir, args = copy
    before = hashes(run_dir)
    # The new run fails after its data and model are up, before finishing an epoch: the old one is back.
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train.main(args + ["--force"])
    assert hashes(run_dir) == before and not list(run_dir.parent.glob(f".{run_dir.name}.replaced*"))
    monkeypatch.undo()
    train.main(args + ["--force", "lr=0.05"])  # a clean retrain replaces it, and the aside copy is gone
    assert RunDir(run_dir).config()["lr"] == 0.05
    assert not list(run_dir.parent.glob(f".{run_dir.name}.replaced*"))


# ---------------------------------------------------------------------------- one process per run folder


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(copy, capsys):
    run_dir, args = copy
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                   "since": "now"}))
        before = hashes(run_dir)
        for extra in ([], ["--resume"], ["--force"]):
            with pytest.raises(CompetitionError, match=f"being trained by process {sleeper.pid}"):
                train.main(args + extra)
        with pytest.raises(CompetitionError, match=f"being trained by process {sleeper.pid}"):
            predict.predict_run(run_dir, [])
        assert hashes(run_dir) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # now the holder is dead: the lock is stale, taken over with a message, and removed at the end
    assert train.main(args) == run_dir
    assert f"lock of pid {sleeper.pid}, which is no longer running" in capsys.readouterr().out
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------------------- completion, resume, checkpoints


def test_a_run_without_summary_is_never_already_trained(copy):
    run_dir, args = copy
    (run_dir / "summary.json").unlink()  # e.g. SIGINT after last.pt, before the OOF files
    (run_dir / "oof_logits.npy").unlink()
    with pytest.raises(CompetitionError, match="partial run .*--resume"):
        train.main(args)
    train.main(args + ["--resume"])  # nothing left to train: it writes the OOF logits and the summary
    assert (run_dir / "oof_logits.npy").exists() and RunDir(run_dir).finished


def _emptied(data: bytes) -> bytes:
    return b""


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bad_json(data: bytes) -> bytes:
    return data[:-1]  # a copy cut short by one byte: no closing brace


@pytest.mark.parametrize("name, damage, why", [
    ("random_states_0.safetensors", _emptied, "SafetensorError"),  # Accelerate would only log it and go on
    ("optimizer.safetensors", _cut, "SafetensorError"),
    ("state.json", _bad_json, "JSONDecodeError"),
    ("optimizer.json", lambda d: b'{"state": {}}', "ValueError: not a dict with param_groups, state")])
def test_resume_falls_back_past_a_broken_checkpoint(copy, capsys, name, damage, why):
    run_dir, args = copy
    (run_dir / "summary.json").unlink()
    newest, older = RunDir(run_dir).checkpoints()[-1], RunDir(run_dir).checkpoints()[-2]
    (newest / name).write_bytes(damage((newest / name).read_bytes()))
    stale = run_dir / "checkpoints" / "checkpoint_2.tmp"  # a save a crash cut short: never resumed from
    stale.mkdir()
    train.main(args + ["--resume"])
    out = capsys.readouterr().out
    assert f"{newest.name} cannot be resumed from ({name} does not load ({why}" in out
    assert f"falling back to {older.name}" in out and f"resumed from {older}" in out
    assert (run_dir / "broken-checkpoints" / newest.name).exists()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]  # epoch 2 trained again from the intact checkpoint
    assert [c.name for c in RunDir(run_dir).checkpoints()] == ["checkpoint_0", "checkpoint_1"]
    assert not stale.exists()  # the next save cleared it


def test_a_checkpoint_round_trips_bit_exactly(tmp_path):
    """save_checkpoint then load_checkpoint into a fresh learner gives back every tensor bit for bit
    and every other value with its type (Adam's betas stay a tuple), the RNG states included; the
    newest two checkpoints are kept."""
    import random
    from types import SimpleNamespace

    import torch
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from torch import nn

    from competition import checkpoints
    from test_security import assert_pickle_free

    accelerator = runtime.make_accelerator("no")

    def learner(seed):  # what save_checkpoint and load_checkpoint read of a competition.learner.Learner
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
        opt = torch.optim.AdamW([{"params": list(net[:2].parameters()), "weight_decay": 0.0},
                                 {"params": list(net[3].parameters())}], lr=0.1)
        sched = CosineLRScheduler(opt, t_initial=3, warmup_t=0.5, warmup_lr_init=1e-5, t_in_epochs=False)
        model, opt = accelerator.prepare(net, opt)
        return SimpleNamespace(model=model, net=net, optimizer=opt, scheduler=sched, ema=ModelEmaV3(net, decay=0.9))

    a, state, run = learner(0), checkpoints.LoopState(), RunDir(tmp_path / "run")
    for update in range(1, 3):
        a.model(torch.randn(4, 3, 32, 32)).sum().backward()
        a.optimizer.step()
        a.scheduler.step_update(update / 10)
        a.ema.update(a.net, step=update)
    state.epoch, state.step, state.processes = 1, 2, 1
    state.history = [{"epoch": 1, "val_acc": np.float64(0.25), "ood_acc": np.float32(0.5), "val_loss": float("nan")}]
    accelerator.step = 3
    for _ in range(2):
        checkpoints.save_checkpoint(run, a, state, accelerator)
    (run.checkpoint_dir / "checkpoint_7.tmp").mkdir()  # a save a crash cut short
    random.random(), np.random.rand(), torch.rand(1)  # RNG states as they are at the save
    want = dict(rng=(random.getstate(), np.random.get_state(), torch.get_rng_state()),
                model=a.net.state_dict(), opt=a.optimizer.state_dict(), sched=a.scheduler.state_dict(),
                ema=a.ema.state_dict(), loop=state.state_dict())
    ckpt = checkpoints.save_checkpoint(run, a, state, accelerator)
    assert ckpt.name == "checkpoint_2" and [c.name for c in run.checkpoints()] == ["checkpoint_1", "checkpoint_2"]
    assert not run.stale_checkpoint_tmps()
    assert_pickle_free(ckpt)
    assert (ckpt / RunDir.CKPT_EMA).exists()

    random.random(), np.random.rand(), torch.rand(1)
    accelerator.step = 0
    b, loaded = learner(1), checkpoints.LoopState()
    checkpoints.load_checkpoint(ckpt, b, loaded, accelerator)
    assert random.getstate() == want["rng"][0] and torch.equal(torch.get_rng_state(), want["rng"][2])
    np_state = np.random.get_state()
    assert np_state[0] == want["rng"][1][0] and np.array_equal(np_state[1], want["rng"][1][1])
    assert np_state[2:] == want["rng"][1][2:]
    assert accelerator.step == 3

    def same(x, y):
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y.to(x.device))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, np.generic):  # JSON gives a Python number back, of the same value
            return x.item() == y
        if isinstance(x, float) and x != x:
            return isinstance(y, float) and y != y
        return type(x) is type(y) and x == y

    assert same(want["model"], b.net.state_dict()) and same(want["ema"], b.ema.state_dict())
    assert same(want["opt"], b.optimizer.state_dict()) and same(want["sched"], b.scheduler.state_dict())
    assert isinstance(b.optimizer.state_dict()["param_groups"][0]["betas"], tuple)
    assert same(want["loop"], loaded.state_dict())


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import safetensors.torch
    import torch
    from safetensors import SafetensorError
    from torch import nn

    from competition import checkpoints

    accelerator = runtime.make_accelerator("no")
    net = nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = SimpleNamespace(state_dict=lambda: {})
    learner = SimpleNamespace(net=net, optimizer=opt, scheduler=sched, ema=None)
    run = RunDir(tmp_path / "run")
    first = checkpoints.save_checkpoint(run, learner, checkpoints.LoopState(), accelerator)

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CompetitionError, match=r"no space left on the device while saving a checkpoint in .*run/"
                                               r"checkpoints .*free space, then --resume"):
        checkpoints.save_checkpoint(run, learner, checkpoints.LoopState(), accelerator)
    assert run.checkpoints() == [first] and not run.stale_checkpoint_tmps()


def test_resume_with_no_complete_checkpoint_is_one_error(copy):
    run_dir, args = copy
    (run_dir / "summary.json").unlink()
    for ckpt in RunDir(run_dir).checkpoints():
        data_file = ckpt / "model.safetensors"
        data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    with pytest.raises(CompetitionError, match="no checkpoint .* loads completely .*model.safetensors does not load"):
        train.main(args + ["--resume"])


def test_resume_refuses_a_changed_config_and_a_finished_run_is_left_alone(copy):
    run_dir, args = copy
    before = hashes(run_dir)
    with pytest.raises(CompetitionError, match="other values of epochs, lr"):
        train.main(args + ["--resume", "epochs=4", "lr=0.2"])
    train.main(args + ["--resume"])  # finished, same config: nothing to resume, nothing rewritten
    assert hashes(run_dir) == before


# ---------------------------------------------------------------------------- stop requests


def test_stop_mid_epoch_checkpoints_and_resume_is_exact(uninterrupted_run, tmp_path, monkeypatch):
    # the uninterrupted run is the session's (conftest.py: EXACT_RUN, 256 images in batches of 64)
    full, args = uninterrupted_run
    args = args + [f"models_dir={tmp_path / 'models'}"]
    real, calls = runtime.StopRequest.now, {"n": 0}

    def stop_in_epoch_2(self, accelerator, step):  # 4 steps an epoch (256 / 64): call 7 is epoch 2, step 2
        calls["n"] += 1
        if calls["n"] == 7:
            self.name = "SIGINT"
        return real(self, accelerator, step)

    monkeypatch.setattr(runtime.StopRequest, "now", stop_in_epoch_2)
    with pytest.raises(Interrupted, match=r"SIGINT in epoch 2 at step 2; checkpoint saved in .*checkpoint_1; "
                                          r"continue exactly with `python -m competition.train .* --resume`"):
        train.main(args + ["name=cut"])
    monkeypatch.undo()
    cut = RunDir(tmp_path / "models" / "cut")
    assert not cut.finished and not (cut.path / ".lock").exists()
    with pytest.raises(CompetitionError, match="partial run"):
        train.main(args + ["name=cut"])
    train.main(args + ["name=cut", "--resume"])
    cols = ["epoch", "lr", "updates", "train_loss", "train_acc", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(pd.read_csv(full / "metrics.csv")[cols], pd.read_csv(cut.metrics_csv)[cols])
    np.testing.assert_array_equal(np.load(full / "oof_logits.npy"), np.load(cut.path / "oof_logits.npy"))


def interrupt_after_epoch_1(line, proc):
    if line.startswith("epoch 1/50"):
        proc.send_signal(signal.SIGINT)


def launch_sigint(folder: Path) -> background.Started:
    """`python -m competition.train` on every training image for 50 epochs, sent SIGINT as soon as it
    prints epoch 1's line (so in epoch 2). Started with the session (conftest.py: start_early)."""
    dirs = [f"folds_dir={folder / 'folds'}", f"models_dir={folder / 'models'}"]
    cmd = [sys.executable, "-m", "competition.train", *TINY, *dirs, "epochs=50", "train_subset=null", "name=s"]
    return background.Started(cmd, folder, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              on_line=interrupt_after_epoch_1, beside=True)


@pytest.mark.start_early.with_args(launch_sigint)  # with_args: a lone function argument would be decorated
def test_sigint_mid_epoch_exits_130_with_the_resume_command(early):
    proc = early.result()
    err = proc.stderr
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "continue exactly with `python -m competition.train" in err
    assert "--resume`" in err
    run = RunDir(early.folder / "models" / "s")
    assert run.latest_checkpoint() is not None and not run.finished and not (run.path / ".lock").exists()


# ---------------------------------------------------------------------------- OOD sets: exact


@pytest.fixture(scope="module")
def predicted_once(tiny_run, tmp_path_factory):
    """A copy of the session's tiny run predicted on a 3-file local suite (corruptions.json names 3
    files), made once for the module: (folder holding the copy in w/ and the suite in suite/, run name).
    Read only: `predicted` hands each test its own copy (checked when the module ends)."""
    from competition import corruptions

    src, _ = tiny_run
    root = tmp_path_factory.mktemp("predicted")
    shutil.copytree(src.parent.parent, root / "w")
    images = data.load_digits("test").images[:8]
    corruptions.make_suite(images, root / "suite", names=["brightness", "contrast", "fog"],
                           labels=np.arange(8) % 10, workers=1)
    predict.predict_run(root / "w" / "models" / src.name, [root / "suite"], test=False)
    before = hashes(root)
    yield root, src.name
    assert hashes(root) == before, "a test wrote into predicted_once: work on `predicted`"


@pytest.fixture
def predicted(predicted_once, tmp_path):
    """(run dir, suite): a private copy of predicted_once's run, predictions and suite in tmp_path
    (predictions are keyed by the suite's contents, so its copy reuses them)."""
    root, name = predicted_once
    for sub in ("w", "suite"):
        shutil.copytree(root / sub, tmp_path / sub)
    return tmp_path / "w" / "models" / name, tmp_path / "suite"


def test_a_missing_extra_or_short_ood_file_is_refused_everywhere(predicted, tmp_path):
    run_dir, suite = predicted
    good = (suite / "distortion02.npy").read_bytes()
    csv = ensemble.build([run_dir], "ok", suite, tmp_path / "subs")
    cases = {  # what a user does to the folder -> what every stage says
        "missing": (lambda: (suite / "distortion02.npy").unlink(), "missing distortion02.npy"),
        "extra": (lambda: np.save(suite / "distortion03.npy", np.zeros((40, 32, 32, 3), np.uint8)),
                  "unexpected distortion03.npy"),
        "short": (lambda: np.save(suite / "distortion02.npy", np.zeros((35, 32, 32, 3), np.uint8)),
                  r"distortion02.npy \(35\) rows, but the other files have 40"),
    }
    for what, (damage, message) in cases.items():
        damage()
        for stage in (lambda: predict.predict_run(run_dir, [suite], test=False),
                      lambda: ensemble.build([run_dir], f"x-{what}", suite, tmp_path / "subs"),
                      lambda: submit.check_submission(csv, ood_dir=suite, num_classes=10)):
            with pytest.raises(CompetitionError, match=message):
                stage()
        assert not (tmp_path / "subs" / f"x-{what}.csv").exists()
        (suite / "distortion03.npy").unlink(missing_ok=True)
        (suite / "distortion02.npy").write_bytes(good)


def test_cifar100_runs_need_the_competitions_shape(predicted, tmp_path, monkeypatch):
    run_dir, suite = predicted
    real = tmp_path / "ood-test"  # not a suite: the competition's files, here with 3 files of 40 rows
    real.mkdir()
    for f in suite.glob("distortion*.npy"):
        (real / f.name).write_bytes(f.read_bytes())
    cfg = RunDir(run_dir).config()
    monkeypatch.setattr(RunDir, "config", lambda self: {**cfg, "dataset": "cifar100"})
    with pytest.raises(CompetitionError, match="missing distortion03.npy.*the competition has 19 files"):
        ensemble.build([run_dir], "c", real, tmp_path / "subs")
    assert data.OodSet.required_shape(real, ["cifar100"], allow_partial=True) is None
    assert data.OodSet.required_shape(suite, ["cifar100"]) is None  # a local suite is never the real set


def test_ensemble_refuses_logits_of_replaced_weights(predicted, tmp_path):
    run_dir, suite = predicted
    best = RunDir(run_dir).weights("best")
    last = RunDir(run_dir).weights("last").read_bytes()
    best.write_bytes(last)  # e.g. copied over from another run, or retrained by hand
    with pytest.raises(CompetitionError, match=r"predicted with another best\.safetensors .*competition.predict"):
        ensemble.build([run_dir], "stale", suite, tmp_path / "subs")
    assert not (tmp_path / "subs" / "stale.csv").exists()
    predict.predict_run(run_dir, [suite], test=False)  # predict notices the new weights and redoes its outputs
    assert ensemble.build([run_dir], "fresh", suite, tmp_path / "subs").exists()


@pytest.mark.parametrize("which", ["oof", "ood"])
def test_non_finite_logits_are_refused_before_a_submission(predicted, tmp_path, which):
    run_dir, suite = predicted
    rd = RunDir(run_dir)
    setting = rd.settings()[0]
    path = rd.pred_dir(setting) / "oof.npy" if which == "oof" else rd.ood_logits_paths(data.OodSet(suite), setting)[1]
    z = np.load(path)
    z[0, 0] = np.nan if which == "oof" else np.inf  # same size: the manifest still matches
    np.save(path, z)
    with pytest.raises(CompetitionError, match=rf"{path.name} holds NaN or infinite logits \(1 values\): rerun predict"):
        ensemble.build([run_dir], "nan", suite, tmp_path / "subs")
    assert not (tmp_path / "subs").exists() or not list((tmp_path / "subs").iterdir())


@pytest.mark.parametrize("name", ["oof_index.npy", "oof_ood_index.npy", "pred/shift/oof.npy"])
def test_an_object_array_in_a_run_is_one_error(predicted, tmp_path, name):
    run_dir, suite = predicted
    np.save(run_dir / name, np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(CompetitionError, match=rf"{Path(name).name} is not a plain numeric .npy file .*delete it"):
        ensemble.build([run_dir], "obj", suite, tmp_path / "subs")


def test_a_data_config_without_a_key_is_one_error_before_predict_writes(copy):
    import yaml

    run_dir, _ = copy
    path = run_dir / "data_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    del cfg["ood_check_seed"]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(CompetitionError, match=r"data_config.yaml lacks ood_check_seed .*retrain the run"):
        predict.predict_run(run_dir, [], test=False)
    assert not (run_dir / RunDir.PRED).exists()


def test_a_summary_json_that_is_a_list_is_flagged_on_the_board(copy):
    from competition import board

    run_dir, _ = copy
    (run_dir / "summary.json").write_text("[1, 2]")
    rows = board.run_rows(run_dir.parent)
    assert rows[0]["state"].startswith("broken: ") and "summary.json holds a JS" in rows[0]["state"]


@pytest.mark.parametrize("bad", ["99:99", "f1:-8", "0:100"])
def test_a_tta_shift_beyond_the_image_is_one_error(bad):
    from competition import tta

    with pytest.raises(CompetitionError, match=rf"--tta '{bad}': .*more than 7 pixels"):
        tta.parse_tta(bad)
    assert tta.parse_tta("7:-7,f-7:7") == [(False, 7, -7), (True, -7, 7)]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_folds_refuse_a_non_finite_measure_n(tmp_path, bad):
    with pytest.raises(CompetitionError, match=rf"--measure-n {bad}: a count of images"):
        folds.main([f"--measure-n={bad}", "--folds-dir", str(tmp_path / "folds")])
    assert not (tmp_path / "folds").exists()


# ---------------------------------------------------------------------------- data


def test_a_dataset_needs_two_classes_and_every_fold_every_class(tmp_path):
    from PIL import Image

    root = tmp_path / "one"
    (root / "cat").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(root / "cat" / f"{i}.png")
    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}", f"data_dir={tmp_path / 'd'}"]
    with pytest.raises(CompetitionError, match=r"1 class \(\['cat'\]\); a classifier needs at least 2"):
        train.main(["--part", "1", "--preset", "demo", "dataset=imagefolder", f"data={root}", *dirs])
    labels = data.load_digits().labels
    frame = folds.folds_frame(labels)
    frame.loc[(frame["fold"] == 0) & (frame["label"] == 3), "fold"] = 1  # fold 0 loses every 3
    folds.write_folds(frame, tmp_path / "folds" / "digits.csv")
    with pytest.raises(CompetitionError, match=r"held-out fold 0 hold no image of class\(es\) \[3\]"):
        train.main(TINY + dirs)


# ---------------------------------------------------------------------------- CSVs and folders


def test_csv_encodings_and_missing_rows(tmp_path):
    rows = [10, 10]
    csv = submit.write_submission(tmp_path / "s.csv", np.arange(20) % 10, rows)
    text = csv.read_text()
    (tmp_path / "latin1.csv").write_bytes(text.replace("distortion00_1_0", "distortion00_1_0\u00e9").encode("latin-1"))
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    with pytest.raises(CompetitionError, match=r"latin1.csv is not UTF-8 \(byte 0xe9 .*CSV UTF-8"):
        submit.check_submission(tmp_path / "latin1.csv")
    with pytest.raises(CompetitionError, match="utf16.csv is UTF-16 encoded"):
        submit.check_submission(tmp_path / "utf16.csv")
    assert len(submit.check_submission(tmp_path / "bom.csv", num_classes=10)) == 20  # Excel's BOM is fine
    (tmp_path / "short.csv").write_text("\n".join(text.splitlines()[:-3]) + "\n")  # its last rows are gone
    with pytest.raises(CompetitionError, match="distortion01 has 7 rows but the other files have 10: rows are missing"):
        submit.check_submission(tmp_path / "short.csv", num_classes=10)


def test_an_unwritable_models_folder_is_one_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CompetitionError, match="cannot write in .*file/models .*choose another models_dir"):
        train.main(TINY + [f"models_dir={blocker / 'models'}", f"folds_dir={tmp_path / 'folds'}"])
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # as root, chmod cannot make a folder read-only
    with pytest.raises(CompetitionError, match=r"cannot write in .*\(Permission denied\)"):
        check_writable(tmp_path / "ro", "models_dir")


def test_run_names_carry_the_dataset():
    base = {"preset": "part1-demo", "fold": 0, "seed": 0, "name": None, "data": None}
    assert run_name({**base, "dataset": "digits"}) == "part1-demo-digits-f0-s0"
    assert run_name({**base, "dataset": "imagefolder", "data": "/x/my data/digits set.tar.gz"}) == \
        "part1-demo-digits-set-f0-s0"
    assert run_name({**base, "dataset": "digits", "name": "mine"}) == "mine"


def launch_run_sh_dry_run(folder: Path) -> background.Started:
    """./run.sh --dry-run from another folder, relative paths (PYTHON: the interpreter run.sh execs,
    default `python` from PATH, is the one running the tests). Started with the session."""
    (folder / "my data").mkdir(parents=True)
    return background.Started([str(ROOT / "run.sh"), "--dry-run", "--dataset", "imagefolder", "--data",
                               "my data/digits set.tar.gz", "--ood-dir", "ood/x", "--parts", "1", "epochs=2"], folder,
                              timeout=120, cwd=folder, env={**os.environ, "PYTHON": sys.executable}, beside=True)


@pytest.mark.start_early.with_args(launch_run_sh_dry_run)
def test_run_sh_resolves_paths_from_the_caller_and_prints_an_absolute_csv(early, tmp_path, monkeypatch, capsys):
    out = early.result()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "submissions" / "digits-set-full-p1.csv")
    calls = out.stderr
    assert f"data={early.folder}/my data/digits set.tar.gz" in calls and f"--ood-dir {early.folder}/ood/x" in calls
    assert "epochs=2" in calls and "models/part1-digits-set-f0-s0" in calls
    # A bad name is refused by the parser run.sh hands its arguments to: checked in this process
    # (the shell's pass-through of arguments and exit status is the call above and test_run_sh.py).
    from competition import pipeline
    from competition.files import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.subprocess, "run", lambda *a, **k: pytest.fail(f"a stage ran: {a}"))
    with pytest.raises(SystemExit) as bad:
        cli(pipeline.main)(["--name", "my sub"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "--name 'my sub' must be letters" in err
    assert "====" not in err  # refused before any stage ran
