"""Augmentation and input preprocessing.

Two places, chosen by cost:

* per image, on the CPU, in DataLoader workers: albumentations pipelines on uint8 HWC arrays
  (`cpu_pipeline`: `basic` geometry, or `strong` = basic + colour, blur, noise, JPEG and
  dropout, the corruption families the OOD test set is made of);
* per batch, on the device: flip + translate as one gather on the uint8 batch (`flip_translate`),
  then `to_input` (uint8 NHWC -> normalised float NCHW, resized to the model's size), then
  random erasing and timm's Mixup/CutMix on the float batch (`BatchAugment`). Random numbers
  are drawn on the device and nothing reads a value back, so a GPU step never waits on the host.

`to_input` is also the *only* preprocessing path of prediction: the run's saved config holds
image_size, mean and std, so OOD, validation and training images are prepared identically.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from competition.files import CompetitionError
from competition.specs import AugmentSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_stats(images: np.ndarray, norm: str, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units for `norm`: data (these images), imagenet, none."""
    if norm == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if norm == "none":
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if norm != "data":
        raise CompetitionError(f"norm must be data, imagenet or none, not {norm!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:  # the histograms below index by value
        raise CompetitionError(f"input_stats: the training images are {getattr(images, 'dtype', type(images))}, "
                               f"not uint8 (a pseudo-label file of another type joined them?)")
    step = max(1, len(images) // max_images)  # a strided subset estimates the statistics to <0.1%
    x = images[::step].reshape(-1, 3)
    # From per-channel histograms of the uint8 values: exact, and 10x faster than a float64 copy.
    counts = np.stack([np.bincount(x[:, c], minlength=256) for c in range(3)]).astype(np.float64)
    v = np.arange(256) / 255.0
    mean = counts @ v / len(x)
    std = np.sqrt(np.maximum(counts @ v ** 2 / len(x) - mean ** 2, 0.0))
    return mean.round(5).tolist(), np.maximum(std, 1e-3).round(5).tolist()


def to_input(images: torch.Tensor, mean, std, image_size: int | None = None,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> float32 (B, 3, S, S), normalised.

    Resizing happens here, batched on the device, so a 32x32 dataset feeds a 224x224 ImageNet
    model without any per-image CPU work (and without holding 224x224 copies in memory)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CompetitionError(f"expected a uint8 (B, H, W, 3) batch, got {images.dtype} {tuple(images.shape)}")
    # An NHWC uint8 batch permuted is already channels-last in memory, and float() keeps that.
    x = images.permute(0, 3, 1, 2).float()
    if image_size and (x.shape[-2], x.shape[-1]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=image_size < x.shape[-1])
    # (x / 255 - mean) / std as one multiply-add (resizing is linear, so it commutes with this).
    scale, shift = _affine(tuple(mean), tuple(std), x.device, x.dtype)
    x = torch.addcmul(shift, x, scale)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@functools.lru_cache(maxsize=32)
def _affine(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype):
    """to_input's per-channel scale and shift, made once per (stats, device): torch.tensor(...,
    device=cuda) in every step would be a blocking host-to-device copy per batch."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device, dtype=dtype).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device, dtype=dtype).view(1, 3, 1, 1)
    return scale, shift


def shrink_images(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3) with to_input's resize (bilinear,
    antialiased), rounded. Training at a fixed size below the stored one resizes the dataset
    once with this instead of every batch (about 10% of a 24 px CPU step); predictions still
    resize the original images in to_input, which differs from this only by the rounding."""
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < images.shape[1])
        out[i:i + chunk] = x.round_().clamp_(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    return out


def reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside 0..n-1 mirrored back inside (reflect padding without building the pad)."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def flip_translate(images: torch.Tensor, flip: bool = True, translate: int = 0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip and random shift of up to `translate` pixels (reflect padding) of a
    uint8 (B, H, W, C) batch, as one gather: a few microseconds per batch on a GPU, versus
    torchvision transforms per image in workers (airbench's trick)."""
    if not flip and not translate:
        return images
    b, h, w, c = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    # Drawn on the batch's device (CPU-made numbers copied up would make the host wait each step),
    # or on the given generator's device.
    rdev = generator.device if generator is not None else dev
    if translate:
        shift = torch.randint(-translate, translate + 1, (b, 2), device=rdev, generator=generator).to(dev)
        rows = reflect_index(rows + shift[:, :1], h)
        cols = reflect_index(cols + shift[:, 1:], w)
    if flip:
        mirror = torch.rand(b, 1, device=rdev, generator=generator).to(dev) < 0.5
        cols = torch.where(mirror, w - 1 - cols, cols)
    pixel = (rows[:, :, None] * w + cols[:, None, :]).view(b, h * w)  # flat source index per output pixel
    if c == 3:
        # Each RGB pixel padded to 4 bytes and gathered as one int32: 1.8x faster on a CPU than
        # gathering bytes (2.6 vs 4.7 ms for 256 images), ~3% of a part1_cpu step.
        px = torch.cat([images, images.new_zeros(b, h, w, 1)], -1).view(torch.int32).view(b, h * w)
        return torch.gather(px, 1, pixel).view(b, h, w, 1).view(torch.uint8)[..., :3]
    return torch.gather(images.reshape(b, h * w, c), 1, pixel[:, :, None].expand(b, h * w, c)).view(b, h, w, c)


# ---------------------------------------------------------------------------- robustness to corruptions

def augmix_views(images: torch.Tensor, views: int, severity: int = 3, group: int = 16) -> list[torch.Tensor]:
    """`views` AugMix versions (Hendrycks et al. 2020) of a uint8 (B, H, W, 3) batch, on its device.

    torchvision's AugMix with all_ops=False: only autocontrast, equalize, posterize, rotate,
    solarize, shear and translate, the operation list the paper keeps disjoint from the test
    corruptions. On a batch tensor it draws one chain of operations per call (the mixing
    weights per image), so it is called on groups of `group` images (larger groups for batches
    over 16 x group: at most 16 calls per view, each of which copies small tensors to the
    device): 16 chains per batch at a fraction of a per-image loop's cost (24 ms vs 200 ms per
    256 images on a 2-core CPU)."""
    from torchvision.transforms import v2

    aug = v2.AugMix(severity=severity, all_ops=False)
    group = max(group, -(-len(images) // 16))  # at most 16 calls per view: each makes small host-to-device copies
    chw = images.permute(0, 3, 1, 2)
    return [torch.cat([aug(g) for g in chw.split(group)]).permute(0, 2, 3, 1) for _ in range(views)]


class NoiseBlur:
    """Cheap corruption-style augmentation on the device: each image, with probability `p`,
    gets Gaussian noise (std up to `noise_std` of the [0, 1] range) or a Gaussian blur (sigma up
    to `blur_sigma` px), half and half. On the normalised float batch: blur commutes with the
    per-channel normalisation, and the noise is scaled by each channel's std. A few ms per CPU
    batch, against hundreds for per-image albumentations in workers on 2 cores."""

    def __init__(self, p: float, std: list[float], noise_std: float = 0.1, blur_sigma: float = 1.0):
        self.p, self.noise_std, self.blur_sigma = p, noise_std, blur_sigma
        self.channel_std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # On a GPU, no host sync: the index path's .any() and nonzero() make the host wait for the
        # GPU every step. On a CPU only the chosen images are touched: there the arithmetic is the cost.
        return self.masked(x) if x.device.type != "cpu" else self.indexed(x)

    def _pick(self, x: torch.Tensor):
        pick = torch.rand(len(x), device=x.device)
        return pick < self.p / 2, (pick >= self.p / 2) & (pick < self.p), self.channel_std.to(x.device)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """Every image gets noise and blur, kept where picked (free on a GPU)."""
        b, c, h, w = x.shape
        noisy, blurry, std = self._pick(x)
        sigma = torch.rand(b, 1, 1, 1, device=x.device) * self.noise_std / std
        out = torch.where(noisy.view(b, 1, 1, 1), x + torch.randn(b, c, h, w, device=x.device, dtype=x.dtype) * sigma, x)
        sig = 0.3 + torch.rand(b, device=x.device) * (self.blur_sigma - 0.3)
        return torch.where(blurry.view(b, 1, 1, 1), _blur(out, sig).to(out.dtype), out)

    def indexed(self, x: torch.Tensor) -> torch.Tensor:
        """Only the picked images are computed on."""
        b, c, h, w = x.shape
        noisy, blurry, std = self._pick(x)
        out = x.clone()
        if noisy.any():  # only the chosen images draw noise (randn_like on a channels-last batch is 10x slower)
            idx = torch.nonzero(noisy).squeeze(1)
            sigma = torch.rand(len(idx), 1, 1, 1, device=x.device) * self.noise_std / std
            out[idx] = out[idx] + torch.randn(len(idx), c, h, w, device=x.device, dtype=x.dtype) * sigma
        if blurry.any():
            idx = torch.nonzero(blurry).squeeze(1)
            sig = 0.3 + torch.rand(len(idx), device=x.device) * (self.blur_sigma - 0.3)
            out[idx] = _blur(out[idx], sig).to(out.dtype)
        return out


def _blur(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """A separable 5-tap Gaussian blur of each image of x (B, C, H, W) with its own sigma (B,)."""
    n, c, h, w = x.shape
    t = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-t[None] ** 2 / (2 * sig[:, None].to(x.dtype) ** 2))
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*C, 5): one kernel per image channel
    sel = x.contiguous().view(1, n * c, h, w)
    sel = F.conv2d(F.pad(sel, (2, 2, 0, 0), mode="reflect"), k1.view(-1, 1, 1, 5), groups=n * c)
    sel = F.conv2d(F.pad(sel, (0, 0, 2, 2), mode="reflect"), k1.view(-1, 1, 5, 1), groups=n * c)
    return sel.view(n, c, h, w)


class RandomErase:
    """Random erasing (Zhong et al. 2020) of a normalised float batch, batched on its device:
    each image, with probability p, gets one rectangle of area 2-33% of the image and aspect
    ratio 0.3-3.3 filled with per-pixel normal noise (timm's defaults, mode "pixel"). Written
    here because timm's RandomErasing loops over the images in Python with up to 10 tries each
    (a host round trip per image on a GPU); here a box that would not fit is clipped to the
    image instead of redrawn, which makes full-height or full-width boxes slightly more common."""

    def __init__(self, p: float, area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)):
        self.p, self.area, self.log_ratio = p, area, (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        area = h * w * torch.empty(b, device=dev).uniform_(*self.area)
        ratio = torch.empty(b, device=dev).uniform_(*self.log_ratio).exp()
        eh = (area * ratio).sqrt().round().clamp(1, h)
        ew = (area / ratio).sqrt().round().clamp(1, w)
        top = (torch.rand(b, device=dev) * (h - eh + 1)).floor().view(b, 1, 1)
        left = (torch.rand(b, device=dev) * (w - ew + 1)).floor().view(b, 1, 1)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = (rows >= top) & (rows < top + eh.view(b, 1, 1)) & (cols >= left) & (cols < left + ew.view(b, 1, 1))
        on = (torch.rand(b, device=dev) < self.p).view(b, 1, 1)
        noise = torch.randn(b, c, h, w, device=dev, dtype=x.dtype)
        return torch.where((inside & on).unsqueeze(1), noise, x)


class BatchAugment:
    """Device-side float-batch augmentation from the AugmentSpec: corruption-style noise/blur
    (NoiseBlur), random erasing (RandomErase), then timm Mixup/CutMix (which returns soft targets,
    the loss's label smoothing folded in)."""

    def __init__(self, spec: AugmentSpec, num_classes: int, std: list[float] | None = None,
                 label_smoothing: float = 0.0):
        from timm.data import Mixup

        self.noise_blur = None
        if spec.noise_blur:
            self.noise_blur = NoiseBlur(spec.noise_blur, std or [1.0, 1.0, 1.0], spec.noise_std, spec.blur_sigma)
        self.erase = None
        if spec.random_erasing:
            self.erase = RandomErase(spec.random_erasing)
        self.mix = None
        if spec.mixup or spec.cutmix:
            self.mix = Mixup(mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, prob=spec.mix_prob,
                             label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.noise_blur is not None:
            x = self.noise_blur(x)
        if self.erase is not None:
            x = self.erase(x)
        if self.mix is not None:
            if len(x) % 2:  # timm's Mixup pairs each image with its mirror in the batch
                x, y = x[:-1], y[:-1]
            x, y = self.mix(x, y)
        return x, y


def cpu_pipeline(kind: str):
    """Per-image albumentations pipeline on uint8 HWC (None for `none`).

    `strong` adds the corruption families of the OOD set (noise, blur, colour, JPEG, dropout) so
    the model has seen their like; the report that added it from a later epoch found it hurt
    early convergence but helped once the model had begun to fit (`strong_aug_epoch`)."""
    if kind in (None, "none"):
        return None
    import albumentations as A
    import cv2

    basic = [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.1, 0.1), rotate=(-12, 12),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.7),
    ]
    if kind == "basic":
        return A.Compose(basic)
    if kind == "corrupt":
        return corrupt_pipeline()
    if kind != "strong":
        raise CompetitionError(f"cpu_aug must be none, basic, strong or corrupt, not {kind!r}")
    strong = basic + [
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.6),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 3)), A.MotionBlur(blur_limit=(3, 5)),
                 A.Defocus(radius=(1, 2))], p=0.3),
        A.OneOf([A.GaussNoise(std_range=(0.02, 0.1)), A.ISONoise(), A.MultiplicativeNoise(multiplier=(0.85, 1.15))],
                p=0.3),
        A.ImageCompression(quality_range=(30, 90), p=0.25),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.2, 0.4), hole_width_range=(0.2, 0.4),
                        fill=0, p=0.3),
    ]
    return A.Compose(strong)


