"""The MobileNets of the ablation studies, adapted to 32x32 input, with their batch-norm variants.

    mobilenet_v1  the depthwise-separable stack of Howard et al. (2017): a 3x3 conv, then 13
                  (depthwise 3x3 + pointwise 1x1) blocks, global average pool, one linear layer.
                  CIFAR layout: first conv at stride 1, the blocks' four stride-2s kept, so
                  32x32 -> 32, 16, 8, 4, 2 (the ImageNet layout would leave 1x1 after 5 halvings)
    mobilenet_v2  torchvision's MobileNetV2 (inverted residuals, linear bottlenecks) with CIFAR
                  strides: stem stride 1 and the first stride-2 stage (24 channels) at stride 1,
                  so 32x32 -> 32, 16, 8, 4; no dropout in the head (v1 has none either)

model_args shared by both (config `model_args: {...}`):
    width             channel multiplier (0.25 for CPU budgets; every layer keeps >= 8 channels)
    activation        relu | relu6 | sigmoid | tanh | silu | gelu | hardswish | elu | leaky_relu
    bn                batchnorm | ghost | iew
    ghost_batch_size  bn=ghost: each chunk of this many images is normalised by its own statistics
    iew_weight        bn=iew: weight of the example's own statistics at inference

competition.models builds both by name (`model: mobilenet_v1`); this module imports nothing of the
package but its error type.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from competition.files import CompetitionError

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU,
               "swish": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish, "elu": nn.ELU,
               "leaky_relu": nn.LeakyReLU}
BN_KINDS = ("batchnorm", "ghost", "iew")

# ---------------------------------------------------------------------------- batch-norm variants


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost batch norm (Hoffer et al. 2017): in training, each chunk of `ghost_batch_size`
    images is normalised with its own mean and variance, as if the batch were that small (the
    noise of small batches regularises; large batches keep their throughput). The running
    statistics take one momentum step per forward towards the average of the chunk statistics.
    A batch no larger than the ghost size is exactly nn.BatchNorm2d; eval is always plain BN."""

    def __init__(self, num_features: int, ghost_batch_size: int = 32, **kwargs):
        super().__init__(num_features, **kwargs)
        if ghost_batch_size < 2:
            raise CompetitionError(f"ghost_batch_size must be >= 2, not {ghost_batch_size}")
        self.ghost_batch_size = int(ghost_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch_size:
            return super().forward(x)
        chunks = x.split(self.ghost_batch_size)  # the last chunk may be smaller
        out = torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks])
        if self.track_running_stats:
            with torch.no_grad():
                mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
                var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.to(self.running_var.dtype), m)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class IEWBatchNorm2d(nn.BatchNorm2d):
    """Inference example weighting (Summers & Dinneen 2020, "Four things everyone should know to
    improve batch normalization"): in training each image is normalised by batch statistics that
    include itself; at inference the running statistics do not. IEW puts it back: at eval each
    image is normalised by a blend of its own (spatial) statistics, weight `iew_weight`, and the
    running ones. The blended variance is that of the two-part mixture, so it stays positive.
    Predictions still do not depend on the other images of the batch. Training is plain BN."""

    def __init__(self, num_features: int, iew_weight: float = 1 / 128, **kwargs):
        super().__init__(num_features, **kwargs)
        if not 0.0 <= iew_weight <= 1.0:
            raise CompetitionError(f"iew_weight must be in [0, 1], not {iew_weight}")
        self.iew_weight = float(iew_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.track_running_stats or self.iew_weight == 0.0:
            return super().forward(x)
        a = self.iew_weight
        var_i, mean_i = torch.var_mean(x.float(), dim=(2, 3), unbiased=False, keepdim=True)  # (B, C, 1, 1)
        mean_r, var_r = self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
        mean = a * mean_i + (1 - a) * mean_r
        var = a * var_i + (1 - a) * var_r + a * (1 - a) * (mean_i - mean_r) ** 2
        y = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iew_weight={self.iew_weight}"


def norm_layer(bn: str = "batchnorm", ghost_batch_size: int = 32, iew_weight: float = 1 / 128):
    """A BatchNorm2d-like constructor `f(num_features)` for the `bn` model arg."""
    if bn == "batchnorm":
        return nn.BatchNorm2d
    if bn == "ghost":
        return partial(GhostBatchNorm2d, ghost_batch_size=ghost_batch_size)
    if bn == "iew":
        return partial(IEWBatchNorm2d, iew_weight=iew_weight)
    raise CompetitionError(f"bn must be one of {', '.join(BN_KINDS)}, not {bn!r}")


def activation_layer(name: str):
    if name not in ACTIVATIONS:
        raise CompetitionError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {name!r}")
    return ACTIVATIONS[name]


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width)))


# ---------------------------------------------------------------------------- MobileNet v1

# (output channels, stride) of the 13 depthwise-separable blocks, as in the paper's ImageNet
# table (stride 2 at blocks 2, 4, 6 and 12); for 32x32 only the stem keeps stride 1
# (kuangliu/pytorch-cifar's layout): 32 -> 32, 16, 8, 4, 2 before the pool.
V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0, activation: str = "relu", bn: str = "batchnorm",
                 ghost_batch_size: int = 32, iew_weight: float = 1 / 128, blocks=V1_BLOCKS):
        super().__init__()
        norm, act = norm_layer(bn, ghost_batch_size, iew_weight), activation_layer(activation)
        c_in = _ch(32, width)
        self.stem = nn.Sequential(nn.Conv2d(3, c_in, 3, 1, 1, bias=False), norm(c_in), act())
        layers = []
        for c, stride in blocks:
            c_out = _ch(c, width)
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), norm(c_in), act(),  # depthwise
                nn.Conv2d(c_in, c_out, 1, bias=False), norm(c_out), act()))  # pointwise
            c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, num_classes)
        return self.fc(self.pool(self.blocks(self.stem(x))))


def mobilenet_v1(num_classes: int, **model_args) -> nn.Module:
    return MobileNetV1(num_classes, **model_args)


# ---------------------------------------------------------------------------- MobileNet v2


def mobilenet_v2(num_classes: int, width: float = 1.0, activation: str = "relu6", bn: str = "batchnorm",
                 ghost_batch_size: int = 32, iew_weight: float = 1 / 128, dropout: float = 0.0) -> nn.Module:
    """torchvision's MobileNetV2 with CIFAR strides. `activation` replaces its ReLU6 everywhere
    (the v1 default `relu` is accepted too; the ablation base passes it to both)."""
    from torchvision.models import MobileNetV2

    act = activation_layer(activation)
    # t (expansion), c (channels), n (repeats), s (first stride): torchvision's table with the
    # 24-channel stage at stride 1 (the stem is set to stride 1 below): 32 -> 32, 32, 16, 8, 4.
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]
    model = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting,
                        norm_layer=norm_layer(bn, ghost_batch_size, iew_weight), dropout=dropout,
                        round_nearest=4 if width < 1 else 8)
    model.features[0][0].stride = (1, 1)
    if act is not nn.ReLU6:
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.ReLU6):
                    setattr(parent, name, act())
    return model
