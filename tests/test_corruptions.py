"""The corruption suite: every corruption keeps shape and dtype, is reproducible for a seed,
grows with severity, and make_suite writes files the OOD readers accept."""
import json

import numpy as np
import pytest

from competition import corruptions as C
from competition.data import SEVERITIES, ood_files, open_ood
from competition.files import CompetitionError


@pytest.fixture(scope="module")
def images():
    """6 photo-like 32x32 images: smooth shading, a sharp-edged object, muted colours (random
    RGB would be fully saturated, which no photo is and which inverts 'saturate')."""
    import cv2

    rng = np.random.default_rng(0)
    grey = rng.uniform(40, 215, size=(6, 6, 6, 1))
    coarse = np.clip(grey + rng.normal(0, 25, size=(6, 6, 6, 3)), 0, 255).astype(np.uint8)
    smooth = np.stack([cv2.resize(c, (32, 32), interpolation=cv2.INTER_CUBIC) for c in coarse])
    smooth[:, 10:22, 12:20] = np.clip(rng.normal(128, 60, size=(6, 1, 1, 3)), 0, 255).astype(np.uint8)
    return smooth


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_and_reproducible(images, name):
    before = images.copy()
    a = C.corrupt(images, name, 3, seed=0)
    b = C.corrupt(images, name, 3, seed=0)
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(images, before)  # input untouched
    assert not np.array_equal(a, images)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_seed_matters_only_for_random_corruptions(images, name):
    a = C.corrupt(images, name, 2, seed=0)
    b = C.corrupt(images, name, 2, seed=1)
    if name in C.DETERMINISTIC:
        np.testing.assert_array_equal(a, b)
    else:
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_severity_5_damages_more_than_1(images, name):
    def damage(s):
        return np.abs(C.corrupt(images, name, s, seed=0).astype(np.float64) - images).mean()

    assert damage(5) > damage(1) > 0


def test_random_corruptions_differ_per_image(images):
    same = np.repeat(images[:1], 3, axis=0)
    out = C.corrupt(same, "gaussian_noise", 3, seed=0)
    assert not np.array_equal(out[0], out[1])  # a noise map per image, not one for the batch


def test_bad_arguments():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(CompetitionError, match="unknown corruption"):
        C.corrupt(x, "rain", 1)
    for severity in (0, 6, 2.0):
        with pytest.raises(CompetitionError, match="severity"):
            C.corrupt(x, "fog", severity)
    with pytest.raises(CompetitionError, match="uint8"):
        C.corrupt(x.astype(np.float32), "fog", 1)
    assert C.corrupt(x[:0], "fog", 1).shape == (0, 32, 32, 3)


def test_make_suite_writes_the_competition_format(images, tmp_path):
    names = ["gaussian_noise", "fog", "pixelate"]
    labels = np.arange(len(images)) % 3
    paths = C.make_suite(images, tmp_path, seed=4, names=names, labels=labels)

    assert paths == ood_files(tmp_path, expected=None)
    assert [p.name for p in paths] == ["distortion00.npy", "distortion01.npy", "distortion02.npy"]
    n = len(images)
    for path, name in zip(paths, names):
        arr = open_ood(path)
        assert arr.shape == (SEVERITIES * n, 32, 32, 3) and arr.dtype == np.uint8
        for s in range(1, SEVERITIES + 1):  # severity-major: rows [(s-1)N, sN)
            np.testing.assert_array_equal(arr[(s - 1) * n:s * n], C.corrupt(images, name, s, seed=4))
    manifest = json.loads((tmp_path / "corruptions.json").read_text())
    assert manifest["names"] == {"distortion00.npy": "gaussian_noise", "distortion01.npy": "fog",
                                 "distortion02.npy": "pixelate"}
    assert manifest["seed"] == 4 and manifest["n"] == n and manifest["complete"] is True
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), labels)


def test_make_suite_skips_a_finished_suite_and_redoes_a_changed_one(images, tmp_path, monkeypatch):
    names = ["contrast", "snow"]
    C.make_suite(images, tmp_path, seed=0, names=names, labels=np.zeros(len(images), np.int64))
    first = (tmp_path / "distortion01.npy").read_bytes()

    calls = []
    real = C._write_file
    monkeypatch.setattr(C, "_write_file", lambda *a: calls.append(a[1]) or real(*a))
    C.make_suite(images, tmp_path, seed=0, names=names, labels=np.zeros(len(images), np.int64))
    assert calls == []  # same seed, N, source: nothing recomputed

    C.make_suite(images, tmp_path, seed=1, names=names)
    assert calls == names
    assert (tmp_path / "distortion01.npy").read_bytes() != first  # snow is random: new seed, new file

    calls.clear()
    C.make_suite(images[:4], tmp_path, seed=1, names=["contrast"])  # fewer images, fewer files
    assert calls == ["contrast"]
    assert ood_files(tmp_path, expected=None) == [tmp_path / "distortion00.npy"]
    assert not (tmp_path / "labels.npy").exists()
    assert open_ood(tmp_path / "distortion00.npy").shape[0] == 4 * SEVERITIES


def test_make_suite_redoes_an_interrupted_run(images, tmp_path, monkeypatch):
    def crash(images, name, seed, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_write_file", crash)
    with pytest.raises(KeyboardInterrupt):
        C.make_suite(images, tmp_path, names=["fog"])
    assert json.loads((tmp_path / "corruptions.json").read_text())["complete"] is False
    monkeypatch.undo()
    paths = C.make_suite(images, tmp_path, names=["fog"])
    assert open_ood(paths[0]).shape[0] == SEVERITIES * len(images)


def test_make_suite_never_overwrites_foreign_ood_files(images, tmp_path):
    real = np.zeros((5, 32, 32, 3), np.uint8)
    np.save(tmp_path / "distortion00.npy", real)
    with pytest.raises(CompetitionError, match="no corruptions.json"):
        C.make_suite(images, tmp_path, names=["fog"])
    np.testing.assert_array_equal(np.load(tmp_path / "distortion00.npy"), real)


def test_make_suite_in_worker_processes_matches_in_process(images, tmp_path):
    names = ["shot_noise", "brightness"]
    serial = C.make_suite(images, tmp_path / "serial", names=names, workers=1)
    parallel = C.make_suite(images, tmp_path / "parallel", names=names, workers=2)
    for a, b in zip(serial, parallel):
        assert a.read_bytes() == b.read_bytes()


def test_cli_writes_suite_and_preview(images, tmp_path, capsys):
    src = tmp_path / "held_out.npy"
    np.save(src, images)
    C.main(["--out", str(tmp_path / "ood"), "--images", str(src), "--n", "4", "--names", "fog,jpeg_compression",
            "--preview", str(tmp_path / "preview.png"), "--preview-images", "1"])
    assert len(ood_files(tmp_path / "ood", expected=None)) == 2
    assert open_ood(tmp_path / "ood" / "distortion01.npy").shape == (4 * SEVERITIES, 32, 32, 3)
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 files" in capsys.readouterr().out
