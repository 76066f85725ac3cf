"""CIFAR-C-style corruption suite: 19 corruptions x 5 severities, written in the OOD file format.

The competition's OOD test set is CIFAR-100-C-like: one corruption type per file, five
severities each. To estimate the leaderboard offline we corrupt held-out images the same
way and write them exactly like the real files, so they go through the same prediction path:

    out_dir/distortion00.npy .. distortion18.npy   uint8 (5*N, H, W, 3), severity-major:
                                                   rows [(s-1)*N, s*N) are severity s = 1..5
    out_dir/corruptions.json                       names per file, seed, N, source fingerprint
    out_dir/labels.npy                             (N,) labels when given; the same for every
                                                   file and severity (np.tile(labels, 5) per file)

    python -m competition.corruptions --out data/ood-local --dataset cifar100 --n 2000
    python -m competition.corruptions --out /tmp/ood --n 200 --preview corruptions.png
    python -m competition.corruptions --out /tmp/ood --images held_out.npy --names fog,snow

Strengths follow the CIFAR-10-C table of Hendrycks & Dietterich (make_cifar_c.py), which is
calibrated for 32x32 images; each deviation is commented where its parameters are defined.
Albumentations does the work where it has the operation and a fixed severity can be
expressed in its parameters (ranges collapsed to one value); the rest is numpy/OpenCV, with
the reason given. Random parts (noise maps, kernels' angles, masks) differ per image but are
reproducible: every (seed, corruption, severity) gets its own derived seed.

Timing, 2,000 CIFAR images x 95 variants (190,000 images, 580 MB written), 2-core VM:
~17 s with the default 2 worker processes, 25-32 s in one process (--workers 1). Seconds per
corruption, all five severities, one process: shot_noise 4.3, spatter 3.8, zoom_blur 3.7,
glass_blur 2.3, motion_blur 2.2, elastic 2.2, snow 2.0, frost 1.6, defocus 1.4, the other ten
0.4-1.0 each; plus ~1.5 s to import albumentations. A second run with the same images, seed
and names is skipped (0.0 s).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from competition.data import SEVERITIES, check_images, ood_name
from competition.files import CompetitionError, cli, save_json, save_npy

# Fixed order: file distortionNN.npy holds CORRUPTIONS[NN]. Append new ones at the end only,
# so that a suite's file numbers keep their meaning.
CORRUPTIONS: list[str] = [
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur",
    "snow", "frost", "fog", "spatter",
    "brightness", "contrast", "saturate",
    "elastic_transform", "pixelate", "jpeg_compression",
]
# Corruptions with no random draw: the seed does not change their output.
DETERMINISTIC = frozenset({"defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast",
                           "saturate", "pixelate", "jpeg_compression"})
# Bump when any parameter or algorithm below changes, so make_suite regenerates old suites.
SUITE_VERSION = 1

def _albumentations():
    """Import albumentations lazily (it takes ~1.5 s) and without its start-up version check,
    which calls PyPI and waits out a timeout on offline machines."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    major = int(A.__version__.split(".")[0]) if A.__version__[0].isdigit() else 0
    if major < 2:
        raise CompetitionError(f"competition.corruptions needs albumentations >= 2.0 (Compose(seed=), ShotNoise), "
                               f"found {A.__version__}: pip install -U 'albumentations>=2'")
    return A


