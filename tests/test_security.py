"""Nothing runs from a file a user was sent: a weights file, a checkpoint to resume or a CIFAR
folder that carries a pickle payload is refused before it can run, and the payload's marker
file never appears. Checkpoints hold no pickle at all (safetensors and JSON); one Accelerate
wrote for a run saved before is read weights-only before it is resumed."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from competition import data, train
from competition.files import CompetitionError
from competition.runs import RunDir

TINY = ["--part", "1", "--preset", "demo", "epochs=2", "train_subset=128", "model_args.widths=[8,16,16]",
        "model_args.hidden=16"]


class Payload:
    """Unpickling this runs `touch MARKER` (what a hostile file would do with worse commands)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def run_copy(tiny_run_copy):
    """A private copy of the session's finished tiny run (conftest.py: TINY_RUN, the same as TINY):
    (run dir, [folds_dir=..., models_dir=...] that address the copy)."""
    run_dir, args = tiny_run_copy
    return run_dir, [a for a in args if a.startswith(("folds_dir=", "models_dir="))]


def test_a_planted_best_pt_is_refused_unrun(run_copy, tmp_path):
    run_dir, _ = run_copy
    marker = tmp_path / "pwned"
    good = RunDir(run_dir).load_weights("best")
    torch.save({**good, "metrics": Payload(marker)}, run_dir / "best.pt")
    assert RunDir(run_dir).weights("best").name == "best.safetensors"  # the run's own weights, not a planted .pt
    RunDir(run_dir).load_model()
    (run_dir / "best.safetensors").unlink()  # a run saved before safetensors: its best.pt is read weights-only
    with pytest.raises(CompetitionError, match="holds more than weights"):
        RunDir(run_dir).load_model()
    with pytest.raises(CompetitionError, match="holds more than weights"):  # what init_from / selftrain reads
        RunDir(run_dir).load_weights("best")
    assert not marker.exists()


def test_weights_round_trip_exactly_and_old_runs_still_load(run_copy):
    run_dir, _ = run_copy
    rd = RunDir(run_dir)
    w = rd.load_weights("best")
    torch.save(w, run_dir / "best.pt")  # the format of runs saved before safetensors
    (run_dir / "best.safetensors").unlink()
    old = rd.load_weights("best")
    assert rd.weights("best").name == "best.pt" and old["config"] == w["config"]
    assert all(torch.equal(old["model"][k], v) for k, v in w["model"].items())
    rd.save_weights("best", old["model"], old["config"], old["data_config"], old["metrics"])
    assert rd.weights("best").name == "best.safetensors" and not (run_dir / "best.pt").exists()  # no stale copy
    new = rd.load_weights("best")
    assert new["model"].keys() == w["model"].keys() and all(torch.equal(new["model"][k], v) for k, v in w["model"].items())
    assert (new["config"], new["data_config"], new["metrics"]) == (w["config"], w["data_config"], w["metrics"])


def save_like_before(run: RunDir, learner, state, accelerator):
    """What train.py wrote before the pickle-free checkpoints (monkeypatched over
    train.save_checkpoint): Accelerate's save_state, with model.safetensors, optimizer.bin,
    custom_checkpoint_0/1(/2).pkl (scheduler, LoopState, EMA) and random_states_0.pkl."""
    if not accelerator._custom_objects:
        accelerator.register_for_checkpointing(learner.scheduler, state,
                                               *([learner.ema] if learner.ema is not None else []))
    path, _ = run.next_checkpoint()
    accelerator.save_state(str(path))
    return path


def assert_pickle_free(ckpt: Path) -> None:
    """A checkpoint folder of the current format: safetensors and JSON only, nothing torch.load
    or pickle would read (a pickle starts with its protocol byte 0x80, torch.save's zip with PK)."""
    from safetensors import safe_open

    assert (ckpt / RunDir.CKPT_STATE).exists() and not RunDir.is_legacy_checkpoint(ckpt), ckpt
    for f in sorted(ckpt.iterdir()):
        assert f.suffix in (".safetensors", ".json"), f
        assert not f.read_bytes()[:4].startswith((b"\x80", b"PK")), f
        if f.suffix == ".json":
            assert isinstance(json.loads(f.read_text()), dict), f
        else:
            with safe_open(str(f), framework="pt") as st:
                assert list(st.keys()), f


def test_checkpoints_hold_no_pickle(tiny_run):
    run_dir, _ = tiny_run
    ckpts = RunDir(run_dir).checkpoints()
    assert [c.name for c in ckpts] == ["checkpoint_0", "checkpoint_1"]
    for ckpt in ckpts:
        assert_pickle_free(ckpt)
        assert sorted(f.name for f in ckpt.iterdir()) == sorted([
            RunDir.CKPT_MODEL, RunDir.CKPT_OPTIMIZER, RunDir.CKPT_OPTIMIZER_JSON, RunDir.CKPT_STATE,
            RunDir.checkpoint_rng(ckpt, 0).name])  # no EMA in this run


def test_a_pickle_planted_in_a_checkpoint_is_never_read(run_copy, tmp_path, capsys):
    run_dir, dirs = run_copy
    marker = tmp_path / "pwned"
    (run_dir / "summary.json").unlink()
    newest = RunDir(run_dir).checkpoints()[-1]
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        torch.save(Payload(marker), newest / name)  # what Accelerate's load_state would have unpickled
    train.main(TINY + dirs + ["--resume"])
    assert f"resumed from {newest} " in capsys.readouterr().out  # this format: only its own files are read
    assert not marker.exists() and RunDir(run_dir).finished


