"""CIFAR-C corruption suite: 19 corruptions x 5 severities, written in the OOD file format.

The competition's OOD test set is CIFAR-100-C-like: one corruption type per file, five
severities each. To estimate the leaderboard offline we corrupt held-out images the same
way and write them exactly like the real files, so they go through the same prediction path:

    out_dir/distortion00.npy .. distortion18.npy   uint8 (5*N, H, W, 3), severity-major:
                                                   rows [(s-1)*N, s*N) are severity s = 1..5
    out_dir/corruptions.json                       names per file, seed, N, source fingerprint
    out_dir/labels.npy                             (N,) labels when given; the same for every
                                                   file and severity (np.tile(labels, 5) per file)

    python -m competition.score suite --out data/ood-local/c100 --dataset cifar100 --n 1000
    python -m competition.score suite --out /tmp/ood --n 200 --preview previews/   # + a PNG per corruption
    python -m competition.score suite --out /tmp/ood --images held_out.npy --names fog,snow

Fidelity: every corruption follows Hendrycks & Dietterich's make_cifar_c.py (ICLR 2019, the
script that made CIFAR-10-C and CIFAR-100-C): its 32x32 severity tables and its sequence of
operations, down to its float64 arithmetic and its final np.uint8 truncation. Written here in
numpy / scipy / OpenCV / PIL, vectorised over the batch, and deliberately without
albumentations: the training-time corruption augmentation uses albumentations, and the local
estimate must not score that augmentation against itself. Where the original calls a tool we
do not use, a reimplementation of that tool stands in, commented where it is used:
ImageMagick's motion blur (Wand) -> `_magick_motion_blur`; skimage's gaussian, random_noise
and rgb2hsv/hsv2rgb -> scipy / numpy; scipy's zoom and map_coordinates (order 1) -> sparse /
numpy interpolation with the same coordinate maps, exact up to float rounding. Random draws
come from numpy's Generator instead of the global RandomState, one stream per (seed,
corruption, severity), drawn per image: the same distributions, not the same pixels.

Frost blends crops of the paper's frost photographs, read from an installed copy of the
`imagecorruptions` package (it ships them; `pip install --no-deps imagecorruptions==1.1.2`:
its own dependency on opencv-python would clash with albumentations' opencv-python-headless,
and none of its code is imported), or from $COMPETITION_FROST_DIR. Without them, a synthetic
ice texture stands in and a warning says so once; corruptions.json records which was used.

Timing, 1,000 CIFAR-10 images x 95 variants (95,000 images, 280 MB written), 2-core VM:
10.5 s via make_suite with its default 2 worker processes (23 s while another job holds one
core), 20 s in one process (--workers 1). Seconds per corruption, all five severities, one
process: saturate 2.2, brightness 2.2, elastic 1.8, zoom_blur 1.4, motion_blur 1.4, shot_noise
1.2, glass_blur 1.2, snow 1.0, the other eleven 0.2-0.9 each. A second run with the same
images, seed and names is skipped (0.0 s).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from competition.data import SEVERITIES, check_images, fingerprint, ood_name
from competition.files import CompetitionError, save_json, save_npy

# Fixed order: file distortionNN.npy holds CORRUPTIONS[NN]. Append new ones at the end only,
# so that a suite's file numbers keep their meaning.
CORRUPTIONS: list[str] = [
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur",
    "snow", "frost", "fog", "spatter",
    "brightness", "contrast", "saturate",
    "elastic_transform", "pixelate", "jpeg_compression",
]
# The CIFAR-C corruptions by family (Hendrycks & Dietterich's grouping, plus the four extra
# corruptions in theirs): what a training recipe "saw" is reported by family, so the local
# score can give the mean over the corruptions a run did not train on.
FAMILIES = {
    "noise": ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"],
    "blur": ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"],
    "weather": ["snow", "frost", "fog", "spatter"],
    "digital": ["brightness", "contrast", "saturate", "elastic_transform", "pixelate", "jpeg_compression"],
}


def trained_on(cfg: dict) -> list[str]:
    """The CIFAR-C corruptions whose family a training config's augmentation covers (sorted):
    noise_blur -> noise, blur; cpu_aug strong -> noise, blur, digital; cpu_aug corrupt -> all
    but frost and fog (augment.corrupt_pipeline). AugMix's operations are disjoint from them by
    design (no noise, blur, colour or contrast), so it sees none."""
    fams = set()
    if cfg.get("noise_blur"):
        fams |= {"noise", "blur"}
    kinds = {cfg.get("cpu_aug")} | ({"strong"} if cfg.get("strong_aug_epoch") is not None else set())
    if "strong" in kinds:
        fams |= {"noise", "blur", "digital"}  # colour jitter, blur, noise, JPEG
    seen = {c for f in fams for c in FAMILIES[f]}
    if "corrupt" in kinds:
        seen |= {c for f in FAMILIES.values() for c in f} - {"frost", "fog"}
    return sorted(seen)


# Corruptions with no random draw: the seed does not change their output.
DETERMINISTIC = frozenset({"defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast",
                           "saturate", "pixelate", "jpeg_compression"})
# Bump when any parameter or algorithm below changes, so make_suite regenerates old suites.
# 2: make_cifar_c.py's parameters and algorithms throughout, no albumentations.
SUITE_VERSION = 2

# Images per call of a corruption function: bounds the float64 temporaries (~25 MB per array).
_CHUNK = 1000


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 as make_cifar_c does it: np.uint8(clip(x) * 255), which
    truncates (on average half a grey level darker than rounding; kept, it is the published data)."""
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _unit(images: np.ndarray) -> np.ndarray:
    return images / 255.  # float64, as np.array(pil_image) / 255. in the original


