"""Architectures, built by name: `build_model(name, num_classes, **model_args)`.

    simple_cnn    Part 1: conv blocks (conv-BN-ReLU x2, max-pool) and an MLP head
    resnet18      Part 2: from scratch; stem="cifar" (3x3 stride 1, no max-pool, native 32x32)
                  or stem="imagenet" (7x7 stride 2 + max-pool, for upscaled input)
    resnet50      Part 3: ImageNet-pretrained (timm weights, or a local file) with a new head
    mobilenet_v1  studies: depthwise-separable stack of the MobileNet paper, CIFAR strides
    mobilenet_v2  studies: inverted residuals and linear bottlenecks (torchvision), CIFAR strides

A plain dict registry, like timm's `@register_model` without the machinery. Progressive
unfreezing opens module-name prefixes; `RESNET_GROUPS` names the ResNet stages.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from competition import mobilenets
from competition.config import complete
from competition.files import CompetitionError
from competition.specs import ModelSpec

# -------------------------------------------------------------------- Part 1: simple CNN


def simple_cnn(num_classes: int, widths=(64, 128, 256), hidden: int = 256, dropout: float = 0.2,
               convs_per_block: int = 2, pool_first: bool = False, activation: str = "relu",
               head_grid: int = 1) -> nn.Module:
    """Conv blocks (conv3x3-BN-ReLU x convs_per_block, then 2x2 max-pool), max-pool to a
    head_grid x head_grid grid, MLP.

    `convs_per_block` is one number or one per block: extra convs are cheapest in the late,
    low-resolution blocks (a 4x4 map costs 1/64 of a 32x32 one). `pool_first` puts each block's
    max-pool straight after its last conv (conv-pool-BN-ReLU, as in Page's fast CIFAR ResNet):
    max-pool commutes with the monotone BN-ReLU up to BN's sign, and BN and ReLU then touch a
    quarter of the pixels, which is most of a CPU step's time for narrow networks.
    `activation`: relu | gelu | silu. `head_grid` 1 is a global max-pool; 2 keeps a 2x2 grid of
    maxima, i.e. roughly where in the image a feature fired (+0.6 to +0.9 points on part1_cpu, whose
    last map is 2x2; measured on folds 0-2)."""
    if not (isinstance(head_grid, int) and head_grid >= 1):
        raise CompetitionError(f"simple_cnn: head_grid must be a positive whole number, not {head_grid!r}")
    acts = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": lambda: nn.SiLU(inplace=True)}
    if activation not in acts:
        raise CompetitionError(f"simple_cnn: activation {activation!r} is not one of {', '.join(acts)}")
    act = acts[activation]
    layers, c_in = [], 3
    per_block = convs_per_block if isinstance(convs_per_block, (list, tuple)) else [convs_per_block] * len(widths)
    if len(per_block) != len(widths):
        raise CompetitionError(f"simple_cnn: convs_per_block {convs_per_block} needs one entry per width {widths}")
    for w, n_convs in zip(widths, per_block):
        for i in range(n_convs):
            pool_here = pool_first and i == n_convs - 1
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), *([nn.MaxPool2d(2)] if pool_here else []),
                       nn.BatchNorm2d(w), act()]
            c_in = w
        if not pool_first:
            layers.append(nn.MaxPool2d(2))
    # An adaptive max-pool to a fixed grid rather than a flatten: the head works at any input size.
    head = nn.Sequential(nn.AdaptiveMaxPool2d(head_grid), nn.Flatten(), nn.Linear(c_in * head_grid ** 2, hidden),
                         act(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    return nn.Sequential(nn.Sequential(*layers), head)


# -------------------------------------------------------------------- Parts 2 and 3: ResNets


def resnet18(num_classes: int, stem: str = "cifar", channels=(64, 128, 256, 512)) -> nn.Module:
    """`channels` narrows the four stages (the demo uses (16, 32, 64, 128) to fit a CPU minute)."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, channels=tuple(channels))
    if stem == "cifar":
        # 32x32 input through a stride-2 7x7 conv and a max-pool leaves 8x8 at layer1 and 1x1 at
        # layer4; the 3x3 stride-1 stem keeps 32x32 -> 4x4, the usual CIFAR ResNet layout.
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise CompetitionError(f"resnet18: stem must be 'cifar' or 'imagenet', not {stem!r}")
    return model


def resnet50(num_classes: int, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """timm's ResNet-50; `weights` is a local file (timm or torchvision state dict, .pth or
    .safetensors) loaded through timm's own pretrained path, so offline machines use the same
    code as the hub download. The 1000-class ImageNet head is dropped for a new one.

    `pretrained` without `weights`: timm's ImageNet weights from the local Hugging Face cache
    when they are there (no network at all), else from the hub, after one short look at whether
    it can be reached (`hub_unreachable`): an offline machine gets the weights=PATH message in
    seconds instead of after the hub client's minute of retries."""
    import timm

    if weights:
        model = timm.create_model("resnet50", pretrained=False, num_classes=num_classes)
        load_backbone(model, Path(weights))
        return model
    if not pretrained:
        return timm.create_model("resnet50", pretrained=False, num_classes=num_classes)
    cached = cached_hub_weights("resnet50")
    if cached is not None:
        model = timm.create_model("resnet50", pretrained=False, num_classes=num_classes)
        load_backbone(model, cached)
        return model
    why = hub_unreachable()
    if why:
        raise CompetitionError(no_weights_message(why))
    try:
        return timm.create_model("resnet50", pretrained=True, num_classes=num_classes)
    except Exception as e:  # the hub answered but the download failed (hub down, no disk): the same way out
        raise CompetitionError(no_weights_message(f"the download failed: {type(e).__name__}: {str(e)[:200]}")) \
            from None


HUB_PROBE_S = 3.0  # the one look at the hub before a download: a connection there answers in well under a second


def no_weights_message(why: str) -> str:
    """The way out first (the project's option), then what happened."""
    return ("Part 3 needs ImageNet ResNet-50 weights: pass weights=PATH (--weights PATH; run.sh --weights PATH), a "
            "timm or torchvision resnet50 state dict saved on a machine with internet, e.g. `python -c \"import timm, "
            "torch; torch.save(timm.create_model('resnet50', pretrained=True).state_dict(), 'resnet50.pth')\"` "
            f"(README: The real competition). They are not in the Hugging Face cache, and {why}")


def _is_true(value) -> bool:
    return str(value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cached_hub_weights(model_name: str) -> Path | None:
    """The file of timm's default pretrained weights for `model_name` in the local Hugging Face
    cache (HF_HOME / HF_HUB_CACHE), or None when it is not there (or cannot be told)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        hub_id = get_pretrained_cfg(model_name).hf_hub_id
        if not hub_id:
            return None
        repo, _, revision = hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):  # timm's order
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    except Exception:  # an older or newer hub client: treat as not cached, the download path decides
        return None
    return None


def hub_unreachable(timeout: float = HUB_PROBE_S) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it can: HF_HUB_OFFLINE, else one
    TCP connection (to the HTTPS proxy when one is set for it) within `timeout` seconds, DNS
    included. One try, no retries: the hub client's own retries wait about a minute offline."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if _is_true(os.environ.get("HF_HUB_OFFLINE")) or getattr(constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set, so the hub is not asked"
    url = urlsplit(getattr(constants, "ENDPOINT", None) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    target = f"{host}:{port}"
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname, p.port or 8080
        target = f"the proxy {host}:{port} (for {target})"
    outcome: list = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    probe = threading.Thread(target=connect, daemon=True)  # a thread: name resolution ignores socket timeouts
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f"{target} did not answer within {timeout:g} s (one try)"
    if outcome[0] is not None:
        e = outcome[0]
        return f"{target} cannot be reached: {e.strerror or e} (one try)"
    return None


def check_weights_source(spec: ModelSpec) -> None:
    """Before a run folder is touched: the weights=PATH message now, when the model wants hub
    weights (resnet50, pretrained, no weights file) that are neither in the local cache nor
    reachable. Cheap: a cache lookup, and at most one short connection attempt."""
    if spec.model == "resnet50" and spec.pretrained and not spec.weights and cached_hub_weights("resnet50") is None:
        why = hub_unreachable()
        if why:
            raise CompetitionError(no_weights_message(why))


def load_backbone(model: nn.Module, path: Path) -> None:
    """Every tensor of `model` but its head (fc) from the state dict in `path` (timm or
    torchvision ResNet-50, .pth or .safetensors; a `state_dict`/`model` entry and `module.`
    prefixes are unwrapped by timm's load_state_dict). Strict on purpose: timm's pretrained path
    turns strict loading off once the head is dropped, so a file of another architecture (or
    with renamed keys) would load nothing and train a random backbone with only a log warning."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise CompetitionError(f"--weights {path}: no such file (an ImageNet ResNet-50 state dict, .pth or "
                               f".safetensors)")
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise CompetitionError(f"{path} is not a state dict torch or safetensors can read ({type(e).__name__}: "
                               f"{str(e)[:200]}); pass an ImageNet ResNet-50 state dict (.pth or .safetensors)") from None
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # BatchNorm's num_batches_tracked counter is absent from older torchvision files; torch itself
    # accepts that (the layer fills it in), so only real tensors count as missing.
    missing = sorted(k for k in set(own) - set(body) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(body) - set(own))
    shapes = sorted(k for k in set(own) & set(body) if tuple(own[k].shape) != tuple(body[k].shape))
    if missing or unexpected or shapes:
        def some(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{len(missing)} of the model's {len(own)} tensors are not in it: {some(missing)}" if missing else "",
                    f"{len(unexpected)} of its keys are not in the model: {some(unexpected)}" if unexpected else "",
                    f"{len(shapes)} have another shape: {some(shapes)}" if shapes else ""]
        raise CompetitionError(f"{path} does not match timm's resnet50 ({'; '.join(p for p in problems if p)}); pass "
                               f"a timm or torchvision ImageNet ResNet-50 state dict") from None
    model.load_state_dict(body, strict=False)  # strict=False only for the dropped head, checked above


# ResNet stages from the head down to the stem: what progressive unfreezing opens, in order.
RESNET_GROUPS = {"head": ["fc"], "layer4": ["layer4"], "layer3": ["layer3"], "layer2": ["layer2"],
                 "layer1": ["layer1"], "stem": ["conv1", "bn1"]}

MODELS = {"simple_cnn": simple_cnn, "resnet18": resnet18, "resnet50": resnet50,
          "mobilenet_v1": mobilenets.mobilenet_v1, "mobilenet_v2": mobilenets.mobilenet_v2}


def build_model(name: str, num_classes: int, **model_args) -> nn.Module:
    if name not in MODELS:
        raise CompetitionError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](num_classes, **model_args)
    except MemoryError:
        raise CompetitionError(f"model {name}: model_args {model_args} make a model too large for this machine's "
                               f"memory; choose smaller widths / hidden") from None
    except RuntimeError as e:  # e.g. a negative size, or torch's allocator refusing a huge one
        if "alloc" in str(e).lower() or "memory" in str(e).lower():
            raise CompetitionError(f"model {name}: model_args {model_args} make a model too large for this machine's "
                                   f"memory; choose smaller widths / hidden") from None
        raise CompetitionError(f"model {name}: bad model_args {model_args} ({str(e)[:200]})") from None
    except (TypeError, ValueError, OverflowError) as e:  # an unknown key, dropout outside [0, 1], ...
        raise CompetitionError(f"model {name}: bad model_args {model_args} ({str(e)[:200]})") from None


def model_from_config(spec: ModelSpec | dict, num_classes: int) -> nn.Module:
    """The model a spec describes (model, model_args; resnet50 also pretrained, weights). A dict is
    a saved run's config (runs.RunDir.load_model), read into a ModelSpec with base.yaml's default
    for any key it predates."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_config(complete(spec))
    args = {k: v for k, v in (spec.model_args or {}).items() if k not in ("pretrained", "weights")}
    if spec.model == "resnet50":
        args.update(pretrained=spec.pretrained, weights=spec.weights)
    return build_model(spec.model, num_classes, **args)


def set_trainable(model: nn.Module, prefixes: list[str] | None) -> int:
    """Let only parameters under the given module-name prefixes learn (None: all). Returns how many
    parameter tensors require grad."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [q for q in prefixes or [] if not any(under(n, q) for n in names)]
    if unknown:  # a typo would otherwise silently freeze the whole model
        tops = sorted({n.split(".")[0] for n in names})
        raise CompetitionError(f"unfreeze: {unknown} match no parameter of this model; its top-level modules are "
                               f"{tops} (groups: {', '.join(RESNET_GROUPS)}, all)")
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(prefixes is None or any(under(name, q) for q in prefixes))
        n += p.requires_grad
    return n


def under(name: str, prefix: str) -> bool:
    """Whether a parameter or module name lies under a module-name prefix (whole names: layer1 is
    not under layer10)."""
    return name == prefix or name.startswith(prefix + ".")


def stage_of(name: str) -> str | None:
    """The ResNet stage (a key of RESNET_GROUPS) a parameter or module name belongs to, or None."""
    return next((stage for stage, prefixes in RESNET_GROUPS.items() if any(under(name, q) for q in prefixes)), None)


def frozen_norms_to_eval(model: nn.Module) -> int:
    """Put every normalisation layer whose parameters are all frozen in eval mode (after
    model.train()); returns how many. Freezing only sets requires_grad: in train mode a frozen
    stage's BatchNorm would still overwrite its pretrained running statistics with those of the
    new data every step, so the stage would not be the one that was frozen."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
                n += 1
    return n


def unfrozen_prefixes(schedule: dict | None, epoch: int) -> list[str] | None:
    """Module prefixes open at `epoch` under a progressive-unfreezing schedule
    `{epoch: [group or prefix, ...]}` (groups as in RESNET_GROUPS; 'all' opens everything)."""
    if not schedule:
        return None
    opened: list[str] = []
    for start in sorted(int(k) for k in schedule):
        if start <= epoch:
            for g in schedule[start] if start in schedule else schedule[str(start)]:
                if g == "all":
                    return None
                opened += RESNET_GROUPS.get(g, [g])
    return opened


def save_random_resnet50(path) -> Path:
    """A randomly initialised ResNet-50 with the ImageNet head, saved like real weights: the
    offline demo's stand-in for pretrained weights (it is NOT pretrained; runs made with it
    say so in their config), and the tests' way through the local-weights path."""
    import timm
    from competition.files import atomic_path

    path = Path(path)
    with torch.random.fork_rng(), atomic_path(path, ".pth") as tmp:
        torch.manual_seed(0)  # the same file on every machine, so the demo's Part 3 is reproducible
        torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), tmp)
    return path


if __name__ == "__main__":
    import argparse

    from competition.files import cli

    def main(argv=None):
        p = argparse.ArgumentParser(prog="python -m competition.models",
                                    description="python -m competition.models --random-resnet50 PATH: save a "
                                                "random-weight ImageNet ResNet-50 state dict (offline demo)")
        p.add_argument("--random-resnet50", required=True, metavar="PATH")
        print(save_random_resnet50(p.parse_args(argv).random_resnet50))

    cli(main)()
