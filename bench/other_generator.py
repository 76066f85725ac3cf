"""A measuring suite of the 19's families made by another implementation: albumentations'
transforms driven by make_cifar_c.py's published CIFAR parameters (the tables in
competition/corruptions.py), so that an accuracy measured on the project's own generator can be
checked for being an artefact of that generator.

    python bench/other_generator.py --data PATH/cifar10-jpg-train.tar.gz --folds-dir FOLDS \\
        --n 500 --balanced --out models/honest-fs0/other-bal500
    python -m competition.predict RUN --ood-dir models/honest-fs0/other-bal500 --tta flip --adapt bn --no-test
    python bench/other_generator.py --compare RUN [RUN ...] --ours SUITE --other SUITE [--tta flip --adapt bn]

The same rows as `score suite` (and bench/outside_families.py) for the same --fold/--n/--seed/
--balanced, so `--compare` pairs each family's accuracy on our generator with the other's, image by
image. Only families whose published parameters map onto an albumentations argument are made
(10 of the 19): Gaussian noise (std), shot noise (scale = 1 / photons), impulse noise (amount),
Gaussian blur (sigma), glass blur (sigma, max_delta, iterations), zoom blur (zoom factors up to c
in steps of 0.01), brightness (HSV value shift), contrast (ColorJitter's blend with the grey
mean), JPEG (quality), pixelate (downscale factor, area both ways). Left out, because
albumentations parameterises them otherwise: defocus (integer radii only), motion blur (a random
line kernel, not ImageMagick's radius/sigma), speckle (uniform, not Gaussian, multiplicative
noise), saturate, elastic, snow, frost, fog, spatter. Where the two implementations differ on
purpose it is said in FAMILIES' comments: the point is two honest readings of one table, not a
copy of ours.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from competition import corruptions as C  # noqa: E402
from competition import score  # noqa: E402
from competition.corruptions import derived_seed  # noqa: E402
from competition.data import SEVERITIES, OodSet, check_images  # noqa: E402
from competition.files import CompetitionError  # noqa: E402
from competition.runs import RunDir, setting_name  # noqa: E402
from outside_families import make_suite  # noqa: E402

# Bump when a mapping below changes.
VERSION = 1

FAMILIES = {
    "gaussian_noise": lambda s: A.GaussNoise(std_range=(C.GAUSSIAN_NOISE[s],) * 2, mean_range=(0, 0), p=1),
    # albumentations draws the photons in linear light (gamma 2.2): less change than ours at the same scale
    "shot_noise": lambda s: A.ShotNoise(scale_range=(1 / C.SHOT_NOISE[s],) * 2, p=1),
    # amount = the share of pixels hit in all three channels, where skimage (make_cifar_c's) hits each
    # channel value on its own: the same table read per pixel, black and white dots instead of coloured
    "impulse_noise": lambda s: A.SaltAndPepper(amount=(C.IMPULSE_NOISE[s],) * 2, salt_vs_pepper=(0.5, 0.5), p=1),
    # kernel size from sigma (blur_limit=0): at sigma 0.4 its kernel barely blurs (severity 1 is milder)
    "gaussian_blur": lambda s: A.GaussianBlur(sigma_limit=(C.GAUSSIAN_BLUR[s],) * 2, blur_limit=0, p=1),
    "glass_blur": lambda s: A.GlassBlur(sigma=C.GLASS_BLUR[s][0], max_delta=C.GLASS_BLUR[s][1],
                                        iterations=C.GLASS_BLUR[s][2], mode="exact", p=1),
    "zoom_blur": lambda s: A.ZoomBlur(max_factor=(C.ZOOM_BLUR[s],) * 2, step_factor=(0.01, 0.01), p=1),
    "brightness": lambda s: A.HueSaturationValue(hue_shift_limit=0, sat_shift_limit=0,
                                                 val_shift_limit=(C.BRIGHTNESS[s] * 255,) * 2, p=1),
    # around the grey mean (torchvision's definition) where make_cifar_c takes each channel's mean
    "contrast": lambda s: A.ColorJitter(brightness=(1, 1), contrast=(C.CONTRAST[s],) * 2, saturation=(1, 1),
                                        hue=(0, 0), p=1),
    # OpenCV's JPEG encoder where ours uses PIL's; albumentations passes the RGB array as if it were
    # BGR, so the chroma planes are taken with red and blue swapped (a variant, kept as it ships)
    "jpeg_compression": lambda s: A.ImageCompression(quality_range=(C.JPEG_QUALITY[s],) * 2, p=1),
    # OpenCV's area resampling both ways where make_cifar_c uses PIL's BOX
    "pixelate": lambda s: A.Downscale(scale_range=(C.PIXELATE[s],) * 2,
                                      interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_AREA},
                                      p=1),
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same images under albumentations' `name` at `severity` 1..5; one
    seeded stream per (seed, family, severity), drawn image by image."""
    check_images(images, "other_generator.corrupt(images)")
    if name not in FAMILIES:
        raise CompetitionError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    pipeline = A.Compose([FAMILIES[name](severity - 1)], seed=derived_seed(seed, f"albumentations:{name}", severity))
    return np.stack([pipeline(image=np.ascontiguousarray(im))["image"] for im in images]).astype(np.uint8)