# ---------------------------------------------------------------------------- stand-ins for tools
def _sk_gaussian(x: np.ndarray, sigma: float, channels: bool = True, mode: str = "nearest",
                 truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian on a batch (N, H, W[, C]): scipy's gaussian_filter, which skimage
    wraps, with skimage's defaults (mode 'nearest', truncate 4) and no blur across images or
    channels (sigma 0 on those axes: scipy skips them)."""
    from scipy.ndimage import gaussian_filter

    sigmas = (0, sigma, sigma, 0) if channels else (0, sigma, sigma)
    return gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _sk_rgb2hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv on float RGB in [0, 1], (..., 3): the same formulas and tie-breaks
    (blue over green over red when two channels share the maximum)."""
    v = rgb.max(-1)
    delta = rgb.max(-1) - rgb.min(-1)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(delta == 0, 0.0, delta / v)
        h = np.where(r == v, (g - b) / delta, 0.0)
        h = np.where(g == v, 2. + (b - r) / delta, h)
        h = np.where(b == v, 4. + (r - g) / delta, h)
        h = np.where(delta == 0, 0.0, (h / 6.) % 1.)
    return np.nan_to_num(np.stack([h, s, v], axis=-1), nan=0.0)


# Which of (v, t, p, q) becomes (R, G, B) for each sextant of the hue circle (skimage's hsv2rgb).
_HSV_SEXTANTS = np.array([(0, 1, 2), (3, 0, 2), (2, 0, 1), (2, 3, 0), (1, 2, 0), (0, 2, 3)])


def _sk_hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb, (..., 3) float HSV -> RGB."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sextant = hi.astype(np.uint8) % 6
    return np.take_along_axis(np.stack([v, t, p, q], axis=-1), _HSV_SEXTANTS[sextant], axis=-1)


def _lerp_matrix(n_in: int, n_out: int, start: int, count: int):
    """Rows [start, start + count) of scipy.ndimage.zoom's order-1 map from n_in samples to
    n_out (corner-aligned: output j samples input j * (n_in - 1) / (n_out - 1)), as a sparse
    (count, n_in) matrix with two weights per row."""
    from scipy.sparse import csr_matrix

    j = np.arange(start, start + count)
    c = j * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(count)
    i0 = np.minimum(np.floor(c).astype(np.intp), n_in - 1)
    t = c - i0
    rows = np.repeat(np.arange(count), 2)
    cols = np.stack([i0, np.minimum(i0 + 1, n_in - 1)], axis=1).ravel()
    return csr_matrix((np.stack([1 - t, t], axis=1).ravel(), (rows, cols)), shape=(count, n_in))


@functools.lru_cache(maxsize=64)
def _clipped_zoom_matrix(h: int, w: int, factor: float):
    """make_cifar_c's clipped_zoom as one sparse (h*w, h*w) linear map on flattened images: crop
    the centre ceil(h / factor) (and w), zoom it with scipy.ndimage.zoom(order=1), trim the
    centre h x w. A matrix instead of scipy's zoom: one sparse product zooms the whole batch."""
    from scipy.sparse import csr_matrix, kron

    def axis(n):
        crop = int(np.ceil(n / factor))
        top = (n - crop) // 2
        out = int(round(crop * factor))  # scipy's output size (Python's round)
        m = _lerp_matrix(crop, out, (out - n) // 2, n)  # (n, crop)
        return csr_matrix((m.data, m.indices + top, m.indptr), shape=(n, n))  # crop -> full image

    return kron(axis(h), axis(w), format="csr")


def _apply_pixel_map(matrix, x: np.ndarray) -> np.ndarray:
    """Apply a (H*W, H*W) linear map to a batch (N, H, W[, C]) of float images."""
    n, h, w = x.shape[:3]
    flat = np.moveaxis(x.reshape(n, h * w, -1), 1, 0).reshape(h * w, -1)  # pixels x (images, channels)
    out = np.asarray(matrix @ flat)
    return np.moveaxis(out.reshape(h * w, n, -1), 0, 1).reshape(x.shape)


def _magick_motion_blur(layers: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage (what make_cifar_c calls through Wand), reimplemented: Wand
    needs the ImageMagick C library, which pip cannot install.

    A one-sided streak: 2 * ceil(radius) + 1 taps, tap i weighted exp(-i^2 / (2 sigma^2)) and
    normalised, read at (x + round(i cos a), y + round(i sin a)) (ImageMagick's ceil(v - 0.5)
    rounding), outside pixels clamped to the edge (its default virtual-pixel method). Sums in
    double over 16-bit quanta (v * 257) like a Q16 build, then rounds to 16 bits and back to
    8 bits as its PNG writer does. `layers`: uint8 (N, H, W[, C]); `angles`: degrees, one per
    image.
    """
    n, h, w = layers.shape[:3]
    width = int(2 * np.ceil(radius) + 1)
    taps = np.arange(width)
    kernel = np.exp(-(taps * taps) / (2.0 * sigma * sigma)) / (np.sqrt(2 * np.pi) * sigma)
    kernel /= kernel.sum()
    a = np.pi * np.asarray(angles, np.float64)[:, None] / 180.0
    px, py = width * np.sin(a), width * np.cos(a)
    length = np.hypot(px, py)
    dx = np.ceil(taps * py / length - 0.5).astype(np.intp)  # (N, width)
    dy = np.ceil(taps * px / length - 0.5).astype(np.intp)

    # Sort images by angle so that images sharing a tap's offset are contiguous: each tap is
    # then a few slice-adds on an edge-padded copy instead of a gather per pixel.
    order = np.argsort(angles, kind="stable")
    dx, dy = dx[order], dy[order]
    r = width - 1
    pad = [(0, 0), (r, r), (r, r)] + [(0, 0)] * (layers.ndim - 3)
    padded = np.pad(layers[order].astype(np.float64) * 257, pad, mode="edge")
    acc = np.zeros(layers.shape, np.float64)
    for i in range(width):
        change = np.flatnonzero((np.diff(dx[:, i]) != 0) | (np.diff(dy[:, i]) != 0)) + 1
        bounds = np.concatenate([[0], change, [n]])
        for s, e in zip(bounds[:-1], bounds[1:]):
            oy, ox = r + dy[s, i], r + dx[s, i]
            acc[s:e] += kernel[i] * padded[s:e, oy:oy + h, ox:ox + w]
    quantum = np.where(acc <= 0, 0, np.where(acc >= 65535, 65535, np.floor(acc + 0.5))).astype(np.int64)
    out = np.empty_like(layers)
    out[order] = (((quantum + 128) - ((quantum + 128) >> 8)) >> 8).astype(np.uint8)  # ScaleQuantumToChar
    return out


def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """make_cifar_c's plasma_fractal (diamond-square on a torus, noise wibble * U(-wibble,
    wibble) with wibble = 100 divided by `wibbledecay` per octave), n maps at once: (n, mapsize,
    mapsize) in [0, 1]. `mapsize` a power of two."""
    m = np.empty((n, mapsize, mapsize))
    m[:, 0, 0] = 0
    step, wibble = mapsize, 100.0

    def wibbled_mean(total):
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=1)
        square += np.roll(square, -1, axis=2)
        m[:, half::step, half::step] = wibbled_mean(square)
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean((centres + np.roll(centres, 1, axis=1))
                                                 + (corners + np.roll(corners, -1, axis=2)))
        m[:, half::step, 0::step] = wibbled_mean((centres + np.roll(centres, 1, axis=2))
                                                 + (corners + np.roll(corners, -1, axis=1)))
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _power_of_two(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


# ---------------------------------------------------------------------------- noise
# Gaussian noise std in [0, 1] units (make_cifar_c.py).
GAUSSIAN_NOISE = (0.04, 0.06, .08, .09, .10)
# Shot noise: photons per unit intensity, poisson(x * c) / c (make_cifar_c.py).
SHOT_NOISE = (500, 250, 100, 75, 50)
# Impulse noise: skimage s&p amount, the fraction of channel values hit (make_cifar_c.py).
IMPULSE_NOISE = (.01, .02, .03, .05, .07)
# Speckle noise: x + x * N(0, c) (make_cifar_c.py).
SPECKLE_NOISE = (.06, .1, .12, .16, .2)


def gaussian_noise(images, s, rng):
    x = _unit(images)
    return _to_uint8(x + rng.normal(size=x.shape, scale=GAUSSIAN_NOISE[s]))


def shot_noise(images, s, rng):
    c = SHOT_NOISE[s]
    return _to_uint8(rng.poisson(_unit(images) * c) / c)


def impulse_noise(images, s, rng):
    # skimage.util.random_noise(mode="s&p", amount=c) stand-in: every channel value is hit with
    # probability c, and a hit value becomes 1 (salt) or 0 (pepper) with probability 0.5 each.
    x = _unit(images)
    hit = rng.random(x.shape) < IMPULSE_NOISE[s]
    salt = rng.random(x.shape) < 0.5
    x[hit & salt] = 1
    x[hit & ~salt] = 0
    return _to_uint8(x)


def speckle_noise(images, s, rng):
    x = _unit(images)
    return _to_uint8(x + x * rng.normal(size=x.shape, scale=SPECKLE_NOISE[s]))


# ---------------------------------------------------------------------------- blur
# Defocus: (disk radius px, anti-alias Gaussian sigma) (make_cifar_c.py).
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
# Glass blur: (Gaussian sigma, max pixel shift, iterations) (make_cifar_c.py).
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# Motion blur: ImageMagick (radius, sigma), angle U(-45, 45) degrees (make_cifar_c.py).
MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))
# Zoom blur: the zooms are np.arange(1, stop, 0.01) for these stops (make_cifar_c.py); float
# rounding in arange gives 7, 12, 16, 21, 26 zooms, kept as the original has them.
ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)
# Gaussian blur sigma px (make_cifar_c.py).
GAUSSIAN_BLUR = (.4, .6, 0.7, .8, 1)


@functools.lru_cache(maxsize=8)
def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's disk(): a 17x17 (for radius <= 8) aliased disk, normalised, smoothed by a
    3x3 Gaussian."""
    import cv2

    half, ksize = (8, (3, 3)) if radius <= 8 else (int(radius), (5, 5))
    xx, yy = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1))
    disk = np.array(xx ** 2 + yy ** 2 <= radius ** 2, dtype=np.float32)
    disk /= disk.sum()
    return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)