def _each(transform, images: np.ndarray, seed: int) -> np.ndarray:
    """Apply one albumentations transform image by image through a seeded pipeline.

    Per image, not `images=` (albumentations 2's batch target): the batch target draws one
    noise map / kernel / mask for the whole batch, while corruptions must differ per image.
    Compose(seed=) gives the pipeline its own generators, so global RNG state is irrelevant.
    """
    A = _albumentations()
    pipe = A.Compose([transform], seed=int(seed))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = pipe(image=image)["image"]
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounded (truncation would darken every image by 0.5)."""
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- noise
# std as a fraction of 255 (CIFAR-10-C values).
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
# CIFAR-10-C draws poisson(x * c) / c with c = 500, 250, 100, 75, 50 photons. Albumentations
# draws photons in linear light (gamma 2.2), where scale = 1/c changes images ~25% less;
# 1.6 / c matches CIFAR-C's mean absolute change on CIFAR images (5.8 vs 5.9 grey levels at
# severity 1, 19.8 vs 18.1 at 5).
SHOT_NOISE = tuple(1.6 / c for c in (500, 250, 100, 75, 50))
# Fraction of pixels set to black or white (CIFAR-10-C values; skimage draws per channel value,
# albumentations per pixel: the same fraction of values changes, in white/black rather than colour).
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
# CIFAR-C: x + x * N(0, c). MultiplicativeNoise multiplies by U(1 - a, 1 + a): a = sqrt(3) c has
# the same standard deviation.
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)


def gaussian_noise(images, s, seed):
    A = _albumentations()
    std = GAUSSIAN_NOISE[s]
    return _each(A.GaussNoise(std_range=(std, std), mean_range=(0, 0), per_channel=True, p=1), images, seed)


def shot_noise(images, s, seed):
    A = _albumentations()
    scale = SHOT_NOISE[s]
    return _each(A.ShotNoise(scale_range=(scale, scale), p=1), images, seed)


def impulse_noise(images, s, seed):
    A = _albumentations()
    amount = IMPULSE_NOISE[s]
    return _each(A.SaltAndPepper(amount=(amount, amount), salt_vs_pepper=(0.5, 0.5), p=1), images, seed)


def speckle_noise(images, s, seed):
    A = _albumentations()
    a = float(np.sqrt(3) * SPECKLE_NOISE[s])
    return _each(A.MultiplicativeNoise(multiplier=(1 - a, 1 + a), per_channel=True, elementwise=True, p=1),
                 images, seed)


# ---------------------------------------------------------------------------- blur
# (disk radius in px, anti-alias sigma). CIFAR-10-C's severities 3-5, then radii 2 and 2.5:
# its severities 1-2 (radius 0.3-0.4) leave 32x32 images visibly unchanged.
DEFOCUS_BLUR = ((0.5, 0.6), (1.0, 0.2), (1.5, 0.1), (2.0, 0.1), (2.5, 0.1))
# (sigma, max_delta px, iterations): CIFAR-10-C values.
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# Kernel length in px. CIFAR-10-C uses ImageMagick's one-sided Gaussian streak (radius 6-9,
# sigma 1-2.5); a centred line of about 2 sigma + 1 px spreads a pixel as far.
MOTION_BLUR = (3, 5, 5, 7, 7)
# Largest zoom factor. CIFAR-10-C averages zooms arange(1, m, 0.01) for m = 1.06 .. 1.26, whose
# first severity is invisible here; we start at its second and go to 1.41. Steps of 0.02 halve
# the work (each zoom is a resize) and average to the same blur at 32x32.
ZOOM_BLUR = (1.11, 1.16, 1.21, 1.31, 1.41)
ZOOM_STEP = 0.02
# sigma in px. CIFAR-10-C: 0.4, 0.6, 0.7, 0.8, 1.0; 0.4 changes nothing visible at 32x32.
GAUSSIAN_BLUR = (0.6, 0.8, 1.0, 1.2, 1.5)


def defocus_blur(images, s, seed):
    # By hand: albumentations' Defocus takes an integer radius >= 1, but at 32x32 the CIFAR-C
    # radii are sub-pixel (0.3-0.5: only the anti-alias blur acts) and radius 1 is already
    # severity 4. The kernel is the same construction: a disk, smoothed by a 3x3 Gaussian.
    import cv2

    radius, alias = DEFOCUS_BLUR[s]
    r = np.arange(-int(np.ceil(radius)) - 1, int(np.ceil(radius)) + 2)  # a zero ring for the 3x3 smoothing
    xx, yy = np.meshgrid(r, r)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
    kernel = cv2.GaussianBlur(disk / disk.sum(), (3, 3), alias)
    return np.stack([cv2.filter2D(im, -1, kernel) for im in images])


def glass_blur(images, s, seed):
    A = _albumentations()
    sigma, delta, iterations = GLASS_BLUR[s]
    # "fast" swaps all pixels at once; "exact" is CIFAR-C's sequential Python loop, ~30x slower.
    return _each(A.GlassBlur(sigma=sigma, max_delta=delta, iterations=iterations, mode="fast", p=1), images, seed)


def motion_blur(images, s, seed):
    A = _albumentations()
    k = MOTION_BLUR[s]
    # Within 45 degrees of horizontal, as CIFAR-C (a centred line: 135..225 = -45..45 degrees;
    # albumentations wants angles in 0..360). No random shift of the kernel, which would
    # translate the image rather than blur it.
    return _each(A.MotionBlur(blur_limit=(k, k), angle_range=(135, 225), direction_range=(0, 0),
                              allow_shifted=False, p=1), images, seed)


def zoom_blur(images, s, seed):
    A = _albumentations()
    m = ZOOM_BLUR[s]
    return _each(A.ZoomBlur(max_factor=(m, m), step_factor=(ZOOM_STEP, ZOOM_STEP), p=1), images, seed)


def gaussian_blur(images, s, seed):
    A = _albumentations()
    sigma = GAUSSIAN_BLUR[s]
    return _each(A.GaussianBlur(sigma_limit=(sigma, sigma), blur_limit=0, p=1), images, seed)


# ---------------------------------------------------------------------------- weather
# (flake mean, flake std, zoom, threshold, streak radius px, streak sigma px, image weight):
# CIFAR-10-C values.
SNOW = ((0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
# (image weight, frost weight): CIFAR-10-C values, over a synthetic frost texture (below).
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
# (fog strength, fractal roughness decay): CIFAR-10-C values.
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
# (mean, std, sigma, threshold, intensity, mode): CIFAR-10-C values; water, then mud.
SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, "rain"),
           (0.65, 0.1, 0.8, 0.7, 0.5, "rain"),
           (0.65, 0.3, 1.0, 0.69, 0.5, "rain"),
           (0.65, 0.1, 0.7, 0.69, 0.6, "mud"),
           (0.65, 0.1, 0.5, 0.68, 0.6, "mud"))


def _plasma(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """n fractal height maps (n, size, size) in [0, 1] by diamond-square on a torus, vectorised
    over the batch. `decay` > 1: how fast detail fades per octave (small = rough)."""
    side = 1 << max(1, int(np.ceil(np.log2(size))))  # diamond-square needs a power of two
    m = np.zeros((n, side, side))
    step, amp = side, 1.0

    def jitter(total):  # mean of the four neighbours plus noise of this octave's amplitude
        return total / 4 + rng.uniform(-amp, amp, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        square = corners + np.roll(corners, -1, axis=1)
        m[:, half::step, half::step] = jitter(square + np.roll(square, -1, axis=2))
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        m[:, ::step, half::step] = jitter(centres + np.roll(centres, 1, axis=1)
                                          + corners + np.roll(corners, -1, axis=2))
        m[:, half::step, ::step] = jitter(centres + np.roll(centres, 1, axis=2)
                                          + corners + np.roll(corners, -1, axis=1))
        step, amp = half, amp / decay ** 2
    m = m[:, :size, :size]
    m -= m.min(axis=(1, 2), keepdims=True)
    return (m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)).astype(np.float32)


def _streak_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick-style motion-blur kernel: a one-sided Gaussian streak along `angle_deg`."""
    t = np.arange(radius + 1, dtype=np.float32)
    w = np.exp(-t ** 2 / (2 * sigma ** 2))
    k = np.zeros((2 * radius + 1, 2 * radius + 1), np.float32)
    a = np.deg2rad(angle_deg)
    ys = np.clip(np.round(radius + t * np.sin(a)).astype(int), 0, 2 * radius)
    xs = np.clip(np.round(radius + t * np.cos(a)).astype(int), 0, 2 * radius)
    np.add.at(k, (ys, xs), w)
    return k / k.sum()