def family_accuracy(run: Path, suite: Path, tta: str, adapt: str) -> dict[str, np.ndarray]:
    """{family: (N,) share of the 5 severities each image is right at}, from the logits predict saved
    for the run on that suite (checked as score checks them; nothing is recomputed here)."""
    ood = OodSet(suite)
    n = len(ood.labels)
    paths = RunDir(run).ood_logits_paths(ood, setting_name(tta, adapt=adapt))
    out = {}
    for path, name in zip(paths, ood.info()["names"].values()):
        right = np.load(path, allow_pickle=False).argmax(-1).reshape(SEVERITIES, n) == ood.labels
        out[name] = right.mean(0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the suite")
    p.add_argument("--dataset", default="imagefolder")
    p.add_argument("--data", help="imagefolder: folder or .tar.gz")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--folds-dir", default="folds")
    p.add_argument("--fold", type=int, default=None, help="the held-out fold whose images are corrupted; default: "
                   "the folds file's measure reserve, as `score suite`")
    p.add_argument("--n", type=int, default=2000, help="held-out images (0: all): the rows `score suite` takes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="every class equally, as `score suite --balanced`")
    p.add_argument("--names", default=",".join(FAMILIES), help="comma-separated families, in file order")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="runs whose logits on --ours and --other to compare")
    p.add_argument("--ours", type=Path, help="--compare: the suite of this project's generator (the same rows)")
    p.add_argument("--other", type=Path, help="--compare: this script's suite")
    p.add_argument("--tta", default="flip")
    p.add_argument("--adapt", default="bn")
    a = p.parse_args(argv)
    try:
        if a.compare:
            compare(a)
            return
        if not a.out:
            raise CompetitionError("--out FOLDER (or --compare RUN ... --ours SUITE --other SUITE)")
        names = [x.strip() for x in a.names.split(",") if x.strip()]
        unknown = [n for n in names if n not in FAMILIES]
        if unknown or not names:
            raise CompetitionError(f"unknown family {', '.join(unknown) or '(none)'}; "
                                   f"choose from {', '.join(FAMILIES)}")
        images, labels, source = score.held_out_images(a.dataset, a.data, a.data_dir, a.folds_dir, a.fold)
        rows = score.suite_rows(source, len(images), a.n, a.seed, labels if a.balanced else None)
        t0 = time.time()
        make_suite(images[rows], None if labels is None else labels[rows], a.out, a.seed, names,
                   {**source, "rows": rows.tolist(), "generator": f"albumentations {A.__version__}"},
                   corrupt_fn=corrupt, version=f"albumentations-{VERSION}")
        print(f"suite {a.out}: {len(names)} of the 19 families by albumentations {A.__version__} x {SEVERITIES} "
              f"severities x {len(rows)} images in {time.time() - t0:.1f} s")
    except CompetitionError as e:
        sys.exit(f"error: {e}")


def compare(a) -> None:
    """Per family and overall: accuracy on our generator vs the other, paired over images."""
    if not (a.ours and a.other):
        raise CompetitionError("--compare needs --ours SUITE and --other SUITE")
    ours, other = OodSet(a.ours), OodSet(a.other)
    if ours.info().get("source_rows") != other.info().get("source_rows") or \
            not np.array_equal(ours.labels, other.labels):
        raise CompetitionError(f"{a.ours} and {a.other} corrupt different images: build --other with the same "
                               f"--fold/--n/--seed/--balanced as --ours")
    for run in map(Path, a.compare):
        mine, theirs = (family_accuracy(run, s, a.tta, a.adapt) for s in (a.ours, a.other))
        common = [f for f in theirs if f in mine]
        print(f"\n{run.name} ({a.tta}{'+' + a.adapt if a.adapt != 'none' else ''}), % right, "
              f"{len(next(iter(mine.values())))} images x 5 severities per family")
        print(f"{'family':18s} {'ours':>7s} {'other':>7s} {'other-ours':>10s} {'s.e.':>5s}")
        for f in common + ["(these families)"]:
            x, y = ((np.mean([d[g] for g in common], 0) if f.startswith("(") else d[f]) for d in (mine, theirs))
            diff = y - x
            print(f"{f:18s} {100 * x.mean():7.2f} {100 * y.mean():7.2f} {100 * diff.mean():+10.2f} "
                  f"{100 * diff.std(ddof=1) / np.sqrt(len(diff)):5.2f}")


if __name__ == "__main__":
    main()