def defocus_blur(images, s, rng):
    import cv2

    kernel = _disk(*DEFOCUS_BLUR[s])
    # cv2.filter2D per image, as the original (its border is reflect-101); one call filters the
    # three channels exactly as three calls would.
    return _to_uint8(np.stack([cv2.filter2D(im, -1, kernel) for im in _unit(images)]))


def glass_blur(images, s, rng):
    sigma, delta, iterations = GLASS_BLUR[s]
    n, h, w, _ = images.shape
    x = (_sk_gaussian(_unit(images), sigma) * 255).astype(np.uint8)
    # The original's "swap" loop: for each iteration, pixels (h, w) from (H - delta, W - delta)
    # down to (delta + 1, delta + 1) in reverse raster order, each with dx, dy = randint(-delta,
    # delta), run `x[h, w], x[h+dy, w+dx] = x[h+dy, w+dx], x[h, w]`. On an RGB array both sides
    # are views, so this copies x[h+dy, w+dx] into x[h, w] and leaves the partner as it was: no
    # swap, and kept so (it is what made the published images). With delta = 1 (every row of the
    # table) dx, dy are -1 or 0, so the partner is up or left: a pixel the loop has not yet
    # written. The sequential loop is therefore exactly one gather per iteration, done here for
    # all pixels of all images at once.
    if delta != 1:
        raise NotImplementedError("glass_blur's one-gather loop is exact for max_delta 1 only (see above)")
    flat = x.reshape(n, h * w, 3)
    rows = np.arange(n)[:, None]
    targets = np.array([r * w + c for r in range(h - delta, delta, -1) for c in range(w - delta, delta, -1)],
                       dtype=np.intp)
    for _ in range(iterations):
        d = rng.integers(-delta, delta, size=(n, len(targets), 2))  # (dx, dy) per image and step
        flat[rows, targets] = flat[rows, targets + d[..., 1] * w + d[..., 0]]
    return _to_uint8(_sk_gaussian(flat.reshape(n, h, w, 3) / 255., sigma))


