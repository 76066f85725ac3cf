"""The corruption suite: make_cifar_c.py's published parameters and behaviour, every corruption
keeps shape and dtype, is reproducible for a seed, draws per image, and make_suite writes files
the OOD readers accept."""
import io
import json
import math
import warnings

import numpy as np
import pytest

from competition import corruptions as C
from competition.data import SEVERITIES, ood_files, open_ood
from competition.files import CompetitionError

RANDOM = [n for n in C.CORRUPTIONS if n not in C.DETERMINISTIC]
# Where make_cifar_c's own tables do not order the damage by severity (mean absolute change on
# photos), so neither can a faithful copy: glass blur s1 has no blur to hide its pixel swaps;
# motion blur s3 and s4 share sigma 2 (the longer radius only adds ~0 weights); frost and
# elastic trade image weight / affine jitter against the rest; spatter turns from water (s3)
# to mud (s4); saturate desaturates at s1-2 and only x1.5 at s3.
NOT_MONOTONE = {"glass_blur", "motion_blur", "frost", "elastic_transform", "spatter", "saturate"}


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


def _damage(images, name, s, seed=0):
    return np.abs(C.corrupt(images, name, s, seed=seed).astype(np.float64) - images).mean()


# ---------------------------------------------------------------------------- contract
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


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_differ_per_image(images, name):
    same = np.repeat(images[:1], 3, axis=0)
    out = C.corrupt(same, name, 3, seed=0)
    assert not np.array_equal(out[0], out[1])  # a noise map / angle / crop per image, not one per batch


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_other_image_sizes(name):
    x = np.random.default_rng(0).integers(30, 220, size=(2, 24, 40, 3), dtype=np.uint8)
    out = C.corrupt(x, name, 5, seed=0)
    assert out.shape == x.shape and out.dtype == np.uint8


def test_bad_arguments():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(CompetitionError, match="unknown corruption"):
        C.corrupt(x, "rain", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(CompetitionError, match="severity"):
            C.corrupt(x, "fog", severity)
    for seed in (-1, 1.5, "0"):
        with pytest.raises(CompetitionError, match="seed"):
            C.corrupt(x, "fog", 1, seed=seed)
    with pytest.raises(CompetitionError, match="seed"):
        C.make_suite(x, "/nonexistent/never-written", seed=-1)
    with pytest.raises(CompetitionError, match="uint8"):
        C.corrupt(x.astype(np.float32), "fog", 1)
    assert C.corrupt(x[:0], "fog", 1).shape == (0, 32, 32, 3)


# ---------------------------------------------------------------------------- severity
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_damage_grows_with_severity(images, name):
    damage = [_damage(images, name, s) for s in range(1, SEVERITIES + 1)]
    assert min(damage) > 0
    if name not in NOT_MONOTONE:
        assert all(b >= a for a, b in zip(damage, damage[1:])), damage
    else:
        assert damage[4] > 0.5 * damage[0], damage  # still a real corruption at the top


# ---------------------------------------------------------------------------- the published tables
def test_published_parameters():
    """make_cifar_c.py's 32x32 tables (hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py)."""
    assert C.GAUSSIAN_NOISE == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert C.SHOT_NOISE == (500, 250, 100, 75, 50)
    assert C.IMPULSE_NOISE == (0.01, 0.02, 0.03, 0.05, 0.07)
    assert C.SPECKLE_NOISE == (0.06, 0.1, 0.12, 0.16, 0.2)
    assert C.DEFOCUS_BLUR == ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
    assert C.GLASS_BLUR == ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
    assert C.MOTION_BLUR == ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
    assert [len(np.arange(1, stop, 0.01)) for stop in C.ZOOM_BLUR] == [7, 12, 16, 21, 26]
    assert C.GAUSSIAN_BLUR == (0.4, 0.6, 0.7, 0.8, 1)
    assert C.SNOW[0] == (0.1, 0.2, 1, 0.6, 8, 3, 0.95) and C.SNOW[4] == (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)
    assert C.FROST == ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)) and C.FROST_RESIZE == 0.2
    assert C.FOG == ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
    assert [row[5] for row in C.SPATTER] == [0, 0, 0, 1, 1]  # water, then mud
    assert C.BRIGHTNESS == (0.05, 0.1, 0.15, 0.2, 0.3)
    assert C.CONTRAST == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert C.SATURATE == ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))
    # flattened: pytest >= 9.2's approx refuses nested sequences
    assert [32 * f for row in C.ELASTIC for f in row] == pytest.approx(
        [0, 0, 2.56, 1.6, 6.4, 2.24, 2.56, 1.92, 1.92, 3.2, 1.28, 1.6, 3.2, 0.96, 0.96])
    assert all(len(row) == 3 for row in C.ELASTIC) and len(C.ELASTIC) == 5
    assert C.PIXELATE == (0.95, 0.9, 0.85, 0.75, 0.65)
    assert C.JPEG_QUALITY == (80, 65, 58, 50, 40)