def _zoom_centre(layers: np.ndarray, factor: float) -> np.ndarray:
    """Zoom (n, h, w) layers about their centre by `factor` >= 1, keeping their size."""
    import cv2

    n, h, w = layers.shape
    if factor <= 1:
        return layers
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = layers[:, top:top + ch, left:left + cw]
    zh, zw = int(round(ch * factor)), int(round(cw * factor))
    big = np.stack([cv2.resize(c, (zw, zh), interpolation=cv2.INTER_LINEAR) for c in crop])
    t, l = (zh - h) // 2, (zw - w) // 2
    return big[:, t:t + h, l:l + w]


def snow(images, s, seed):
    # By hand: albumentations' RandomSnow only bleaches or tints bright regions ("bleach"
    # posterises 32x32 images; "texture" overflows to black above snow_point ~0.4); CIFAR-C
    # snow is falling flakes: thresholded noise, streaked by a motion blur, added on top.
    import cv2

    mean, std, zoom, threshold, radius, sigma, keep = SNOW[s]
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    flakes = rng.normal(mean, std, size=(n, h, w)).astype(np.float32)
    flakes = _zoom_centre(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes = np.clip(flakes, 0, 1)
    angles = rng.uniform(-135, -45, size=n)  # falling, up to 45 degrees off vertical
    flakes = np.stack([cv2.filter2D(f, -1, _streak_kernel(radius, sigma, a)) for f, a in zip(flakes, angles)])
    flakes = flakes[..., None]
    x = images.astype(np.float32) / 255
    grey = x @ np.float32([0.299, 0.587, 0.114])
    x = keep * x + (1 - keep) * np.maximum(x, grey[..., None] * 1.5 + 0.5)  # snowy light: whiter, flatter
    return _to_uint8(x + flakes + flakes[:, ::-1, ::-1])  # flakes rotated 180 deg: a second layer


def frost(images, s, seed):
    # By hand: CIFAR-C blends crops of six frost photographs, which are not available here, and
    # albumentations has no frost. The synthetic ice has what those crops show at 32x32: broad
    # bright patches plus a dense net of thin crystals (ridges of two rough fractals: 1 where a
    # fractal crosses its midpoint), faintly blue; mean ~0.5 like the photos.
    keep, weight = FROST[s]
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    size = max(h, w)
    patches = _plasma(n, size, 1.8, rng)
    crystals = np.maximum(*[(1 - np.abs(2 * _plasma(n, size, 1.3, rng) - 1)) ** 8 for _ in range(2)])
    ice = np.clip(0.5 * patches + 0.7 * crystals, 0, 1)[:, :h, :w, None]
    x = keep * images.astype(np.float32) / 255 + weight * ice * np.float32([0.85, 0.93, 1.0])
    return _to_uint8(x)


def fog(images, s, seed):
    # By hand: albumentations' RandomFog paints white discs and then blurs (at 32x32 it mostly
    # blurs) and takes ~9 ms per image; CIFAR-C fog adds a plasma fractal, then rescales.
    strength, decay = FOG[s]
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    x = images.astype(np.float32) / 255
    top = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma(n, max(h, w), decay, rng)[:, :h, :w, None]
    return _to_uint8(x * top / (top + strength))


def spatter(images, s, seed):
    A = _albumentations()
    mean, std, sigma, threshold, intensity, mode = SPATTER[s]
    return _each(A.Spatter(mean=(mean, mean), std=(std, std), gauss_sigma=(sigma, sigma),
                           cutout_threshold=(threshold, threshold), intensity=(intensity, intensity),
                           mode=mode, p=1), images, seed)


# ---------------------------------------------------------------------------- digital
# Added to HSV value (CIFAR-10-C values).
BRIGHTNESS = (0.05, 0.10, 0.15, 0.20, 0.30)
# Factor on the distance from each channel's mean (CIFAR-10-C values).
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
# HSV saturation * a + b (CIFAR-10-C values): desaturate at 1-2, oversaturate at 3-5.
SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))
# (alpha px, sigma px) of the displacement field. Not CIFAR-10-C's table: there a random affine
# dominates and weakens with severity (mean abs change 23 at s1, 15 at s5), so severity
# would not order the damage; here a smooth field grows from a wobble to a heavy warp.
ELASTIC = ((6, 3.0), (12, 3.0), (18, 3.0), (26, 3.0), (36, 3.0))
# Downscale factor before scaling back up. CIFAR-10-C's 0.95 .. 0.65 (to 30 .. 21 px) is barely
# visible; these go from 26 px to 10 px blocks of 3x3.
PIXELATE = (0.8, 0.65, 0.5, 0.4, 0.3)
# JPEG quality. CIFAR-10-C's 80 .. 40 is invisible at 32x32; these are ImageNet-C's values.
JPEG_QUALITY = (25, 18, 15, 10, 7)