def motion_blur(images, s, rng):
    radius, sigma = MOTION_BLUR[s]
    return _magick_motion_blur(images, radius, sigma, rng.uniform(-45, 45, size=len(images)))


def zoom_blur(images, s, rng):
    n, h, w, _ = images.shape
    factors = np.arange(1, ZOOM_BLUR[s], 0.01)
    x = _unit(images).astype(np.float32)
    # Each zoom computed in float64 (as scipy does), rounded to float32 and summed in float32, as
    # the original: the same rounding, so the same pixels.
    flat = np.moveaxis(x.reshape(n, h * w, 3), 1, 0).reshape(h * w, n * 3)
    wide = flat.astype(np.float64)
    out = np.zeros_like(flat)
    for f in factors:
        out += (_clipped_zoom_matrix(h, w, float(f)) @ wide).astype(np.float32)
    x = (flat + out) / (len(factors) + 1)
    return _to_uint8(np.moveaxis(x.reshape(h * w, n, 3), 0, 1).reshape(images.shape))


def gaussian_blur(images, s, rng):
    return _to_uint8(_sk_gaussian(_unit(images), GAUSSIAN_BLUR[s]))


# ---------------------------------------------------------------------------- weather
# Snow: (flake mean, flake std, zoom, threshold, motion-blur radius, sigma, image weight)
# (make_cifar_c.py).
SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
# Frost: (image weight, photo weight), photos resized by FROST_RESIZE and cropped at random
# (make_cifar_c.py).
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
FROST_RESIZE = 0.2
# The six photographs, in the original's order. Its np.random.randint(5) never picks the sixth:
# kept, so only frost1..frost5 appear (make_cifar_c.py).
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_PICKED = 5
# Fog: (strength, plasma wibble decay) (make_cifar_c.py).
FOG = ((.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))
# Spatter: (mean, std, blur sigma, threshold, intensity, 0 = water / 1 = mud) (make_cifar_c.py).
SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, 0),
           (0.65, 0.1, 0.8, 0.7, 0.5, 0),
           (0.65, 0.3, 1, 0.69, 0.5, 0),
           (0.65, 0.1, 0.7, 0.69, 0.6, 1),
           (0.65, 0.1, 0.5, 0.68, 0.6, 1))


