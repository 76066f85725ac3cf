"""Hostile data files (the review's cases C07-C47): each is refused at load as one line naming the
file and the fix, nothing is half-read, and a stage that fails writes no half of its outputs.
Image sets and OOD files are written here in their real formats; the cases about a run's files
work on a copy of the session's tiny run."""
from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import shutil
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from competition import augment, data, ensemble, metrics, predict, score, submit
from competition.files import CompetitionError
from competition.runs import RunDir


def one_line(e: pytest.ExceptionInfo, *names) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    for name in names:
        assert str(name) in text, (name, text)
    return text


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a read from a named pipe blocks until something writes into it)."""
    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------- OOD files


def write_suite(d, files=3, n=2, names=True):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        np.save(d / data.ood_name(i), np.full((5 * n, 32, 32, 3), i, np.uint8))
    np.save(d / "labels.npy", np.arange(n, dtype=np.int64))
    if names:
        (d / "corruptions.json").write_text(json.dumps({"names": {data.ood_name(i): f"c{i}" for i in range(files)}}))
    return d


def test_c36_bytes_after_a_npy_array_are_refused(tmp_path):
    d = write_suite(tmp_path / "s")
    bad = d / "distortion01.npy"
    with open(bad, "ab") as f:
        f.write(os.urandom(5000))  # np.load reads the declared array and ignores the rest
    with pytest.raises(CompetitionError, match="5000 bytes after") as e:
        data.OodSet(d)
    one_line(e, bad)
    with open(d / "labels.npy", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(CompetitionError, match="1 bytes after"):
        data.check_npy(d / "labels.npy")


@pytest.mark.parametrize("name", ["distortion01.npy", "labels.npy", "corruptions.json"])
def test_c37_a_named_pipe_is_refused_before_it_is_opened(tmp_path, name):
    d = write_suite(tmp_path / "s")
    (d / name).unlink()
    os.mkfifo(d / name)
    with deadline(20), pytest.raises(CompetitionError, match="named pipe") as e:
        suite = data.OodSet(d)
        suite.labels, suite.info()
    one_line(e, d / name)


@pytest.mark.parametrize("names", [["c0", "c1", "c2"], 3, {"distortion00.npy": "c0", "x": "c1", "y": "c2"}])
def test_c28_corruptions_json_names_of_another_shape_are_one_error(tmp_path, names):
    d = write_suite(tmp_path / "s")
    (d / "corruptions.json").write_text(json.dumps({"names": names}))
    with pytest.raises(CompetitionError, match='"names" is') as e:
        data.OodSet(d)
    one_line(e, d / "corruptions.json", "score suite")


# ---------------------------------------------------------------------------- image folders and tarballs


def write_images(root, classes=("c0", "c1", "c2"), n=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.bmp")
    return root


def test_c40_links_out_of_an_image_folder_and_pipes_in_it_are_refused(tmp_path):
    root = write_images(tmp_path / "imgs")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / "train/c1/0.bmp", outside / "secret.bmp")
    (root / "train/c0/evil.bmp").symlink_to(outside / "secret.bmp")
    with pytest.raises(CompetitionError, match="1 links to files outside the folder") as e:
        data.load("imagefolder", "train", tmp_path / "d", path=root)
    one_line(e, root, "train/c0/evil.bmp", "cp -rL")
    (root / "train/c0/evil.bmp").unlink()
    (root / "train/c0/inside.bmp").symlink_to(root / "train/c1/0.bmp")  # a link within the folder reads its own file
    assert len(data.load("imagefolder", "train", tmp_path / "d", path=root).labels) == 10
    (root / "train/c2/linked").symlink_to(outside, target_is_directory=True)  # never entered: refused, not skipped
    os.mkfifo(root / "train/c1/pipe.bmp")
    with deadline(20), pytest.raises(CompetitionError) as e:
        data.load("imagefolder", "train", tmp_path / "d2", path=root)
    one_line(e, "1 links to folders", "train/c2/linked", "1 devices or pipes", "train/c1/pipe.bmp")


def test_c41_images_changed_in_place_with_size_and_mtime_restored_miss_the_cache(tmp_path):
    root = write_images(tmp_path / "imgs")
    first = data.load("imagefolder", "train", tmp_path / "d", path=root)
    a, b = root / "train/c0/0.bmp", root / "train/c1/0.bmp"
    sa, sb, ba, bb = a.stat(), b.stat(), a.read_bytes(), b.read_bytes()
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (ms): a real edit comes later than this
    a.write_bytes(bb)
    b.write_bytes(ba)
    os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
    os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))
    again = data.load("imagefolder", "train", tmp_path / "d", path=root)
    np.testing.assert_array_equal(again.images[0], first.images[3])  # the swapped images, not the cached ones
    np.testing.assert_array_equal(again.images[3], first.images[0])


def test_c42_archives_joined_with_cat_are_refused_not_read_in_part(tmp_path):
    root = write_images(tmp_path / "imgs")
    parts = []
    for name, classes in (("a", ["c0", "c1"]), ("b", ["c2"])):
        with tarfile.open(tmp_path / f"{name}.tar", "w") as tar:
            for c in classes:
                tar.add(root / "train" / c, arcname=f"train/{c}")
        parts.append((tmp_path / f"{name}.tar").read_bytes())
    for suffix, joined in ((".tar", b"".join(parts)), (".tar.gz", b"".join(gzip.compress(p) for p in parts))):
        path = tmp_path / f"all{suffix}"
        path.write_bytes(joined)
        with pytest.raises(CompetitionError, match="after its tar end-of-archive") as e:
            data.load("imagefolder", "train", tmp_path / f"d{suffix}", path=path)
        one_line(e, path)
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(root, arcname=".")
    assert len(set(data.load("imagefolder", "train", tmp_path / "dw", path=whole).labels)) == 3


def test_c43_a_member_path_held_twice_is_refused(tmp_path):
    root = write_images(tmp_path / "imgs")
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(root, arcname=".")
    with tarfile.open(path, "a") as tar:  # tar -r of an updated file
        tar.add(root / "train/c1/0.bmp", arcname="train/c0/0.bmp")
    with pytest.raises(CompetitionError, match="1 paths held twice") as e:
        data.load("imagefolder", "train", tmp_path / "d", path=path)
    one_line(e, path, "train/c0/0.bmp")


def test_c44_pseudo_label_files_are_checked_naming_the_file(tmp_path):
    path, shape = tmp_path / "pseudo.npz", (32, 32, 3)
    images, probs = np.zeros((4, *shape), np.uint8), np.full((4, 10), 0.1, np.float32)
    got = data.check_pseudo(path, images, probs, shape, 10)
    assert got[0].dtype == np.uint8 and got[1].dtype == np.float32
    for bad_images, bad_probs, what in ((images / 255.0, probs, "images are float64"),
                                        (images.astype(np.int64) * 100, probs, "images are int64"),
                                        (images[:, :16], probs, "images are uint8"),
                                        (images, -probs, "not probabilities"),
                                        (images, probs[:, :3], r"probs are float32 \(4, 3\)"),
                                        (images, np.eye(10, dtype=np.int64)[:4], "probs are int64")):
        with pytest.raises(CompetitionError, match=what) as e:
            data.check_pseudo(path, bad_images, bad_probs, shape, 10)
        one_line(e, path)
    with pytest.raises(CompetitionError, match="not uint8"):  # was a TypeError in np.bincount
        augment.input_stats(images / 255.0, "data")


# ---------------------------------------------------------------------------- submissions


def test_c29_a_sidecar_json_of_another_shape_is_one_error(tmp_path):
    csv = submit.write_submission(tmp_path / "c29.csv", np.zeros(10, np.int64), [5, 5])
    for sidecar, why in (([], "JSON list"), ([{"runs": 1}], "JSON list"), ({"runs": 5}, "'runs' is a JSON int"),
                         ({"runs": [1]}, "holds other than folder names"), ({"kaggle": {}}, "'kaggle' is a JSON dict")):
        csv.with_suffix(".json").write_text(json.dumps(sidecar))
        with pytest.raises(CompetitionError, match=why) as e:
            submit.main(["--check", str(csv)])
        one_line(e, csv.with_suffix(".json"))


def test_c33_member_weights_must_be_finite_non_negative_and_not_all_zero():
    assert metrics.member_weights([0.5, 0, 1.5], "x.json").tolist() == [0.5, 0, 1.5]
    for bad in ([float("inf"), 1], [0, 0], [-3, 1], [float("nan")], [], ["a"]):
        with pytest.raises(CompetitionError, match="not an ensemble's") as e:
            metrics.member_weights(bad, "x.json")
        one_line(e, "x.json", "competition.ensemble")


# ---------------------------------------------------------------------------- a run's files


@pytest.fixture
def run(tiny_run_copy, tmp_path, monkeypatch):
    """A copy of the session's tiny run, working in tmp_path (its data/cache/ included: the run's
    data_dir is relative), with a 3-file labelled suite: (run dir, suite)."""
    from competition import corruptions

    monkeypatch.chdir(tmp_path)
    run_dir, _ = tiny_run_copy
    suite = tmp_path / "suite"
    corruptions.make_suite(data.load_digits("test").images[:4], suite, names=["brightness", "contrast", "fog"],
                           labels=np.arange(4), workers=1)
    return run_dir, suite


def pred_files(run_dir):
    return sorted(p for p in (run_dir / RunDir.PRED).rglob("*") if p.is_file()) if (run_dir / RunDir.PRED).exists() \
        else []


def rewrite_weights(run_dir, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / "best.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({k: change(v) for k, v in load_file(str(path)).items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("change, why", [
    (lambda v: (v * 100).round().to(torch.int64), r"tensors are not floating point \('.*' is torch.int64\)"),
    (lambda v: v * float("nan") if v.is_floating_point() else v, "tensors hold NaN or infinite values"),
    (lambda v: -v, "holds negative values, and a batch-norm variance cannot be negative")])
def test_c07_c10_weights_that_are_not_finite_floats_are_refused_at_load(run, change, why):
    run_dir, suite = run
    path = rewrite_weights(run_dir, change)
    with pytest.raises(CompetitionError, match=why) as e:
        predict.predict_run(run_dir, [suite], test=False)
    one_line(e, path)
    assert not pred_files(run_dir)


@pytest.mark.parametrize("edit, why", [
    (lambda d: d.pop(next(iter(d))), r"1 tensor\(s\) missing \(e.g. '.*'\)"),
    (lambda d: d.__setitem__("extra.weight", torch.zeros(3)), r"1 tensor\(s\) the network does not have \(e.g. 'extra.weight'\)"),
    (lambda d: d.__setitem__(next(iter(d)), torch.zeros(2, 2)), r"1 tensor\(s\) of another shape \('.*': \(2, 2\) in the file")])
def test_weights_of_another_network_are_one_line(run, edit, why):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run_dir, suite = run
    path = run_dir / "best.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CompetitionError, match="does not fit the network its config describes: " + why) as e:
        predict.predict_run(run_dir, [suite], test=False)
    one_line(e, path)
    assert not pred_files(run_dir)


def test_c10_fine_tuning_from_non_finite_weights_is_refused(tiny_run_copy):
    """init_from (self-training, fine-tuning) reads weights through the same check as predict."""
    from competition import train

    run_dir, args = tiny_run_copy
    path = rewrite_weights(run_dir, lambda v: v * float("nan") if v.is_floating_point() else v)
    with pytest.raises(CompetitionError, match="tensors hold NaN or infinite values") as e:
        train.main(args + ["name=ft", f"init_from={run_dir}"])
    one_line(e, path)


@pytest.mark.parametrize("name, change, bad", [("oof_index.npy", lambda a: a.__setitem__(0, -1), "-1"),
                                               ("oof_ood_index.npy", lambda a: a.__setitem__((0, 0), 10 ** 6),
                                                "1000000")])
def test_c45_c46_index_files_out_of_range_are_refused_before_any_output(run, tmp_path, name, change, bad):
    run_dir, suite = run
    predict.predict_run(run_dir, [suite], test=False)
    ensemble.build([run_dir], "before", suite, tmp_path / "subs")
    before = {p: p.stat().st_mtime_ns for p in pred_files(run_dir)}
    rows = np.load(run_dir / name)
    change(rows)
    np.save(run_dir / name, rows)
    with pytest.raises(CompetitionError, match=f"names row {bad}, but the rows it indexes are 0..") as e:
        predict.predict_run(run_dir, [suite], test=False, force=True)
    one_line(e, run_dir / name)
    assert {p: p.stat().st_mtime_ns for p in pred_files(run_dir)} == before
    with pytest.raises(CompetitionError, match=f"names row {bad}") as e:  # the logits predicted before the edit
        ensemble.build([run_dir], "after", suite, tmp_path / "subs")
    one_line(e, run_dir / name)
    assert not list((tmp_path / "subs").glob("after*"))


def test_c47_a_corrupted_copies_cache_of_another_shape_is_made_again(run, capsys):
    run_dir, _ = run
    predict.predict_run(run_dir, [], test=False)
    (cache,) = Path("data/cache").resolve().glob("ood-copies-*.npy")  # the run's data_dir, in tmp_path
    want = np.load(cache).shape
    np.save(cache, np.zeros((10, 32, 32, 3), np.uint8))
    predict.predict_run(run_dir, [], test=False, force=True)
    assert "made again" in capsys.readouterr().err
    assert np.load(cache).shape == want
    setting = RunDir(run_dir).settings()[0]
    index, logits = RunDir(run_dir).oof_ood(setting)  # was a reshape traceback in the ensemble
    assert logits.shape[:2] == index.shape


@pytest.mark.parametrize("value, why", [("ten", "num_classes is 'ten', not a whole number"),
                                        (3, "data_config.yaml says num_classes 3, but the run's out-of-fold logits have 10 classes")])
def test_c32_a_wrong_num_classes_leaves_no_submission_file(run, tmp_path, value, why):
    run_dir, suite = run
    predict.predict_run(run_dir, [suite], test=False)
    path = run_dir / "data_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**cfg, "num_classes": value}))
    with pytest.raises(CompetitionError, match=why) as e:
        ensemble.build([run_dir], "c32", suite, tmp_path / "subs")
    one_line(e, path)
    assert not (tmp_path / "subs").exists() or not list((tmp_path / "subs").iterdir())


def test_the_csv_and_its_json_are_written_together(run, tmp_path, capsys):
    """The JSON pins its CSV: a CSV that is not the one its JSON describes (a kill between the two
    renames left the old one) is replaced, not taken for "unchanged"."""
    run_dir, suite = run
    predict.predict_run(run_dir, [suite], test=False)
    csv = ensemble.build([run_dir], "pair", suite, tmp_path / "subs")
    spec = json.loads(csv.with_suffix(".json").read_text())
    assert spec["csv_sha1"] == ensemble.file_hash(csv)
    assert sorted(p.name for p in csv.parent.iterdir()) == ["pair.csv", "pair.json"]  # no temporary left
    good = csv.read_text()
    lines = good.splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ("," + ("1" if lines[1].endswith(",0") else "0"))
    csv.write_text("\n".join(lines) + "\n")
    ensemble.build([run_dir], "pair", suite, tmp_path / "subs")
    assert "not the CSV its JSON describes" in capsys.readouterr().out and csv.read_text() == good
    ensemble.build([run_dir], "pair", suite, tmp_path / "subs")
    assert "unchanged" in capsys.readouterr().out


def test_a_failed_csv_rename_leaves_neither_file_and_names_the_csv(run, tmp_path, monkeypatch):
    """Both or neither when the last step fails: the JSON, renamed first, is taken back; a folder in
    the way is refused before anything is written; the error names the file, not a temporary one."""
    run_dir, suite = run
    predict.predict_run(run_dir, [suite], test=False)
    subs = tmp_path / "subs"
    (subs / "f05.csv").mkdir(parents=True)
    with pytest.raises(CompetitionError, match="f05.csv is a folder, where the submission's file goes") as e:
        ensemble.build([run_dir], "f05", suite, subs)
    one_line(e, subs / "f05.csv")
    assert sorted(p.name for p in subs.iterdir()) == ["f05.csv"]
    real_replace = os.replace

    def failing_csv(src, dst):  # a fault at the CSV's rename (the JSON's has already happened)
        if str(dst).endswith("f06.csv"):
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_csv)
    with pytest.raises(OSError) as e:
        ensemble.build([run_dir], "f06", suite, subs)
    assert e.value.filename == str(subs / "f06.csv")
    assert sorted(p.name for p in subs.iterdir()) == ["f05.csv"]


@pytest.mark.parametrize("weight", ["1e999", "0", "-3"])
def test_c33_a_submission_json_of_unusable_weights_is_one_error_in_score(run, tmp_path, weight):
    run_dir, suite = run
    predict.predict_run(run_dir, [suite], test=False)
    spec_path = ensemble.build([run_dir], "c33", suite, tmp_path / "subs").with_suffix(".json")
    text = spec_path.read_text()
    spec_path.write_text(text.replace('"weight": 1.0', f'"weight": {weight}'))
    with pytest.raises(CompetitionError, match="member weights") as e:
        score.score_target(spec_path, suite)
    one_line(e, spec_path)


def test_small_refusals_say_what_is_wrong(tmp_path):
    """Re-check findings: the fix each message gives is the right one."""
    from competition import folds, selftrain, submit

    with pytest.raises(CompetitionError, match="--k 1: k-fold needs at least 2 folds") as e:
        folds.main(["--dataset", "digits", "--k", "1", "--folds-dir", str(tmp_path / "folds")])
    one_line(e)
    (tmp_path / "sub.csv").mkdir()
    with pytest.raises(CompetitionError, match="sub.csv is a folder, not a submission CSV") as e:
        submit.read_csv(tmp_path / "sub.csv")
    one_line(e)
    for lr in ("inf", "nan", "0"):
        with pytest.raises(CompetitionError, match="--lr a finite number > 0"):
            selftrain.main([str(tmp_path / "x.json"), "--lr", lr])


def test_a_label_edited_in_the_folds_file_is_named(tiny_run_copy):
    from competition import train

    run_dir, args = tiny_run_copy
    csv = next((run_dir.parent.parent / "folds").glob("*.csv"))
    frame = pd.read_csv(csv)
    frame.loc[5, "label"] = (frame.loc[5, "label"] + 1) % 10
    frame.to_csv(csv, index=False)
    with pytest.raises(CompetitionError, match="1 labels differ, first row 5: label") as e:
        train.main(args + ["name=edited"])
    one_line(e, csv)