def brightness(images, s, seed):
    A = _albumentations()
    # uint8 HSV (V in 0..255): within 1 grey level on average of CIFAR-C's float HSV (at most 6).
    v = BRIGHTNESS[s] * 255
    return _each(A.HueSaturationValue(hue_shift_limit=(0, 0), sat_shift_limit=(0, 0), val_shift_limit=(v, v), p=1),
                 images, seed)


def contrast(images, s, seed):
    # By hand: albumentations' RandomBrightnessContrast scales about 0 (x * a + b), so a fixed
    # contrast factor darkens instead of flattening; CIFAR-C pulls each channel to its mean.
    c = CONTRAST[s]
    x = images.astype(np.float32) / 255
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - means) * c + means)


def saturate(images, s, seed):
    # By hand: HueSaturationValue only shifts saturation; CIFAR-C multiplies it. Float HSV in
    # one cv2 call each way: colour conversion is per pixel, so the batch goes as one tall image.
    import cv2

    a, b = SATURATE[s]
    n, h, w, _ = images.shape
    hsv = cv2.cvtColor(images.reshape(n * h, w, 3).astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    return _to_uint8(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)).reshape(images.shape)


def elastic_transform(images, s, seed):
    import cv2

    A = _albumentations()
    alpha, sigma = ELASTIC[s]
    return _each(A.ElasticTransform(alpha=alpha, sigma=sigma, noise_distribution="uniform",
                                    border_mode=cv2.BORDER_REFLECT_101, p=1), images, seed)