def snow(images, s, rng):
    import cv2

    mean, std, zoom, threshold, radius, sigma, keep = SNOW[s]
    n, h, w, _ = images.shape
    x = (images / 255.).astype(np.float32)
    flakes = rng.normal(size=(n, h, w), loc=mean, scale=std)
    flakes = _apply_pixel_map(_clipped_zoom_matrix(h, w, float(zoom)), flakes)
    flakes[flakes < threshold] = 0
    # The original writes the layer as an 8-bit PNG for ImageMagick and reads it back / 255.
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)
    flakes = _magick_motion_blur(flakes, radius, sigma, rng.uniform(-135, -45, size=n)) / 255.
    flakes = flakes[..., None]
    grey = cv2.cvtColor(x.reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w, 1)  # per pixel: one call
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    return _to_uint8(x + flakes + np.rot90(flakes, k=2, axes=(1, 2)))


_FROST_WARNED = False


def _frost_dir() -> Path | None:
    """The folder of the frost photographs: $COMPETITION_FROST_DIR, else an installed
    imagecorruptions (or imagecorruptions-imaug: same folder) or corrupt_tta. Found with
    find_spec, which locates a package without importing it: their code needs scikit-image and
    opencv-python, which we do not install; only their image files are read."""
    candidates = [Path(os.environ["COMPETITION_FROST_DIR"])] if os.environ.get("COMPETITION_FROST_DIR") else []
    for package, sub in (("imagecorruptions", "frost"), ("corrupt_tta", "assets/frost")):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / sub)
    return next((d for d in candidates if all((d / f).is_file() for f in FROST_FILES)), None)


@functools.lru_cache(maxsize=1)
def _frost_photos() -> tuple[np.ndarray, ...] | None:
    """The photographs as make_cifar_c prepares them: cv2.imread (BGR, alpha dropped), resized by
    FROST_RESIZE (bilinear), to RGB. None when they are not installed."""
    import cv2

    folder = _frost_dir()
    if folder is None:
        return None
    photos = []
    for name in FROST_FILES:
        photo = cv2.imread(str(folder / name))
        if photo is None:
            raise CompetitionError(f"{folder / name}: not a readable image; reinstall imagecorruptions")
        photos.append(np.ascontiguousarray(cv2.resize(photo, (0, 0), fx=FROST_RESIZE, fy=FROST_RESIZE)[..., ::-1]))
    return tuple(photos)


