"""Batch-level augmentation and input preparation (competition/augment.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition import augment
from competition.files import CompetitionError


def images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_to_input_normalises_and_resizes():
    x8 = torch.from_numpy(images())
    x = augment.to_input(x8, [0.5] * 3, [0.25] * 3)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 3, 4], (x8[0, 3, 4].float() / 255 - 0.5) / 0.25)
    assert augment.to_input(x8, [0.5] * 3, [0.25] * 3, 24).shape == (6, 3, 24, 24)
    with pytest.raises(CompetitionError, match="uint8"):
        augment.to_input(x8.float(), [0.5] * 3, [0.25] * 3)


def test_shrink_images_is_to_input_resize_rounded():
    x8 = images(300)
    small = augment.shrink_images(x8, 24, chunk=128)  # several chunks
    assert small.shape == (300, 24, 24, 3) and small.dtype == np.uint8
    mean, std = [0.0] * 3, [1 / 255] * 3  # to_input then returns pixel values
    direct = augment.to_input(torch.from_numpy(x8), mean, std, 24)
    once = augment.to_input(torch.from_numpy(small), mean, std, 24)  # already 24: no second resize
    assert (once - direct).abs().max() <= 0.5 + 1e-3


def test_flip_translate_moves_whole_images():
    x8 = torch.from_numpy(images(64))
    out = augment.flip_translate(x8, flip=True, translate=0, generator=torch.Generator().manual_seed(0))
    same = (out == x8).flatten(1).all(1)
    mirrored = (out == x8.flip(2)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    shifted = augment.flip_translate(x8, flip=False, translate=2, generator=torch.Generator().manual_seed(1))
    # Each image's centre 28x28 is its original shifted by at most 2 pixels each way.
    for a, b in zip(x8, shifted):
        assert any(torch.equal(b[2:30, 2:30], a[2 + dy:30 + dy, 2 + dx:30 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


@pytest.mark.parametrize("channels", [3, 1])
def test_flip_translate_gather_matches_byte_indexing(channels):
    """The packed int32 gather (3 channels) and the general one pick the same pixels as plain
    advanced indexing with the same random draws."""
    x8 = torch.randint(0, 256, (16, 12, 10, channels), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = augment.flip_translate(x8, flip=True, translate=3, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    shift = torch.randint(-3, 4, (16, 2), generator=g)
    mirror = torch.rand(16, 1, generator=g) < 0.5
    rows = augment.reflect_index(torch.arange(12) + shift[:, :1], 12)
    cols = augment.reflect_index(torch.arange(10) + shift[:, 1:], 10)
    cols = torch.where(mirror, 9 - cols, cols)
    assert torch.equal(out, x8[torch.arange(16)[:, None, None], rows[:, :, None], cols[:, None, :]])


def test_input_stats_match_a_float_reference():
    x8 = images(50)
    mean, std = augment.input_stats(x8, "data")
    ref = x8.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, ref.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, ref.std(0), atol=1e-5)
    assert augment.input_stats(x8, "none") == ([0.0] * 3, [1.0] * 3)
    with pytest.raises(CompetitionError, match="norm must be"):
        augment.input_stats(x8, "batch")
