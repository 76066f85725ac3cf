"""A measuring suite of corruptions outside the 19 CIFAR-C ones and outside every training recipe
of this project, in the competition's file format, so that a gain measured on the 19 can be
checked for overfitting to them.

    python bench/outside_families.py --data PATH/cifar10-jpg-train.tar.gz --folds-dir FOLDS \\
        --n 5000 --out models/bench-outside/suite-f0-n5000 [--preview outside.png]
    python -m competition.predict RUN --ood-dir models/bench-outside/suite-f0-n5000 --adapt bn --no-test
    python -m competition.score SUBMISSION.json --ood-dir models/bench-outside/suite-f0-n5000

The families were chosen so that nothing in training or in the 19 is the same operation:
not noise, blur, JPEG, pixelation, elastic warps, snow/frost/fog/spatter, global brightness,
contrast or saturation (the 19, and noise_blur / cpu_aug strong and corrupt), nor AugMix's
autocontrast, equalize, posterize, solarize, rotate, shear or translate, nor colour jitter,
erasing/dropout, mixup, flips and crops (the other recipes). Their five severities were fixed
before any model was scored on them and are not tuned on results.

Written here by hand (numpy / OpenCV, one random draw per image from a seeded stream per
family and severity): albumentations' versions of the few it has (RandomRain, RandomShadow,
RandomSunFlare, ChromaticAberration) are drawn for photographs of hundreds of pixels and leave
a 32x32 image nearly untouched (RandomRain's drop count is the image area over 600-770).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from competition import score  # noqa: E402
from competition.corruptions import derived_seed  # noqa: E402
from competition.data import SEVERITIES, check_images, ood_name  # noqa: E402
from competition.files import CompetitionError, save_json, save_npy  # noqa: E402

# Bump when a parameter or an algorithm below changes.
VERSION = 1


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates centred on the image, scaled to [-1, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (yy - (h - 1) / 2) / ((h - 1) / 2), (xx - (w - 1) / 2) / ((w - 1) / 2)


def rain_streaks(x, s, rng):
    """Thin slanted light streaks, denser and longer with severity (not snow's flakes or spatter's drops)."""
    count, length, alpha = [4, 8, 12, 18, 26][s], [4, 5, 6, 7, 8][s], [0.45, 0.5, 0.55, 0.6, 0.65][s]
    n, h, w, _ = x.shape
    mask = np.zeros((n, h, w), np.float32)
    for i in range(n):
        angle = rng.uniform(-0.35, 0.35)  # one wind direction per image
        starts = rng.uniform(0, [w, h], size=(count, 2))
        ends = starts + length * np.array([np.sin(angle), np.cos(angle)])
        for a, b in zip(starts.round().astype(int), ends.round().astype(int)):
            cv2.line(mask[i], tuple(map(int, a)), tuple(map(int, b)), 1.0, 1, cv2.LINE_AA)
    mask = alpha * np.clip(mask, 0, 1)[..., None]
    return x * (1 - mask) + 0.85 * mask


def lens_distortion(x, s, rng):
    """Radial barrel or pincushion distortion (sign drawn per image), a lens's, not an elastic warp."""
    k = [0.08, 0.16, 0.25, 0.35, 0.45][s]
    n, h, w, _ = x.shape
    yy, xx = _grid(h, w)
    r2 = yy ** 2 + xx ** 2
    out = np.empty_like(x)
    for i in range(n):
        scale = 1 + rng.choice([-1, 1]) * k * r2
        map_x = ((xx * scale) * ((w - 1) / 2) + (w - 1) / 2).astype(np.float32)
        map_y = ((yy * scale) * ((h - 1) / 2) + (h - 1) / 2).astype(np.float32)
        out[i] = cv2.remap(x[i], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out


def vignette(x, s, rng):
    """Darkened corners around an off-centre optical axis (spatially varying, not global brightness)."""
    strength = [0.35, 0.5, 0.65, 0.8, 0.9][s]
    n, h, w, _ = x.shape
    yy, xx = _grid(h, w)
    centre = rng.uniform(-0.25, 0.25, size=(n, 2)).astype(np.float32)
    r2 = (yy[None] - centre[:, :1, None]) ** 2 + (xx[None] - centre[:, 1:, None]) ** 2
    return x * np.clip(1 - strength * r2 / 2, 0, 1)[..., None]


def chromatic_aberration(x, s, rng):
    """Red and blue planes magnified in opposite directions about the centre and shifted apart."""
    zoom, shift = [0.03, 0.06, 0.09, 0.12, 0.16][s], [0.5, 1.0, 1.5, 2.0, 2.5][s]
    n, h, w, _ = x.shape
    out = x.copy()
    centre = ((w - 1) / 2, (h - 1) / 2)
    for i in range(n):
        theta = rng.uniform(0, 2 * np.pi)
        d = shift * np.array([np.cos(theta), np.sin(theta)])
        for channel, sign in ((0, 1), (2, -1)):
            m = cv2.getRotationMatrix2D(centre, 0.0, 1 + sign * zoom)
            m[:, 2] += sign * d
            out[i, :, :, channel] = cv2.warpAffine(x[i, :, :, channel], m, (w, h), flags=cv2.INTER_LINEAR,
                                                   borderMode=cv2.BORDER_REFLECT_101)
    return out


def sharpen(x, s, rng):
    """Unsharp masking pushed into overshoot halos (the opposite of the 19's blurs)."""
    amount = [1.0, 2.0, 3.0, 4.5, 6.0][s]
    blurred = np.stack([cv2.GaussianBlur(im, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT_101) for im in x])
    return x + amount * (x - blurred)


def shadow(x, s, rng):
    """A soft-edged cast shadow: one side of a random line darkened."""
    factor = [0.7, 0.6, 0.5, 0.4, 0.3][s]
    n, h, w, _ = x.shape
    yy, xx = _grid(h, w)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    offset = rng.uniform(-0.4, 0.4, n).astype(np.float32)
    side = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy - offset[:, None, None]
    edge = 1 / (1 + np.exp(-side * (w / 2)))  # ~1 px soft edge
    return x * (1 - (1 - factor) * edge)[..., None]


def glare(x, s, rng):
    """A warm light source flaring into the frame at a random point."""
    gain, sigma = [0.3, 0.45, 0.6, 0.75, 0.9][s], [0.35, 0.4, 0.45, 0.5, 0.55][s]
    n, h, w, _ = x.shape
    yy, xx = _grid(h, w)
    centre = rng.uniform(-0.9, 0.9, size=(n, 2)).astype(np.float32)
    d2 = (yy[None] - centre[:, :1, None]) ** 2 + (xx[None] - centre[:, 1:, None]) ** 2
    blob = gain * np.exp(-d2 / (2 * sigma ** 2))[..., None]
    return x + blob * np.array([1.0, 0.92, 0.75], np.float32)


def scanlines(x, s, rng):
    """Interlacing: every other row shifted sideways and dimmed, as from a badly deinterlaced frame."""
    shift, dim = [0.75, 1.0, 1.5, 2.0, 3.0][s], [0.9, 0.85, 0.8, 0.75, 0.7][s]
    n, h, w, _ = x.shape
    out = x.copy()
    for i in range(n):
        start = int(rng.integers(0, 2))
        m = np.float32([[1, 0, rng.choice([-1, 1]) * shift], [0, 1, 0]])
        moved = cv2.warpAffine(x[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out[i, start::2] = dim * moved[start::2]
    return out


FAMILIES = {f.__name__: f for f in (rain_streaks, lens_distortion, vignette, chromatic_aberration, sharpen,
                                    shadow, glare, scanlines)}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same images under family `name` at `severity` 1..5."""
    check_images(images, "outside_families.corrupt(images)")
    if name not in FAMILIES:
        raise CompetitionError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    rng = np.random.default_rng(derived_seed(seed, f"outside:{name}", severity))
    out = FAMILIES[name](images.astype(np.float32) / 255, severity - 1, rng)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def make_suite(images: np.ndarray, labels: np.ndarray | None, out_dir, seed: int = 0, names=None,
               source: dict | None = None, corrupt_fn=None, version: str = f"outside-{VERSION}") -> list[Path]:
    """Write distortionNN.npy (NN = position in `names`), corruptions.json, labels.npy and
    suite.json in the local suite's format, so predict and score read it like any suite.
    `corrupt_fn(images, name, severity, seed)`: these families by default (bench/other_generator.py
    passes albumentations' versions of the 19)."""
    corrupt_fn = corrupt_fn or corrupt
    names = list(names or FAMILIES)
    out_dir = Path(out_dir)
    existing = sorted(out_dir.glob("distortion[0-9][0-9].npy")) if out_dir.is_dir() else []
    if existing and not (out_dir / "corruptions.json").exists():
        raise CompetitionError(f"{out_dir} holds {existing[0].name} but no corruptions.json: not a suite; "
                               f"choose another --out")
    manifest = {"format": "distortionNN.npy: uint8 (5*N, H, W, 3), rows [(s-1)*N, s*N) are severity s",
                "version": version, "names": {ood_name(i): n for i, n in enumerate(names)},
                "seed": int(seed), "n": len(images), "image_shape": list(images.shape[1:]), "complete": False}
    save_json(out_dir / "corruptions.json", manifest)
    for stale in existing[len(names):]:
        stale.unlink()
    paths = []
    for i, name in enumerate(names):
        paths.append(out_dir / ood_name(i))
        save_npy(paths[-1], np.concatenate([corrupt_fn(images, name, sev, seed) for sev in range(1, SEVERITIES + 1)]))
    if labels is not None:
        save_npy(out_dir / "labels.npy", np.asarray(labels, np.int64))
    save_json(out_dir / "suite.json", {**(source or {}), "n": len(images), "seed": int(seed)})
    save_json(out_dir / "corruptions.json", {**manifest, "complete": True})
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the suite")
    p.add_argument("--dataset", default="imagefolder")
    p.add_argument("--data", help="imagefolder: folder or .tar.gz")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--folds-dir", default="folds")
    p.add_argument("--fold", type=int, default=None, help="the held-out fold whose images are corrupted (choose "
                   "images, flagged); default: the folds file's measure reserve, as `score suite`")
    p.add_argument("--n", type=int, default=2000, help="held-out images (0: the whole fold); the same rows as "
                   "`competition.score suite` picks for the same --fold, --n and --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="every class equally, as `score suite --balanced`")
    p.add_argument("--names", default=",".join(FAMILIES), help="comma-separated families, in file order")
    p.add_argument("--preview", help="also draw a PNG: rows = families, columns = clean + severities")
    a = p.parse_args(argv)
    names = [x.strip() for x in a.names.split(",") if x.strip()]
    try:
        unknown = [n for n in names if n not in FAMILIES]
        if unknown or not names:
            raise CompetitionError(f"unknown family {', '.join(unknown) or '(none)'}; "
                                   f"choose from {', '.join(FAMILIES)}")
        images, labels, source = score.held_out_images(a.dataset, a.data, a.data_dir, a.folds_dir, a.fold)
        rows = score.suite_rows(source, len(images), a.n, a.seed,  # the rows `score suite` would take
                                labels if a.balanced else None)
        t0 = time.time()
        make_suite(images[rows], None if labels is None else labels[rows], a.out, a.seed, names,
                   {**source, "rows": rows.tolist()})
        print(f"suite {a.out}: {len(names)} families outside the 19 x {SEVERITIES} severities x {len(rows)} images "
              f"in {time.time() - t0:.1f} s")
        if a.preview:
            preview(images[rows[:2]], a.preview, a.seed, names)
            print(f"preview: {a.preview}")
    except CompetitionError as e:
        sys.exit(f"error: {e}")


def preview(images: np.ndarray, path, seed: int, names) -> None:
    """One PNG: for each image, rows = families, columns = clean then severities 1..5 (x4 nearest)."""
    rows = [np.concatenate([im] + [corrupt(im[None], n, sev, seed)[0] for sev in range(1, SEVERITIES + 1)], axis=1)
            for im in images for n in names]
    grid = np.concatenate(rows, axis=0).repeat(4, 0).repeat(4, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), grid[..., ::-1])


if __name__ == "__main__":
    main()