def frost_source() -> str:
    """What frost blends in here: 'photos' (the paper's) or 'stand-in' (synthetic ice)."""
    return "photos" if _frost_photos() is not None else "stand-in"


def frost(images, s, rng):
    import cv2

    keep, weight = FROST[s]
    n, h, w, _ = images.shape
    photos = _frost_photos()
    if photos is None:
        ice = _synthetic_ice(n, h, w, rng)
    else:
        picked = rng.integers(FROST_PICKED, size=n)
        ice = np.empty((n, h, w, 3), np.uint8)
        for i, k in enumerate(picked):
            photo = photos[k]
            if photo.shape[0] <= h or photo.shape[1] <= w:  # images larger than CIFAR's: scale the photo up
                scale = 1.05 * max(h / photo.shape[0], w / photo.shape[1])
                photo = cv2.resize(photo, (0, 0), fx=scale, fy=scale)
            top = rng.integers(0, photo.shape[0] - h)  # randint(0, size - 32): as the original
            left = rng.integers(0, photo.shape[1] - w)
            ice[i] = photo[top:top + h, left:left + w]
    return np.clip(keep * images + weight * ice.astype(np.float64), 0, 255).astype(np.uint8)


def _synthetic_ice(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Stand-in for the frost photographs when they are not installed (warned once): broad
    bright patches plus a net of thin crystals (ridges of two rough plasma fractals), faintly
    blue, uint8 (n, h, w, 3). Not CIFAR-C: install the photos for a faithful suite."""
    global _FROST_WARNED
    if not _FROST_WARNED:
        _FROST_WARNED = True
        warnings.warn("frost: the CIFAR-C frost photographs are not installed, using a synthetic stand-in; "
                      "for the real ones: pip install --no-deps imagecorruptions==1.1.2", stacklevel=3)
    size = _power_of_two(max(h, w))
    patches = _plasma_fractal(n, size, 1.8, rng)
    crystals = np.maximum(*[(1 - np.abs(2 * _plasma_fractal(n, size, 1.3, rng) - 1)) ** 8 for _ in range(2)])
    ice = np.clip(0.5 * patches + 0.7 * crystals, 0, 1)[:, :h, :w, None] * np.array([0.85, 0.93, 1.0])
    return (ice * 255).astype(np.uint8)


def fog(images, s, rng):
    strength, decay = FOG[s]
    n, h, w, _ = images.shape
    x = _unit(images)
    top = x.max(axis=(1, 2, 3), keepdims=True)
    # make_cifar_c's map is 32x32; other sizes get the next power of two, cropped.
    x += strength * _plasma_fractal(n, _power_of_two(max(h, w, 2)), decay, rng)[:, :h, :w, None]
    return _to_uint8(x * top / (top + strength))


def spatter(images, s, rng):
    import cv2

    mean, std, sigma, threshold, intensity, mud = SPATTER[s]
    n, h, w, _ = images.shape
    x = (images / 255.).astype(np.float32)
    liquid = _sk_gaussian(rng.normal(size=(n, h, w), loc=mean, scale=std), sigma, channels=False)
    liquid[liquid < threshold] = 0
    if not mud:
        # Water: edges of the liquid mask, turned into a soft relief by OpenCV, per image.
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
        # (liquid * 255).astype(uint8) in the original: the few values above 1 (about one image in
        # ten at severity 3) wrap around to near 0 on x86, leaving holes; kept, written out.
        layer8 = (np.floor(liquid * 255) % 256).astype(np.uint8)
        m = np.empty((n, h, w), np.float32)
        for i in range(n):
            dist = cv2.distanceTransform(255 - cv2.Canny(layer8[i], 50, 150), cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
            dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, ker), (3, 3)).astype(np.float32)
            m[i] = layer8[i] * dist
        peak = m.max(axis=(1, 2), keepdims=True)
        # / peak as the original (an image without liquid would divide by 0: it gets none).
        m = np.divide(m, peak, out=np.zeros_like(m), where=peak > 0) * intensity
        colour = np.array([175 / 255., 238 / 255., 238 / 255.], np.float32)  # pale turquoise
        return _to_uint8(x + m[..., None] * colour)
    # Mud: the thresholded mask, blurred (sigma = the intensity column, as the original), cut at 0.8.
    m = _sk_gaussian(np.where(liquid > threshold, 1, 0).astype(np.float32), intensity, channels=False)
    m[m < 0.8] = 0
    colour = np.array([63 / 255., 42 / 255., 20 / 255.], np.float32) * m[..., None]  # mud brown, float32 as there
    return _to_uint8(x * (1 - m[..., None]) + colour)


# ---------------------------------------------------------------------------- digital
# Brightness: added to HSV value (make_cifar_c.py).
BRIGHTNESS = (.05, .1, .15, .2, .3)
# Contrast: factor on each channel's distance from its mean (make_cifar_c.py).
CONTRAST = (.75, .5, .4, .3, 0.15)
# Saturate: HSV saturation * a + b (make_cifar_c.py).
SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))
# Elastic: (displacement alpha, its smoothing sigma, affine jitter) in px = IMSIZE (32) times
# these fractions (make_cifar_c.py); severity 1 is the affine jitter alone.
ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
ELASTIC_IMSIZE = 32
# Pixelate: box-downscale to int(32 * c) px, box-upscale back (make_cifar_c.py).
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
# JPEG quality (make_cifar_c.py).
JPEG_QUALITY = (80, 65, 58, 50, 40)


def brightness(images, s, rng):
    hsv = _sk_rgb2hsv(_unit(images))
    hsv[..., 2] = np.clip(hsv[..., 2] + BRIGHTNESS[s], 0, 1)
    return _to_uint8(_sk_hsv2rgb(hsv))


def contrast(images, s, rng):
    x = _unit(images)
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - means) * CONTRAST[s] + means)


def saturate(images, s, rng):
    a, b = SATURATE[s]
    hsv = _sk_rgb2hsv(_unit(images))
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    return _to_uint8(_sk_hsv2rgb(hsv))


def elastic_transform(images, s, rng):
    import cv2

    alpha, sigma, jitter = (ELASTIC_IMSIZE * f for f in ELASTIC[s])
    n, h, w, _ = images.shape
    x = (images / 255.).astype(np.float32)
    # Random affine: three points around the centre moved by U(-jitter, jitter) each (the
    # original writes the centre as shape // 2 in (h, w) order; (w, h) here, the same when square).
    centre, size = np.float32([w, h]) // 2, min(h, w) // 3
    src = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    dst = src + rng.uniform(-jitter, jitter, size=(n, 3, 2)).astype(np.float32)
    warped = np.stack([cv2.warpAffine(im, cv2.getAffineTransform(src, d), (w, h), borderMode=cv2.BORDER_REFLECT_101)
                       for im, d in zip(x, dst)])
    # Then a smooth random displacement field, sampled bilinearly with reflection at the edges:
    # scipy's map_coordinates(order=1, mode="reflect") written out for the whole batch
    # (half-sample symmetric extension, then linear interpolation: checked equal to scipy).
    field = _sk_gaussian(rng.uniform(-1, 1, size=(2 * n, h, w)), sigma, channels=False, mode="reflect",
                         truncate=3)
    dx, dy = (field * alpha).astype(np.float32).reshape(n, 2, h, w).transpose(1, 0, 2, 3)
    yy = np.arange(h)[None, :, None] + dy.astype(np.float64)
    xx = np.arange(w)[None, None, :] + dx.astype(np.float64)
    return _to_uint8(_bilinear_reflect(warped, yy, xx))


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _bilinear_reflect(x: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Sample (N, H, W, C) images at float coordinates yy, xx (N, H, W), bilinear, mode 'reflect'."""
    n, h, w, _ = x.shape
    y0, x0 = np.floor(yy), np.floor(xx)
    ty, tx = (yy - y0)[..., None], (xx - x0)[..., None]
    y0, x0 = y0.astype(np.intp), x0.astype(np.intp)
    ya, yb, xa, xb = _reflect(y0, h), _reflect(y0 + 1, h), _reflect(x0, w), _reflect(x0 + 1, w)
    b = np.arange(n)[:, None, None]
    top = x[b, ya, xa] * (1 - tx) + x[b, ya, xb] * tx
    bottom = x[b, yb, xa] * (1 - tx) + x[b, yb, xb] * tx
    return (top * (1 - ty) + bottom * ty).astype(x.dtype)


def pixelate(images, s, rng):
    from PIL import Image

    n, h, w, _ = images.shape
    c = PIXELATE[s]
    small = (int(w * c), int(h * c))
    return np.stack([np.asarray(Image.fromarray(im).resize(small, Image.BOX).resize((w, h), Image.BOX))
                     for im in images])


def jpeg_compression(images, s, rng):
    from PIL import Image

    out = np.empty_like(images)
    for i, im in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, "JPEG", quality=JPEG_QUALITY[s])
        out[i] = np.asarray(Image.open(buffer))
    return out


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    name: globals()[name] for name in CORRUPTIONS}