# ---------------------------------------------------------------------------- behaviour
def test_gaussian_noise_has_the_published_std():
    grey = np.full((8, 32, 32, 3), 128, np.uint8)
    for s, std in enumerate(C.GAUSSIAN_NOISE, start=1):
        residual = C.corrupt(grey, "gaussian_noise", s).astype(np.float64) - 127.5  # truncation: -0.5 on average
        assert residual.std() / 255 == pytest.approx(std, rel=0.03)
        assert abs(residual.mean()) < 0.3


def test_shot_and_impulse_noise_statistics():
    grey = np.full((8, 32, 32, 3), 102, np.uint8)  # 0.4
    for s, photons in enumerate(C.SHOT_NOISE, start=1):
        out = C.corrupt(grey, "shot_noise", s) / 255.
        assert out.std() == pytest.approx(math.sqrt(0.4 / photons), rel=0.05)  # poisson(x c) / c
    for s, amount in enumerate(C.IMPULSE_NOISE, start=1):
        out = C.corrupt(grey, "impulse_noise", s)
        # per channel value, not per pixel: a hit pixel usually has one channel changed
        assert (out == 255).mean() == pytest.approx(amount / 2, rel=0.15)
        assert (out == 0).mean() == pytest.approx(amount / 2, rel=0.15)
        assert ((out != 102).sum(-1) == 1).mean() > 0.8 * (1 - (1 - amount) ** 3)


def test_contrast_scales_each_channel_by_the_published_factor(images):
    for s, factor in enumerate(C.CONTRAST, start=1):
        out = C.corrupt(images, "contrast", s).astype(np.float64)
        ratio = out.std(axis=(1, 2)) / images.std(axis=(1, 2))
        np.testing.assert_allclose(ratio, factor, rtol=0.03, atol=0.01)


def test_brightness_raises_hsv_value_by_the_published_amount(images):
    value = images.max(-1) / 255.
    for s, amount in enumerate(C.BRIGHTNESS, start=1):
        out = C.corrupt(images, "brightness", s).max(-1) / 255.
        np.testing.assert_allclose(out, np.minimum(value + amount, 1), atol=1.01 / 255)  # truncation: <= 1 level


def test_jpeg_and_pixelate_are_pils(images):
    from PIL import Image

    for s, quality in enumerate(C.JPEG_QUALITY, start=1):
        out = C.corrupt(images, "jpeg_compression", s)
        for im, got in zip(images, out):
            buffer = io.BytesIO()
            Image.fromarray(im).save(buffer, "JPEG", quality=quality)
            np.testing.assert_array_equal(got, np.asarray(Image.open(buffer)))
    out = C.corrupt(images, "pixelate", 5)
    small = Image.fromarray(images[0]).resize((20, 20), Image.BOX)  # int(32 * 0.65)
    np.testing.assert_array_equal(out[0], np.asarray(small.resize((32, 32), Image.BOX)))


def test_glass_blur_is_make_cifar_cs_loop(images):
    """The one-gather-per-iteration version equals make_cifar_c's per-pixel loop, run literally
    (its tuple 'swap' of two numpy views copies the partner into the pixel), fed the same draws."""
    from scipy.ndimage import gaussian_filter

    x = images[:2]
    for s in (1, 4):
        sigma, delta, iterations = C.GLASS_BLUR[s - 1]
        got = C.glass_blur(x, s - 1, np.random.default_rng(7))
        twin = np.random.default_rng(7)
        draws = [twin.integers(-delta, delta, size=(len(x), 30 * 30, 2)) for _ in range(iterations)]
        for i, im in enumerate(x):
            y = (gaussian_filter(im / 255., (sigma, sigma, 0), mode="nearest") * 255).astype(np.uint8)
            for d in draws:
                t = 0
                for h in range(32 - delta, delta, -1):
                    for w in range(32 - delta, delta, -1):
                        dx, dy = d[i, t]
                        t += 1
                        y[h, w], y[h + dy, w + dx] = y[h + dy, w + dx], y[h, w]
            want = (np.clip(gaussian_filter(y / 255., (sigma, sigma, 0), mode="nearest"), 0, 1) * 255).astype(np.uint8)
            np.testing.assert_array_equal(got[i], want)
    # Severity 1's sigma (0.05) blurs nothing: each pixel from row/column 2 on is itself or its
    # up, left or up-left neighbour; rows and columns 0-1 are never written.
    out = C.corrupt(x, "glass_blur", 1).astype(int)
    np.testing.assert_array_equal(out[:, :2], x[:, :2])
    np.testing.assert_array_equal(out[:, :, :2], x[:, :, :2])
    inner = x.astype(int)
    candidates = np.stack([inner[:, 2:, 2:], inner[:, 1:-1, 2:], inner[:, 2:, 1:-1], inner[:, 1:-1, 1:-1]])
    assert (np.abs(candidates - out[None, :, 2:, 2:]).sum(-1) == 0).any(0).all()
    assert not np.array_equal(out, x)