def corrupt_pipeline(p: float = 0.5):
    """`cpu_aug: corrupt`: with probability p, one random corruption of the leaderboard's
    families at a random strength spanning CIFAR-C's severities (0.05 ms per image on average).
    Not frost (albumentations has none) nor fog (RandomFog takes 5 ms per 32x32 image, 10x all
    the others together). albumentations' implementations on purpose, not competition.corruptions:
    the local suite must not score this augmentation against itself."""
    import albumentations as A
    import cv2

    reflect = cv2.BORDER_REFLECT_101
    ops = [
        A.GaussNoise(std_range=(0.02, 0.12)), A.ShotNoise(scale_range=(0.002, 0.03)),
        A.SaltAndPepper(amount=(0.01, 0.08)), A.MultiplicativeNoise(multiplier=(0.7, 1.3), elementwise=True),
        A.Defocus(radius=(1, 2), alias_blur=(0.1, 0.5)), A.GlassBlur(sigma=0.5, max_delta=1, iterations=1, mode="fast"),
        A.MotionBlur(blur_limit=(3, 7)), A.ZoomBlur(max_factor=(1.05, 1.25), step_factor=(0.01, 0.02)),
        A.GaussianBlur(sigma_limit=(0.4, 1.2), blur_limit=0),
        A.RandomSnow(snow_point_range=(0.1, 0.3), brightness_coeff=1.5),
        A.OneOf([A.Spatter(mode="rain"), A.Spatter(mode="mud")]),
        A.RandomBrightnessContrast(brightness_limit=(0.0, 0.3), contrast_limit=(-0.8, -0.2)),
        A.ColorJitter(brightness=0, contrast=0, saturation=(0.1, 2.5), hue=0),
        A.ElasticTransform(alpha=2.0, sigma=1.0, border_mode=reflect),
        A.Downscale(scale_range=(0.5, 0.95)), A.ImageCompression(quality_range=(20, 85)),
    ]
    return A.Compose([A.OneOf(ops, p=p)])


def train_input(images: torch.Tensor, spec: AugmentSpec, prep: dict, size: int) -> torch.Tensor:
    """A uint8 (B, H, W, 3) training batch -> the model's float input at `size`: random flip and
    shift (spec flip, translate), AugMix when set, then to_input. The loop and step_throughput
    both use this."""
    x = flip_translate(images, spec.flip, spec.translate)
    if spec.augmix:  # with jsd: clean + 2 AugMix views, stacked (JsdCrossEntropy splits them)
        views = augmix_views(x, 2 if spec.jsd else 1, spec.augmix_severity)
        x = torch.cat([x, *views]) if spec.jsd else views[0]
    return to_input(x, prep["mean"], prep["std"], size, prep["channels_last"])