# ---------------------------------------------------------------------------- API
def derived_seed(seed: int, name: str, severity: int) -> int:
    """The seed one (corruption, severity) uses: independent streams per variant, stable when
    the list of corruptions is reordered or subset (keyed by name, not position)."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity)]).generate_state(1)[0])


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CompetitionError(f"seed must be an integer >= 0, got {seed!r}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, 3) with corruption `name` at `severity` 1..5.

    Returns a new uint8 array of the same shape; the same (images, name, severity, seed)
    always gives the same output, and every image gets its own random draws.
    """
    check_images(images, "corrupt(images)")
    if name not in _FUNCTIONS:
        raise CompetitionError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= SEVERITIES:
        raise CompetitionError(f"severity must be an integer 1..{SEVERITIES}, got {severity!r}")
    _check_seed(seed)
    out = np.empty_like(images)
    rng = np.random.default_rng(derived_seed(seed, name, severity))
    function = _FUNCTIONS[name]
    for start in range(0, len(images), _CHUNK):  # one stream across the chunks
        chunk = np.ascontiguousarray(images[start:start + _CHUNK])
        out[start:start + _CHUNK] = function(chunk, int(severity) - 1, rng)
    return out


def corrupted_copies(images: np.ndarray, seed: int, names=CORRUPTIONS, cache_dir=None,
                     cells: np.ndarray | None = None) -> np.ndarray:
    """uint8 (len(names) * 5 * n, H, W, 3): every corruption at every severity, in the OOD files'
    order (corruption, then severity, then image): the suite's own generator, for a run's
    corrupted out-of-fold check (train's ood_check). `cells` (len(names) * 5, n): the rows of
    `images` each (corruption, severity) corrupts; None: all of `images` in every one. Cached in
    `cache_dir` when given, keyed by the images, cells, seed, names, SUITE_VERSION and the frost
    source."""
    check_images(images, "corrupted_copies(images)")
    names = list(names)
    if cells is None:
        cells = np.broadcast_to(np.arange(len(images)), (len(names) * SEVERITIES, len(images)))
    cells = np.asarray(cells)
    if cells.ndim != 2 or len(cells) != len(names) * SEVERITIES:
        raise CompetitionError(f"corrupted_copies: cells of shape {cells.shape}, expected "
                               f"({len(names) * SEVERITIES}, n): one row of images per corruption and severity")
    cell_key = hashlib.sha1(np.ascontiguousarray(cells, dtype=np.int64).tobytes()).hexdigest()
    key = hashlib.sha1(f"{fingerprint(images)}|{cell_key}|{seed}|{names}|{SUITE_VERSION}|{frost_source()}".encode())
    path = Path(cache_dir) / f"ood-copies-{key.hexdigest()[:16]}.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache file is made again
    out = np.concatenate([corrupt(images[cells[k * SEVERITIES + s - 1]], name, s, seed)
                          for k, name in enumerate(names) for s in range(1, SEVERITIES + 1)])
    if path is not None:
        save_npy(path, out)
    return out