def _magick_reference(img, radius, sigma, angle):
    """ImageMagick 6's MotionBlurImageChannel, pixel by pixel, as its C source reads."""
    width = int(2 * math.ceil(radius) + 1)
    k = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(width)]
    k = [v / sum(k) for v in k]
    px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    offsets = [(math.ceil(i * py / math.hypot(px, py) - 0.5), math.ceil(i * px / math.hypot(px, py) - 0.5))
               for i in range(width)]
    h, w = img.shape[:2]
    out = np.zeros(img.shape, np.float64)
    for y in range(h):
        for x in range(w):
            for i, (ox, oy) in enumerate(offsets):
                out[y, x] += k[i] * 257.0 * img[min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)]
    q = np.clip(np.floor(out + 0.5), 0, 65535).astype(np.int64)
    return (((q + 128) - ((q + 128) >> 8)) >> 8).astype(np.uint8)


def test_motion_blur_is_imagemagicks_one_sided_streak():
    dot = np.zeros((1, 15, 15), np.uint8)
    dot[0, 7, 7] = 255
    streak = C._magick_motion_blur(dot, 6, 2, np.array([0.0]))[0]
    # Angle 0 reads the pixels to the right: the dot is smeared to its left only (13 taps, the
    # farthest below half a grey level at sigma 2).
    assert streak[7, 1:8].min() > 0 and streak[7, 8:].max() == 0 and streak[[6, 8]].max() == 0
    assert list(streak[7, :8]) == sorted(streak[7, :8])  # Gaussian weights fall with distance
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 12, 12, 3), dtype=np.uint8)
    angles = np.array([-45.0, -10.0, 10.0, 33.0])
    got = C._magick_motion_blur(imgs, 8, 2, angles)
    for im, a, g in zip(imgs, angles, got):
        np.testing.assert_array_equal(g, _magick_reference(im, 8, 2, a))


def test_frost_blends_the_photographs():
    if C.frost_source() != "photos":
        pytest.skip("frost photographs not installed: pip install --no-deps imagecorruptions==1.1.2")
    photos = C._frost_photos()
    # cv2.imread of the paper's six photos, resized by 0.2 (frost1 is 900x600, frost4 527x350)
    assert [p.shape for p in photos[:4]] == [(120, 180, 3), (63, 112, 3), (63, 112, 3), (70, 105, 3)]
    black = np.zeros((3, 32, 32, 3), np.uint8)
    got = C.frost(black, 4, np.random.default_rng(3))  # severity 5: 0.45 * photo crop
    twin = np.random.default_rng(3)
    picked = twin.integers(C.FROST_PICKED, size=3)
    for i, k in enumerate(picked):
        top, left = twin.integers(0, photos[k].shape[0] - 32), twin.integers(0, photos[k].shape[1] - 32)
        want = (0.45 * photos[k][top:top + 32, left:left + 32]).astype(np.uint8)
        np.testing.assert_array_equal(got[i], want)


def test_frost_without_photographs_warns_once_and_is_recorded(images, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "_frost_photos", lambda: None)
    monkeypatch.setattr(C, "_FROST_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = C.corrupt(images, "frost", 3)
        C.corrupt(images, "frost", 4)
    assert out.shape == images.shape and not np.array_equal(out, images)
    assert len([w for w in caught if "imagecorruptions" in str(w.message)]) == 1
    C.make_suite(images, tmp_path, names=["frost"], workers=1)
    assert json.loads((tmp_path / "corruptions.json").read_text())["frost"] == "stand-in"


# ---------------------------------------------------------------------------- make_suite
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
    assert manifest["version"] == C.SUITE_VERSION and "frost" not in manifest
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
    # The suite's one command line is `python -m competition.score suite`.
    from competition import score

    src = tmp_path / "held_out.npy"
    np.save(src, images)
    score.main(["suite", "--out", str(tmp_path / "ood"), "--images", str(src), "--n", "4", "--names",
                "fog,jpeg_compression", "--preview", str(tmp_path / "previews"), "--preview-images", "1"])
    assert len(ood_files(tmp_path / "ood", expected=None)) == 2
    assert open_ood(tmp_path / "ood" / "distortion01.npy").shape == (4 * SEVERITIES, 32, 32, 3)
    for name in ("fog", "jpeg_compression", "all"):  # a PNG per corruption, and the grid of all
        assert (tmp_path / "previews" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 corruptions x 5 severities x 4 images" in capsys.readouterr().out
