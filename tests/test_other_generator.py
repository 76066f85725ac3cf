"""bench/other_generator.py: the 19's families by albumentations from the published parameters.
Its comparison is only worth something if each family reads the published table (not some other
strength), is deterministic, lands in the suite format, and is paired with our suite's images."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from competition import corruptions as C
from competition import data

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("other_generator", ROOT / "bench" / "other_generator.py")
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)


@pytest.fixture
def images(smooth_images):
    return smooth_images


def test_only_families_of_the_19():
    assert set(other.FAMILIES) <= set(C.CORRUPTIONS)
    assert len(other.FAMILIES) == 10


@pytest.mark.parametrize("name", list(other.FAMILIES))
def test_family_is_deterministic_and_corrupts(images, name):
    a, b = other.corrupt(images, name, 5, seed=3), other.corrupt(images, name, 5, seed=3)
    assert a.dtype == np.uint8 and a.shape == images.shape and np.array_equal(a, b)
    assert np.abs(a.astype(np.float32) - images).mean() > 0.5, f"{name} leaves severity 5 nearly untouched"


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_has_the_published_std(severity):
    grey = np.full((20, 32, 32, 3), 128, np.uint8)  # mid-grey: nothing clipped
    noise = other.corrupt(grey, "gaussian_noise", severity).astype(np.float64) - 128
    assert noise.std() / 255 == pytest.approx(C.GAUSSIAN_NOISE[severity - 1], rel=0.05)


@pytest.mark.parametrize("severity", [1, 5])
def test_impulse_noise_hits_the_published_share(severity):
    grey = np.full((50, 32, 32, 3), 128, np.uint8)
    hit = (other.corrupt(grey, "impulse_noise", severity) != 128).any(-1).mean()
    assert hit == pytest.approx(C.IMPULSE_NOISE[severity - 1], rel=0.1)  # pixels (all channels), not values


def test_jpeg_is_opencvs_encoder_at_the_published_quality(images):
    # albumentations hands the RGB array to OpenCV as it is (OpenCV reads it as BGR): the same
    # bytes as encoding it unswapped, which is what the family's comment says
    ok, buf = cv2.imencode(".jpg", images[0], [cv2.IMWRITE_JPEG_QUALITY, C.JPEG_QUALITY[2]])
    expected = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    assert np.array_equal(other.corrupt(images[:1], "jpeg_compression", 3)[0], expected)


def test_suite_pairs_with_ours(images, tmp_path, capsys):
    labels = np.arange(len(images)) % 10
    src = {"split": "measure", "source_rows": list(range(len(images)))}
    other.make_suite(images, labels, tmp_path / "other", 0, ["contrast", "pixelate"], src,
                     corrupt_fn=other.corrupt, version="albumentations-test")
    C.make_suite(images, tmp_path / "ours", 0, ["contrast", "pixelate"], labels=labels, workers=1)
    ood = data.OodSet(tmp_path / "other")
    assert ood.info()["names"] == {"distortion00.npy": "contrast", "distortion01.npy": "pixelate"}
    assert np.array_equal(ood.images(1)[:len(images)], other.corrupt(images, "pixelate", 1))
    # our suite made without source rows: --compare refuses to pair images it cannot match
    with pytest.raises(SystemExit, match="different images"):
        other.main(["--compare", str(tmp_path / "run"), "--ours", str(tmp_path / "ours"),
                    "--other", str(tmp_path / "other")])