def make_suite(images: np.ndarray, out_dir, seed: int = 0, names=CORRUPTIONS,
               labels: np.ndarray | None = None, workers: int | None = None) -> list[Path]:
    """Write `distortionNN.npy` (NN = position in `names`) in the competition's OOD format,
    plus `corruptions.json` (and `labels.npy` when labels are given). Returns the file paths.

    Skips all work when the directory already holds this suite (same names, seed, N, source
    fingerprint, SUITE_VERSION and, with frost, the same frost source). The json says
    "complete": false while files are being written, so an interrupted run is redone rather
    than mistaken for a finished one. `workers`: processes, one corruption file each (None:
    one per CPU for >= 500 images, where it pays for the ~1 s start of each; 1: in this process).
    """
    check_images(images, "make_suite(images)")
    _check_seed(seed)
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
    if "frost" in names:  # photos or stand-in: a suite made with one is not the other's
        manifest["frost"] = frost_source()
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
    """Draw a PNG grid: one row per corruption, columns clean + severities 1..5, for each image.
    `path` ending in .png is one grid of every corruption; else a folder gets one PNG per
    corruption (<name>.png) and the grid of all (all.png)."""
    from competition import plots

    path, names = Path(path), list(names)
    if path.suffix.lower() != ".png":
        for name in names:
            preview(images, path / f"{name}.png", seed, [name])
        return preview(images, path / "all.png", seed, names)
    plt = plots.pyplot()
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
    return plots.save(fig, path, tight=False)