def pixelate(images, s, seed):
    import cv2

    A = _albumentations()
    f = PIXELATE[s]
    # Area down (a box filter, as CIFAR-C's PIL BOX), nearest up: the blocky look.
    return _each(A.Downscale(scale_range=(f, f), interpolation_pair={"downscale": cv2.INTER_AREA,
                                                                     "upscale": cv2.INTER_NEAREST}, p=1),
                 images, seed)


def jpeg_compression(images, s, seed):
    A = _albumentations()
    q = JPEG_QUALITY[s]
    return _each(A.ImageCompression(compression_type="jpeg", quality_range=(q, q), p=1), images, seed)


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    name: globals()[name] for name in CORRUPTIONS}


# ---------------------------------------------------------------------------- API
def derived_seed(seed: int, name: str, severity: int) -> int:
    """The seed one (corruption, severity) uses: independent streams per variant, stable when
    the list of corruptions is reordered or subset (keyed by name, not position)."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity)]).generate_state(1)[0])


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, 3) with corruption `name` at `severity` 1..5.

    Returns a new uint8 array of the same shape; the same (images, name, severity, seed)
    always gives the same output.
    """
    check_images(images, "corrupt(images)")
    if name not in _FUNCTIONS:
        raise CompetitionError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= SEVERITIES:
        raise CompetitionError(f"severity must be an integer 1..{SEVERITIES}, got {severity!r}")
    if int(seed) < 0:
        raise CompetitionError(f"seed must be >= 0, got {seed}")
    if len(images) == 0:
        return images.copy()
    out = _FUNCTIONS[name](np.ascontiguousarray(images), int(severity) - 1, derived_seed(seed, name, severity))
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(images.shape)