@pytest.mark.parametrize("planted", ["random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_planted_legacy_checkpoint_file_is_never_loaded_on_resume(tmp_path, planted, capsys, monkeypatch):
    """Checkpoints Accelerate wrote (runs saved before) resume through its load_state, which reads
    custom_checkpoint_*.pkl with weights_only=False: every pickle is read weights-only first."""
    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    monkeypatch.setattr(train, "save_checkpoint", save_like_before)
    run_dir = train.main(TINY + dirs)
    monkeypatch.undo()
    older, newest = RunDir(run_dir).checkpoints()
    assert RunDir.is_legacy_checkpoint(older) and RunDir.is_legacy_checkpoint(newest)
    (run_dir / "summary.json").unlink()
    marker = tmp_path / "pwned"
    good = (older / planted).read_bytes()
    for ckpt in (older, newest):
        torch.save(Payload(marker), ckpt / planted)
    with pytest.raises(CompetitionError, match=f"no checkpoint .* loads completely .*{planted} does not load as "
                                               f"plain weights"):
        train.main(TINY + dirs + ["--resume"])
    (older / planted).write_bytes(good)
    train.main(TINY + dirs + ["--resume"])  # falls back to the older, intact checkpoint
    assert f"{newest.name} cannot be resumed from ({planted} does not load as plain weights" in capsys.readouterr().out
    assert not marker.exists() and RunDir(run_dir).finished
    assert_pickle_free(RunDir(run_dir).latest_checkpoint())  # the save after a legacy resume: this format


def test_a_planted_cifar_pickle_is_refused_unrun(tmp_path):
    from test_data import write_cifar100

    write_cifar100(tmp_path / "d")
    assert data.load("cifar100", "train", tmp_path / "d").images.shape == (6, 32, 32, 3)  # the real layout loads
    marker = tmp_path / "pwned"
    with open(tmp_path / "d" / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": Payload(marker)}, f)
    with pytest.raises(CompetitionError, match="posix.system|os.system|nt.system"):
        data.load("cifar100", "train", tmp_path / "d")
    assert not marker.exists()
    with open(tmp_path / "d" / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump([np.zeros(3)], f)  # arrays pass the unpickler, but a list is no batch
    with pytest.raises(CompetitionError, match="not a CIFAR batch dict"):
        data.load("cifar100", "train", tmp_path / "d")


@pytest.mark.parametrize("name", ["../x", "a/../../b", ".", "..", "/tmp/x", "x=y", "a b"])
def test_a_run_name_cannot_reach_outside_models_dir(tmp_path, name):
    with pytest.raises(CompetitionError, match="config name"):
        train.main(TINY + [f"folds_dir={tmp_path / 'f'}", f"models_dir={tmp_path / 'models'}", f"name={name}",
                           "--force"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "models").exists()


def test_names_and_destructive_targets_in_one_place(tmp_path):
    from competition.files import check_inside, check_name

    assert check_name("ablations/lr/0.1", "name", nested=True) and check_name("p23-st1", "--name")
    with pytest.raises(CompetitionError):
        check_name("ablations/lr", "--name")  # a submission name is one file name
    with pytest.raises(CompetitionError, match="not inside"):
        check_inside(tmp_path, tmp_path, "--force")
    with pytest.raises(CompetitionError, match="not inside"):
        check_inside(tmp_path / "models" / ".." / "other", tmp_path / "models", "--force")
    assert check_inside(tmp_path / "models" / "run", tmp_path / "models", "--force").name == "run"


def test_ood_files_of_another_size_and_impossible_labels_are_refused(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"distortion{i:02d}.npy", np.zeros((10, 32 if i != 1 else 28, 32 if i != 1 else 28, 3),
                                                            np.uint8))
    with pytest.raises(CompetitionError, match=r"distortion01.npy \(28x28\) images"):
        data.OodSet(tmp_path)
    np.save(tmp_path / "distortion01.npy", np.zeros((10, 32, 32, 3), np.uint8))
    ood = data.OodSet(tmp_path)
    assert ood.image_size == (32, 32) and ood.labels is None
    for bad in (np.array([0, 1, 2]), np.array([0, -1]), np.array([0.5, 1.0])):
        np.save(tmp_path / "labels.npy", bad)
        with pytest.raises(CompetitionError, match="labels.npy"):
            data.OodSet(tmp_path).labels
    np.save(tmp_path / "labels.npy", np.array([0, 3]))
    assert data.OodSet(tmp_path).labels.tolist() == [0, 3]


def test_resume_force_never_continues_under_changed_settings(run_copy):
    run_dir, dirs = run_copy
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(CompetitionError, match="--resume --force: .* other values of lr"):
        train.main(TINY + dirs + ["lr=0.2", "--resume", "--force"])
    assert (run_dir / "config.yaml").read_text() == before


@pytest.mark.parametrize("argv", [["ensemble", "x", "--name", "y", "--rounds", "-3"],
                                  ["predict", "x", "--tent-steps", "-1"], ["predict", "x", "--batch-size", "0"],
                                  ["selftrain", "x.json", "--epochs", "0"], ["score", "suite", "--out", "o", "--n", "-5"]])
def test_count_flags_refuse_nonsense_before_anything_runs(argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"competition.{argv[0]}").main(argv[1:])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_an_os_error_is_one_line_with_the_fix(capsys):
    import errno

    from competition.files import cli

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/x.npy")

    with pytest.raises(SystemExit) as e:
        cli(full)()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "/tmp/x.npy" in err and "free some disk space" in err


def test_other_images_behind_the_same_path_are_never_called_already_trained(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    args = TINY + ["dataset=imagefolder", f"data={root}", "train_subset=null", "epochs=1", "ood_check=0",
                   "select_on=clean", f"folds_dir={tmp_path / 'f'}", f"models_dir={tmp_path / 'm'}",
                   f"data_dir={tmp_path / 'd'}"]
    run = train.main(args)
    train.main(args)
    assert "already trained" in capsys.readouterr().out  # the same images: skipped
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "cat" / "3.png")
    with pytest.raises(CompetitionError, match="trained on other images than .* holds now"):
        train.main(args)
    assert RunDir(run).finished


def test_ood_files_of_another_size_than_the_run_trained_on_are_refused(run_copy, tmp_path):
    from competition import predict

    run, _ = run_copy
    for i in range(2):
        np.save(tmp_path / f"distortion{i:02d}.npy", np.zeros((10, 28, 28, 3), np.uint8))
    with pytest.raises(CompetitionError, match="holds 28x28 images, but .* trained on 32x32"):
        predict.predict_run(run, [tmp_path], test=False)


def test_a_cut_weights_file_is_one_error(run_copy):
    run_dir, _ = run_copy
    best = run_dir / "best.safetensors"
    whole = best.read_bytes()
    best.write_bytes(whole[:200])
    with pytest.raises(CompetitionError, match="could not be read .* truncated"):
        RunDir(run_dir).load_weights("best")
    best.unlink()
    torch.save(RunDir(run_dir).load_weights("last"), run_dir / "best.pt")  # a run saved before safetensors
    (run_dir / "best.pt").write_bytes((run_dir / "best.pt").read_bytes()[:200])
    with pytest.raises(CompetitionError, match="could not be read .* truncated"):
        RunDir(run_dir).load_weights("best")


# ---------------------------------------------------------------------------- writes that stay inside their folder


def test_a_submission_name_that_climbs_out_is_refused_before_any_write(run_copy, tmp_path):
    from competition import selftrain
    from competition.runs import members_from_json

    run_dir, _ = run_copy
    spec = tmp_path / "subs" / "evil.json"
    spec.parent.mkdir()
    spec.write_text(json.dumps({"name": "../../../x", "ood_dir": str(tmp_path), "method": "mean", "members": [
        {"name": "a", "runs": [str(run_dir)], "setting": "flip", "weight": 1.0}]}))
    out = tmp_path / "subs" / "out"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CompetitionError, match=r"the \"name\" in .*evil.json .*'\.\./\.\./\.\./x': use letters"):
        selftrain.main([str(spec), "--rounds", "1", "--out-dir", str(out)])
    with pytest.raises(CompetitionError, match="evil.json"):  # board's and score's reader
        members_from_json(spec)
    assert sorted(tmp_path.rglob("*")) == before


def test_selftrain_refuses_member_runs_outside_the_models_folder_before_any_write(run_copy, tmp_path):
    """A sent submission JSON naming a run elsewhere (absolute, or climbing out with ../): the
    fine-tuned run would be written beside it, outside the project."""
    from competition import selftrain

    run_dir, _ = run_copy
    models = run_dir.parent
    outside = tmp_path / "outside" / run_dir.name
    shutil.copytree(run_dir, outside)
    spec = tmp_path / "subs" / "sent.json"
    spec.parent.mkdir()
    cases = [(str(models / ".." / ".." / "outside" / run_dir.name), ["--models-dir", str(models)]),
             (str(outside), ["--models-dir", str(models)]),
             (str(run_dir), [])]  # default: base.yaml's models_dir (models/), which tmp_path is not in
    for path, flags in cases:
        spec.write_text(json.dumps({"name": "sent", "ood_dir": str(tmp_path), "method": "equal", "members": [
            {"name": "a", "runs": [path], "setting": "flip", "weight": 1.0}]}))
        before = sorted(tmp_path.rglob("*"))
        with pytest.raises(CompetitionError, match=rf"sent.json: member run .*{re.escape(run_dir.name)} does not lie "
                                                   r"inside the models folder .*pass --models-dir") as e:
            selftrain.main([str(spec), "--out-dir", str(spec.parent), *flags])
        assert path in str(e.value) and "\n" not in str(e.value) and sorted(tmp_path.rglob("*")) == before


def _link_outside(path: Path, outside: Path) -> None:
    """Replace the run's folder `path` with a link to `outside` (what a sent run folder may hold)."""
    if path.exists():
        path.rename(outside)
    else:
        outside.mkdir()
    path.symlink_to(outside, target_is_directory=True)


def test_predict_refuses_a_pred_folder_that_links_outside(run_copy, tmp_path):
    from competition import predict

    run_dir, _ = run_copy
    outside = tmp_path / "outside"
    _link_outside(run_dir / RunDir.PRED, outside)
    before = sorted(outside.rglob("*"))
    with pytest.raises(CompetitionError, match=r"pred is a symbolic link .*remove the link"):
        predict.predict_run(run_dir, [], test=True, force=True)
    assert sorted(outside.rglob("*")) == before


@pytest.mark.parametrize("what", ["checkpoints", "checkpoints/checkpoint_1", "broken-checkpoints"])
def test_resume_refuses_checkpoint_folders_that_link_outside(run_copy, tmp_path, what):
    run_dir, args = run_copy
    (run_dir / "summary.json").unlink()
    outside = tmp_path / "outside"
    _link_outside(run_dir / what, outside)
    before = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}
    with pytest.raises(CompetitionError, match=f"{what.split('/')[-1]} is a symbolic link"):
        train.main(TINY + args + ["--resume"])
    assert {p: p.stat().st_mtime_ns for p in outside.rglob("*")} == before and (run_dir / what).is_symlink()


# ---------------------------------------------------------------------------- bad input: one line, nothing half-read


def _laughs(levels: int = 9) -> str:
    """A YAML "billion laughs": `levels` lists of nine aliases of the one before (9**levels values)."""
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        rows.append(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9)}]")
    return "{" + ", ".join(rows) + "}"


def test_a_yaml_alias_bomb_is_refused_naming_the_file_or_override(tmp_path):
    from competition import config

    with pytest.raises(CompetitionError, match=r"override model_args=\.\.\.: the value uses the YAML alias \*a"):
        config.load_config(["part1"], [f"model_args={_laughs()}"])
    preset = tmp_path / "sent.yaml"
    preset.write_text(f"extends: part1\nmodel_args: {_laughs()}\n")
    with pytest.raises(CompetitionError, match=r"sent.yaml: line 2 uses the YAML alias \*a; configs take no aliases"):
        config.load_config([str(preset)])
    preset.write_text("extends: part1\nlr: &peak 0.1\n")  # an anchor alone expands nothing
    assert config.load_config([str(preset)])["lr"] == 0.1
    shared = [0.5, 0.5, 0.5]  # safe_dump writes a list two keys share as an alias: save_config never does
    config.save_config({"mean": shared, "std": shared}, tmp_path / "data_config.yaml")
    assert config.read_yaml(tmp_path / "data_config.yaml") == {"mean": shared, "std": shared}


def test_a_yaml_nested_thousands_deep_is_one_line_naming_the_file(run_copy, tmp_path):
    from competition import config

    deep = tmp_path / "deep.yaml"
    deep.write_text("lr: " + "[" * 10000 + "\n")
    with pytest.raises(CompetitionError, match=r"deep.yaml nests lists or mappings too deeply to read .*: restore"):
        config.load_config([str(deep)])
    run_dir, _ = run_copy  # a sent run's config.yaml
    (run_dir / "config.yaml").write_text("{a: " * 10000 + "\n")
    with pytest.raises(CompetitionError, match=r"config.yaml nests lists or mappings too deeply") as e:
        RunDir(run_dir).config()
    assert "\n" not in str(e.value)


def test_cifar_pickles_of_float_pixels_or_labels_are_refused_not_cast(tmp_path):
    from test_data import write_cifar100

    write_cifar100(tmp_path / "d")
    path = tmp_path / "d" / "cifar-100-python" / "train"
    batch = pickle.loads(path.read_bytes())
    good = batch[b"data"]
    path.write_bytes(pickle.dumps({**batch, b"data": good.astype(np.float32) / 255}))  # a "normalised" copy
    with pytest.raises(CompetitionError, match=r"cifar-100-python/train: data is float32, expected uint8 pixels"):
        data.load("cifar100", "train", tmp_path / "d")
    path.write_bytes(pickle.dumps({**batch, b"fine_labels": [0.5] * len(good)}))
    with pytest.raises(CompetitionError, match=r"train: fine_labels is float64, expected whole-number class indices"):
        data.load("cifar100", "train", tmp_path / "d")


def test_an_image_tar_with_links_or_paths_outside_is_refused_naming_them(tmp_path):
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")

    def member(tar, name, kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(buf.getvalue()) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(buf.getvalue()) if kind == tarfile.REGTYPE else None)

    def archive(*extra):
        path = tmp_path / "imgs.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name in ("cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"):
                member(tar, name)
            for args in extra:
                member(tar, *args)
        return path

    assert data.load_imagefolder(archive()).images.shape == (4, 8, 8, 3)
    bad = archive(("cat/2.png", tarfile.SYMTYPE, "/etc/passwd"), ("dog/2.png", tarfile.LNKTYPE, "dog/0.png"),
                  ("../../outside/cat/3.png",), ("/abs/dog/3.png",))
    with pytest.raises(CompetitionError, match=r"imgs.tar.gz: 4 image member\(s\) refused \(2 links, e.g. "
                                               r"'cat/2.png'; 2 paths outside the archive's folder, e.g. "
                                               r"'../../outside/cat/3.png'\)"):
        data.load_imagefolder(bad, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing cached from it


def test_a_corrupt_suite_json_is_one_error_not_unknown_origin(tmp_path):
    from competition import board, corruptions

    suite = tmp_path / "suite"
    corruptions.make_suite(data.load_digits("test").images[:4], suite, names=["brightness"], labels=np.arange(4),
                           workers=1)
    assert data.OodSet(suite).role().startswith("images of unknown origin (no suite.json)")  # missing: said so
    (suite / "suite.json").write_text('{"dataset": "digits", "split": "te')  # cut short
    with pytest.raises(CompetitionError, match=r"suite.json is not the JSON object `score suite` writes"):
        data.OodSet(suite).role()
    assert board._role({"ood_dir": str(suite)}) == f"unreadable {suite / 'suite.json'}"  # a score saved before roles


def test_the_board_of_a_missing_models_folder_is_one_error(tmp_path, capsys):
    from competition import board
    from competition.files import cli

    with pytest.raises(SystemExit) as e:
        cli(board.main)(["--models-dir", str(tmp_path / "nonexistent"), "--submissions-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "nonexistent: no such folder" in err


@pytest.mark.parametrize("bad, key", [("epochs=1000000000", r"epochs=1000000000: must be >= 1 and <= 10000"),
                                      ("stop_after=1000000000", "stop_after"), ("seed=4294967296", "seed"),
                                      ("workers=1000000", r"workers=1000000: must be >= 0 and <= 256")])
def test_absurd_counts_are_refused_at_load(bad, key):
    from competition import config

    with pytest.raises(CompetitionError, match=key):  # epochs=1e9 spent hours before the first step
        config.load_config(["part1"], [bad])


def test_submission_labels_and_ids_must_be_ascii_digits(tmp_path):
    from competition import submit

    ids = submit.submission_ids([5])
    csv = tmp_path / "s.csv"
    rows = "".join(f"{i},{'٣' if k == 2 else 1}\n" for k, i in enumerate(ids))  # '٣': Arabic-Indic 3
    csv.write_text("id,label\n" + rows, encoding="utf-8")
    with pytest.raises(CompetitionError, match=r"row 3 \(distortion00_3_0\): label '٣' is not .* ASCII digits 0-9"):
        submit.check_submission(csv, rows_per_file=[5])
    csv.write_text("id,label\n" + "".join(f"{i.replace('00', '٠٠')},1\n" for i in ids), encoding="utf-8")
    with pytest.raises(CompetitionError, match=r"row 1: id 'distortion٠٠_1_0' is not of the form"):
        submit.check_submission(csv)


def test_selftrain_refuses_a_submission_json_without_a_name_before_any_write(run_copy, tmp_path):
    from competition import corruptions, ensemble, predict, selftrain
    from competition.specs import EnsembleSpec

    run_dir, _ = run_copy
    suite = tmp_path / "suite"
    corruptions.make_suite(data.load_digits("test").images[:4], suite, names=["brightness"], workers=1)
    predict.predict_run(run_dir, [suite], test=False)
    spec = ensemble.build([run_dir], "sub", suite, tmp_path / "subs", EnsembleSpec(method="equal"),
                          allow_partial=True).with_suffix(".json")
    sidecar = json.loads(spec.read_text())
    del sidecar["name"]
    spec.write_text(json.dumps(sidecar))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CompetitionError, match=r"sub.json lacks 'name': self-training reads the JSON"):
        selftrain.main([str(spec), "--out-dir", str(tmp_path / "subs")])
    assert sorted(tmp_path.rglob("*")) == before


def test_a_bare_state_dict_best_pt_says_what_it_is_and_how_to_convert_it(run_copy):
    run_dir, _ = run_copy
    state = RunDir(run_dir).load_weights("best")["model"]
    torch.save(state, run_dir / "best.pt")  # torch.save(model.state_dict()): the legacy habit
    (run_dir / "best.safetensors").unlink()
    with pytest.raises(CompetitionError, match=r"best.pt is a bare state dict \(\d+ tensors, .*convert it once") as e:
        RunDir(run_dir).load_model()
    exec(str(e.value).split('python -c "', 1)[1].rstrip('"'))  # the fix it prints, run as printed
    model, cfg, _ = RunDir(run_dir).load_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.save([1, 2], run_dir / "best.pt")
    (run_dir / "best.safetensors").unlink()
    with pytest.raises(CompetitionError, match=r"best.pt holds a list, not a run's weights"):
        RunDir(run_dir).load_weights("best")


def test_a_stop_at_an_epochs_first_step_claims_no_new_checkpoint(tmp_path, monkeypatch):
    """A stop request before a step of the epoch has run: the first batch is already drawn (its
    RNG), so a checkpoint taken there resumed one draw off. Before any training nothing is kept
    and the message says to start again; later, the end-of-epoch checkpoint is the exact one."""
    from competition import runtime
    from competition.files import Interrupted

    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    real = runtime.StopRequest.now

    def stop_at_call(n):
        calls = {"n": 0}

        def now(self, accelerator, step):
            calls["n"] += 1
            if calls["n"] == n:
                self.name = "SIGTERM"
            return real(self, accelerator, step)
        return now

    monkeypatch.setattr(runtime.StopRequest, "now", stop_at_call(1))
    with pytest.raises(Interrupted, match=r"SIGTERM before the first training step: nothing was trained and no "
                                          r"checkpoint saved; start the run again with `python -m competition.train"):
        train.main(TINY + dirs + ["name=first"])
    assert not (tmp_path / "models" / "first").exists()
    monkeypatch.setattr(runtime.StopRequest, "now", stop_at_call(5))  # 128 / 32: 4 steps an epoch; 5: epoch 2's first
    with pytest.raises(Interrupted, match=r"checkpoint saved in .*checkpoint_0; continue exactly with"):
        train.main(TINY + dirs + ["name=second"])
    assert [c.name for c in RunDir(tmp_path / "models" / "second").checkpoints()] == ["checkpoint_0"]


# ---------------------------------------------------------------------------- a sent run decides nothing of where things go


def _send_elsewhere(run_dir: Path, outside: Path) -> None:
    """What a run folder someone sent may hold: its config.yaml and its weights' metadata naming
    folders outside the project as its data_dir and models_dir."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from competition.config import read_yaml, save_config

    where = {"data_dir": str(outside / "data"), "models_dir": str(outside / "models")}
    save_config({**read_yaml(run_dir / "config.yaml"), **where}, run_dir / "config.yaml")
    best = run_dir / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:
        meta = f.metadata()
    meta["config"] = json.dumps({**json.loads(meta["config"]), **where})
    save_file(load_file(best), str(best), metadata=meta)


def test_a_sent_run_never_decides_where_predict_writes(run_copy, tmp_path, monkeypatch):
    from competition import corruptions, predict
    from competition.config import base_config

    run_dir, _ = run_copy
    outside = tmp_path / "outside"
    _send_elsewhere(run_dir, outside)
    project = base_config()["data_dir"]
    run = RunDir(run_dir)
    assert run.config()["data_dir"] == project and run.config()["models_dir"] == str(run_dir.parent)
    assert run.load_model()[1]["data_dir"] == project
    caches = []

    def stop(*args, cache_dir=None, **kwargs):  # where predict would write the corrupted copies' cache
        caches.append(Path(cache_dir))
        raise RuntimeError("stop here")

    monkeypatch.setattr(corruptions, "corrupted_copies", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        predict.predict_run(run_dir, [], test=False)
    assert caches == [Path(project) / "cache"] and not outside.exists()


def test_selftrain_fine_tunes_beside_the_run_whatever_its_config_names(run_copy, tmp_path, monkeypatch):
    from competition import selftrain
    from competition.config import base_config

    run_dir, _ = run_copy
    outside = tmp_path / "outside"
    _send_elsewhere(run_dir, outside)
    asked = {}
    monkeypatch.setattr(train, "train", lambda cfg, force=False: asked.update(cfg) or RunDir.for_config(cfg).path)
    new = selftrain.fine_tune(RunDir(run_dir), tmp_path / "pseudo.npz", "sub", 1, 1, None, force=True)
    assert new.path == run_dir.parent / f"{run_dir.name}-sub-st1" and asked["models_dir"] == str(run_dir.parent)
    assert asked["data_dir"] == base_config()["data_dir"] and not outside.exists()
    from competition.config import read_yaml, save_config

    # its folds file gone (or a sent config naming a folder without one): training would write a
    # new split there, with other held-out images
    save_config({**read_yaml(run_dir / "config.yaml"), "folds_dir": str(tmp_path / "no-folds")}, run_dir / "config.yaml")
    with pytest.raises(CompetitionError, match=r"digits.csv \(the folds .* trained on\) is missing: restore it"):
        selftrain.fine_tune(RunDir(run_dir), tmp_path / "pseudo.npz", "sub", 1, 1, None, force=True)


def test_a_fine_tune_never_takes_a_sent_runs_tracker_or_weight_source(run_copy, tmp_path, monkeypatch):
    from competition import selftrain
    from competition.config import base_config, read_yaml, save_config

    run_dir, _ = run_copy
    sent = {"log_with": "wandb", "progress": False, "workers": 7, "pretrained": True,
            "weights": str(tmp_path / "elsewhere" / "w.pth")}
    save_config({**read_yaml(run_dir / "config.yaml"), **sent}, run_dir / "config.yaml")
    asked = {}
    monkeypatch.setattr(train, "train", lambda cfg, force=False: asked.update(cfg) or RunDir.for_config(cfg).path)
    selftrain.fine_tune(RunDir(run_dir), tmp_path / "pseudo.npz", "sub", 1, 1, None, force=True)
    assert {k: asked[k] for k in sent} == {k: base_config()[k] for k in sent} and asked["log_with"] is None
    assert asked["init_from"] == str(run_dir) and asked["folds_dir"] == read_yaml(run_dir / "config.yaml")["folds_dir"]


def test_no_run_name_is_an_aside_and_force_moves_aside_to_a_new_name(run_copy):
    run_dir, dirs = run_copy
    with pytest.raises(CompetitionError, match=r"config name .*: use letters, .*not starting with '\.'"):
        train.main(TINY + dirs + [f"name=.{run_dir.name}.replaced"])
    # a run of that name from before the rule, or the copy a killed --force left: never deleted
    older = run_dir.parent / f".{run_dir.name}.replaced"
    older.mkdir()
    (older / "keep.txt").write_text("kept")
    aside = RunDir(run_dir).move_aside("replaced")
    assert aside != older and aside.parent == run_dir.parent and aside.name.startswith(f".{run_dir.name}.replaced")
    assert (aside / "config.yaml").exists() and not run_dir.exists() and (older / "keep.txt").read_text() == "kept"


def test_a_copy_a_killed_force_left_is_reported_then_deleted_by_the_next_force(run_copy, capsys):
    run_dir, dirs = run_copy
    stale = run_dir.parent / f".{run_dir.name}.replaced-k1lled_0"  # move_aside's name: mkdtemp's 8 characters
    shutil.copytree(run_dir, stale)
    kept = [run_dir.parent / f".{run_dir.name}.replaced", run_dir.parent / f".{run_dir.name}.replaced-short",
            run_dir.parent / f".{run_dir.name}x.replaced-abcdefgh"]  # not this run's asides: never touched
    for k in kept:
        k.mkdir()
    (run_dir.parent / f".{run_dir.name}.replaced-notadir0").write_text("a file")
    assert RunDir(run_dir).asides() == [stale]
    train.main(TINY + dirs)  # a start without --force only says so, in one line
    out = capsys.readouterr().out
    assert stale.is_dir() and f"{stale.name}): the next --force of the run deletes them" in out
    train.main(TINY + dirs + ["--force", "epochs=1"])
    assert "deleted (with 1 older copy(ies) an interrupted --force left)" in capsys.readouterr().out
    assert not stale.exists() and RunDir(run_dir).asides() == [] and all(k.is_dir() for k in kept)
    assert (run_dir.parent / f".{run_dir.name}.replaced-notadir0").read_text() == "a file"


def test_a_run_never_lies_inside_another_run_nor_replaces_a_folder_that_is_not_one(run_copy):
    run_dir, dirs = run_copy
    pred = run_dir / "pred" / "flip"
    pred.mkdir(parents=True)
    (pred / "oof.npy").write_bytes(b"another run's predictions")
    with pytest.raises(CompetitionError, match=f"{run_dir.name} is a run folder, and a run never lies inside"):
        train.main(TINY + dirs + [f"name={run_dir.name}/pred", "--force"])
    victim = run_dir.parent / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("precious")
    with pytest.raises(CompetitionError, match=r"victim is not a run folder \(no config.yaml\) but holds precious.txt"):
        train.main(TINY + dirs + ["name=victim", "--force"])
    assert (pred / "oof.npy").read_bytes() == b"another run's predictions" and (victim / "precious.txt").exists()
    assert sorted(p.name for p in (run_dir / "pred").iterdir()) == ["flip"]


# ---------------------------------------------------------------------------- bookkeeping files of another shape


def test_a_lock_manifest_or_config_of_another_shape_is_one_line(run_copy):
    from competition import predict, runs
    from competition.files import read_json

    run_dir, dirs = run_copy
    run = RunDir(run_dir)
    (run_dir / ".lock").write_text("[1, 2]")
    with pytest.raises(CompetitionError, match=r"\.lock is not a lock this code wrote .*delete .*\.lock, then rerun"):
        predict.predict_run(run_dir, [], test=False)
    with pytest.raises(CompetitionError, match=r"\.lock is not a lock this code wrote"):
        train.main(TINY + dirs + ["--force"])
    assert run.lock_holder(take_over=False) is None and (run_dir / ".lock").exists()  # a look (board) goes on
    (run_dir / ".lock").unlink()
    manifest = run.pred_dir("flip") / "predict.json"
    manifest.parent.mkdir(parents=True)
    for text in ('["x"]', '{"oof.npy": 5}', ""):
        manifest.write_text(text)
        assert run.manifest("flip") == {} and read_json(manifest, {}, kind=dict) in ({}, {"oof.npy": 5})
        with pytest.raises(CompetitionError, match=r"oof.npy is missing: run `python -m competition.predict"):
            run.oof_tta("flip")
    (run_dir / "config.yaml").write_text("")
    with pytest.raises(CompetitionError, match=r"config.yaml is empty \(no dataset, .*\): restore the run's own"):
        runs.load_members([run])


@pytest.mark.parametrize("content, match", [
    ({"selftrain": 5}, r"'selftrain' is 5, not the record competition.selftrain writes"),
    ({"selftrain": {"round": 1.5}}, r"'selftrain' is \{\"round\": 1.5\}, not the record"),
    ({"ood_dir": 5}, r"'ood_dir' is 5, not what competition.ensemble writes there"),
    ([{"name": "x"}], r"sub.json is not a JSON mapping")])
def test_selftrain_checks_the_submission_json_types_before_any_write(run_copy, tmp_path, content, match):
    from competition import selftrain

    run_dir, _ = run_copy
    spec = {"name": "sub", "ood_dir": str(tmp_path), "method": "equal",
            "members": [{"name": "a", "runs": [str(run_dir)], "setting": "flip", "weight": 1.0}]}
    path = tmp_path / "subs" / "sub.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**spec, **content} if isinstance(content, dict) else content))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CompetitionError, match=match) as e:
        selftrain.main([str(path), "--out-dir", str(path.parent)])
    assert "\n" not in str(e.value) and sorted(tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------- a checkpoint someone sent


def _json_edit(name: str, change):
    def damage(ckpt: Path) -> None:
        saved = json.loads((ckpt / name).read_text())
        change(saved)
        (ckpt / name).write_text(json.dumps(saved))
    return damage


def _tensor_edit(name: str, tensors=None, meta=None):
    def damage(ckpt: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(ckpt / name), framework="pt") as f:
            saved_meta = f.metadata()
        saved = load_file(ckpt / name)
        save_file(tensors(saved) if tensors else saved, str(ckpt / name), metadata=meta(saved_meta) if meta else saved_meta)
    return damage


def _wider_head(t: dict) -> dict:
    key = [k for k in t if t[k].ndim == 2][-1]
    return {**t, key: torch.zeros(t[key].shape[0] + 1, t[key].shape[1])}


def _loop(key, value):
    return _json_edit("state.json", lambda s: s["loop"].update({key: value}))


SENT_CHECKPOINTS = [  # (damage, what the checkpoint is passed over for): the reviewer's C11-C17 and kin
    (_loop("processes", "two"), r"state.json says 'two' processes wrote it, but 1 random_states"),
    (_loop("processes", 1.5), r"state.json says 1.5 processes"),
    (_loop("processes", 10 ** 7), r"state.json says 10000000 processes wrote it, but 1 random_states"),
    (_loop("epoch", "1"), r'state.json: loop.epoch is "1", not a whole number in 0..2'),
    (_loop("step", 10 ** 6), r"state.json: loop.step is 1000000, not a whole number in 0..0"),
    (_loop("partial", {"seen": "x"}), r"state.json: loop.partial is"),
    (_loop("history", {"a": 1}), r"state.json: loop.history is not 2 metrics rows"),
    (_json_edit("state.json", lambda s: s["scheduler"].update(step_update=1)), r"state.json scheduler is \{"),
    (_json_edit("optimizer.json", lambda s: s["state"].update(abc={})), r"'abc' is not a parameter index"),
    (_json_edit("optimizer.json", lambda s: s["param_groups"][0].update(lr="fast")),
     r'optimizer.json param_groups\[0\].lr is "fast"'),
    (_tensor_edit("optimizer.safetensors", lambda t: {**t, "momentum_buffer": torch.zeros(3)}),
     r"'momentum_buffer' is not named <parameter index>.<state name>"),
    (_tensor_edit("model.safetensors", _wider_head), r"model.safetensors: .* has shape \(11, 16\)"),
    (_tensor_edit("random_states_0.safetensors", meta=lambda m: {**m, "python": json.dumps(
        {"__tuple__": [3, {"__tuple__": [1, 2, 3]}, None]})}), r"random_states_0.safetensors: its RNG states do not"),
    (_tensor_edit("random_states_0.safetensors", lambda t: {**t, "torch": t["torch"][:100]}),
     r"random_states_0.safetensors: its RNG states do not load \(RuntimeError"),
]


def test_a_sent_checkpoint_is_checked_before_anything_of_it_is_loaded(run_copy, tmp_path):
    from competition import checkpoints, runtime
    from competition.learner import make_learner
    from competition.specs import train_spec

    run_dir, _ = run_copy
    run, accelerator = RunDir(run_dir), runtime.make_accelerator("no")
    learner = make_learner(train_spec(run.config()), run.data_config(), accelerator)
    newest = run.checkpoints()[-1]

    def problem(ckpt):
        return RunDir.checkpoint_problem(ckpt, False) or checkpoints.fit_problem(ckpt, learner, accelerator)

    assert problem(newest) is None
    for i, (damage, why) in enumerate(SENT_CHECKPOINTS):
        ckpt = tmp_path / str(i) / newest.name
        shutil.copytree(newest, ckpt)
        damage(ckpt)
        found = problem(ckpt)
        assert found is not None and re.search(why, found), (i, found)


def test_a_resume_past_the_steps_of_its_epoch_is_one_line_and_trains_nothing(run_copy):
    run_dir, dirs = run_copy
    (run_dir / "summary.json").unlink()
    older, newest = RunDir(run_dir).checkpoints()
    shutil.rmtree(newest)
    _loop("step", 10 ** 6)(older)  # skipping a million batches would call epoch 2 finished, untrained
    metrics = (run_dir / "metrics.csv").read_text()
    with pytest.raises(CompetitionError, match=rf"checkpoint .*{older.name} is damaged or from another run: its "
                                               rf"state.json stopped at step 1000000 of epoch 2, which has \d+ steps; "
                                               rf"start again with --force"):
        train.main(TINY + dirs + ["--resume"])
    assert (run_dir / "metrics.csv").read_text() == metrics and not RunDir(run_dir).finished


def test_a_checkpoint_that_fails_to_load_anyway_is_one_line_naming_the_one_before(run_copy, monkeypatch):
    from competition import checkpoints

    run_dir, dirs = run_copy
    (run_dir / "summary.json").unlink()
    older, newest = RunDir(run_dir).checkpoints()
    for ckpt in (older, newest):
        _tensor_edit("model.safetensors", _wider_head)(ckpt)
    monkeypatch.setattr(checkpoints, "fit_problem", lambda *a: None)  # a failure no check foresaw
    with pytest.raises(CompetitionError, match=rf"checkpoint .*{newest.name} is damaged or from another run: "
                                               rf"RuntimeError: .*size mismatch .*; move {newest.name} into "
                                               rf".*broken-checkpoints to resume from {older.name}, or start again "
                                               rf"with --force") as e:
        train.main(TINY + dirs + ["--resume"])
    assert "\n" not in str(e.value)
