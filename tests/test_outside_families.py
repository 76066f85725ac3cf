"""bench/outside_families.py: the measuring suite of corruptions outside the 19 and outside every
training recipe. Its figures are only worth something if every family is deterministic, gets
harsher with severity, and lands in the suite format predict and score read."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from competition import data

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("outside_families", ROOT / "bench" / "outside_families.py")
outside = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outside)


@pytest.fixture
def images(smooth_images):
    return smooth_images


@pytest.mark.parametrize("name", list(outside.FAMILIES))
def test_family_is_deterministic_and_harsher_with_severity(images, name):
    outs = [outside.corrupt(images, name, s, seed=3) for s in range(1, 6)]
    assert all(o.dtype == np.uint8 and o.shape == images.shape for o in outs)
    assert np.array_equal(outs[2], outside.corrupt(images, name, 3, seed=3))
    change = [np.abs(o.astype(np.float32) - images).mean() for o in outs]
    assert change[0] > 0.5, f"{name} barely changes the images at severity 1 ({change[0]:.2f})"
    assert all(b > a for a, b in zip(change, change[1:])), f"{name}: {np.round(change, 2)} not rising"


def test_suite_is_read_like_any_local_suite(images, tmp_path):
    labels = np.arange(len(images)) % 10
    names = ["glare", "sharpen"]
    outside.make_suite(images, labels, tmp_path / "s", seed=0, names=names, source={"split": "train", "fold": 0})
    ood = data.OodSet(tmp_path / "s")
    assert ood.info()["names"] == {"distortion00.npy": "glare", "distortion01.npy": "sharpen"}
    assert ood.info()["fold"] == 0
    assert ood.rows == [5 * len(images)] * 2
    assert np.array_equal(ood.labels, labels)
    assert np.array_equal(ood.images(1)[2 * len(images):3 * len(images)], outside.corrupt(images, "sharpen", 3, 0))


def test_refuses_a_folder_of_foreign_ood_files(images, tmp_path):
    np.save(tmp_path / "distortion00.npy", images)
    with pytest.raises(outside.CompetitionError, match="not a suite"):
        outside.make_suite(images, None, tmp_path, names=["glare"])
    assert np.array_equal(np.load(tmp_path / "distortion00.npy"), images)