def fingerprint(array: np.ndarray) -> str:
    """sha1 of an array's dtype, shape and bytes: which source a suite was made from."""
    h = hashlib.sha1(f"{array.dtype}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def make_suite(images: np.ndarray, out_dir, seed: int = 0, names=CORRUPTIONS,
               labels: np.ndarray | None = None, workers: int | None = None) -> list[Path]:
    """Write `distortionNN.npy` (NN = position in `names`) in the competition's OOD format,
    plus `corruptions.json` (and `labels.npy` when labels are given). Returns the file paths.

    Skips all work when the directory already holds this suite (same names, seed, N, source
    fingerprint and SUITE_VERSION). The json says "complete": false while files are being
    written, so an interrupted run is redone rather than mistaken for a finished one.
    `workers`: processes, one corruption file each (None: one per CPU for >= 500 images,
    where it pays for the ~2 s start of each; 1: in this process).
    """
    check_images(images, "make_suite(images)")
    names = list(names)
    unknown = [n for n in names if n not in _FUNCTIONS]
    if unknown or not names:
        raise CompetitionError(f"unknown corruption(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(CORRUPTIONS)}")
    if len(images) == 0:
        raise CompetitionError("make_suite: no images to corrupt")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise CompetitionError(f"make_suite: {len(images)} images but labels of shape {labels.shape}")
    out_dir = Path(out_dir)
    manifest_path = out_dir / "corruptions.json"
    paths = [out_dir / ood_name(i) for i in range(len(names))]
    manifest = {
        "format": "distortionNN.npy: uint8 (5*N, H, W, 3), rows [(s-1)*N, s*N) are severity s",
        "version": SUITE_VERSION,
        "names": {ood_name(i): name for i, name in enumerate(names)},
        "seed": int(seed),
        "n": len(images),
        "image_shape": list(images.shape[1:]),
        "source_sha1": fingerprint(images),
        "labels_sha1": None if labels is None else fingerprint(labels),
        "complete": True,
    }
    old = _read_manifest(manifest_path)
    existing = sorted(out_dir.glob("distortion[0-9][0-9].npy")) if out_dir.is_dir() else []
    if old is None and existing:
        # Never overwrite OOD files this suite did not write: they may be the real test set.
        raise CompetitionError(f"{out_dir} holds {existing[0].name} (and maybe more) but no corruptions.json: "
                               f"it is not a corruption suite (the real OOD files?); choose another --out")
    if old == manifest and all(p.exists() for p in paths) and (labels is None or (out_dir / "labels.npy").exists()):
        return paths
    save_json(manifest_path, {**manifest, "complete": False})
    for stale in existing:  # a previous suite with more corruptions: drop the extra files
        if stale not in paths:
            stale.unlink()
    if workers is None:
        workers = (os.cpu_count() or 1) if len(images) >= 500 else 1
    workers = max(1, min(workers, len(names)))
    if workers == 1:
        for name, path in zip(names, paths):
            _write_file(images, name, seed, path)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (torch, accelerate) that fork would copy
        # in whatever state they are in.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            list(pool.map(_write_file, [images] * len(names), names, [seed] * len(names), paths))
    if labels is not None:
        save_npy(out_dir / "labels.npy", labels.astype(np.int64))
    elif (out_dir / "labels.npy").exists():  # a previous suite's labels would mislabel this one
        (out_dir / "labels.npy").unlink()
    save_json(manifest_path, manifest)
    return paths


def _init_worker():
    import cv2

    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe


def _write_file(images: np.ndarray, name: str, seed: int, path: Path) -> Path:
    variants = [corrupt(images, name, s, seed) for s in range(1, SEVERITIES + 1)]
    save_npy(path, np.concatenate(variants))  # (5N, H, W, 3), severity-major
    return path


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treat as a suite of ours that needs rewriting


def preview(images: np.ndarray, path, seed: int = 0, names=CORRUPTIONS) -> Path:
    """Draw a PNG grid: one row per corruption, columns clean + severities 1..5, for each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names)
    k = len(images)
    cols = k * (SEVERITIES + 1)
    fig, axes = plt.subplots(len(names), cols, figsize=(cols * 0.9 + 1.3, len(names) * 0.95 + 0.3), squeeze=False)
    for r, name in enumerate(names):
        variants = [images] + [corrupt(images, name, s, seed) for s in range(1, SEVERITIES + 1)]
        for i in range(k):
            for j, v in enumerate(variants):
                ax = axes[r, i * (SEVERITIES + 1) + j]
                ax.imshow(v[i], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("clean" if j == 0 else f"s{j}", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    # Room on the left for the row names (tight_layout would crop long ones).
    fig.subplots_adjust(left=1.3 / fig.get_figwidth(), right=0.995, top=1 - 0.3 / fig.get_figheight(),
                        bottom=0.005, wspace=0.05, hspace=0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- CLI
def _load_source(args) -> tuple[np.ndarray, np.ndarray | None]:
    if args.images:
        try:
            images = np.load(args.images, allow_pickle=False)
        except Exception as e:
            raise CompetitionError(f"{args.images} is not a readable .npy file ({type(e).__name__}: {e})") from None
        check_images(images, str(args.images))
        return images, None
    from competition.data import load

    data = load(args.dataset, split=args.split, data_dir=args.data_dir, path=args.data)
    if data is None:
        raise CompetitionError(f"{args.data} has no {args.split!r} split; pass --split train")
    return data.images, data.labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for distortionNN.npy + corruptions.json")
    p.add_argument("--n", type=int, default=2000, help="images to corrupt (a seeded random subset; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", default=",".join(CORRUPTIONS), help="comma-separated corruptions, in file order")
    p.add_argument("--dataset", default="digits", choices=("digits", "cifar100", "imagefolder"))
    p.add_argument("--data", help="imagefolder: folder or .tar.gz of [split/]<class>/<image>")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--split", default="test", help="which split to corrupt (held-out images)")
    p.add_argument("--images", help="a uint8 (N, H, W, 3) .npy to corrupt instead of --dataset")
    p.add_argument("--preview", help="also draw a PNG grid (rows = corruptions, cols = severities)")
    p.add_argument("--preview-images", type=int, default=2, help="images shown side by side in the preview")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU for >= 500 images)")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.names.split(",") if n.strip()]
    images, labels = _load_source(args)
    if 0 < args.n < len(images):
        idx = np.sort(np.random.default_rng(args.seed).choice(len(images), args.n, replace=False))
        images = images[idx]
        labels = None if labels is None else labels[idx]
    t0 = time.perf_counter()
    paths = make_suite(images, args.out, seed=args.seed, names=names, labels=labels, workers=args.workers)
    dt = time.perf_counter() - t0
    print(f"{len(paths)} files x {SEVERITIES} severities x {len(images)} images in {args.out} ({dt:.1f} s)")
    if args.preview:
        print(f"preview: {preview(images[:args.preview_images], args.preview, seed=args.seed, names=names)}")


if __name__ == "__main__":
    cli(main)()
