"""Test-time augmentation: views of a uint8 batch and the model's logits averaged over them.

A view is (mirror, dy, dx): an optional horizontal mirror, then a shift by dy rows and dx
columns with reflect padding (the padding training's flip_translate uses). Specs, as typed
after `--tta` or in a config's `oof_tta`: a preset name or a comma list of views, each `id`,
`flip`, `DY:DX` (shifted) or `fDY:DX` (mirrored and shifted). Presets:

    none   id                                            1 view
    flip   id, flip                                      2 views
    shift  {0, (+1,+1), (-1,-1)}                         3 views (no mirror: for digits, text, ...)
    shift1 {id, flip} x {0, (+1,+1), (-1,-1)}            6 views (airbench's mirror+translate)
    shift2 {id, flip} x {0, (+-1,+-1), (+-2,+-2)}        10 views

Training (held-out accuracy with its `oof_tta`) and prediction both go through `view_logits`,
so the accuracy train.py reports is the one the submission gets.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from competition import augment
from competition.files import CompetitionError

View = tuple  # (mirror: bool, dy: int, dx: int)
IDENTITY: View = (False, 0, 0)

MAX_SHIFT = 7  # reflect_index mirrors a shift of up to n-1 pixels back inside; the smallest images are 8 px
TTA_PRESETS: dict[str, list[View]] = {
    "none": [IDENTITY],
    "flip": [IDENTITY, (True, 0, 0)],
    "shift": [(False, d, d) for d in (0, 1, -1)],
    "shift1": [(m, d, d) for m in (False, True) for d in (0, 1, -1)],
    "shift2": [(m, d, d) for m in (False, True) for d in (0, 1, -1, 2, -2)],
}


def parse_tta(spec: str | None) -> list[View]:
    """A preset name or a comma list of views (see the module docstring)."""
    spec = (spec or "none").strip()
    if spec in TTA_PRESETS:
        return list(TTA_PRESETS[spec])
    views = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token in ("id", "flip"):
            views.append((token == "flip", 0, 0))
            continue
        mirror = token.startswith("f")
        body = token[1:] if mirror else token
        try:
            dy, dx = (int(v) for v in body.split(":"))
        except ValueError:
            raise CompetitionError(f"--tta {spec!r}: cannot read view {token!r}; use a preset "
                                   f"({', '.join(TTA_PRESETS)}) or views like id,flip,1:1,f-1:-1") from None
        if max(abs(dy), abs(dx)) > MAX_SHIFT:
            raise CompetitionError(f"--tta {spec!r}: view {token!r} shifts by more than {MAX_SHIFT} pixels (the "
                                   f"reflection is defined for images of at least {MAX_SHIFT + 1} pixels); use shifts "
                                   f"of -{MAX_SHIFT}..{MAX_SHIFT}, e.g. 1:1,f-1:-1")
        views.append((mirror, dy, dx))
    if not views:
        raise CompetitionError(f"--tta {spec!r} names no view")
    return views


def tta_name(views: list[View]) -> str:
    """The preset name of `views`, else their comma list: what predict.json and file names record."""
    for name, preset in TTA_PRESETS.items():
        if preset == views:
            return name
    return ",".join(("f" if m else "") + (f"{dy}:{dx}" if dy or dx else ("flip" if m else "id"))
                    for m, dy, dx in views)


def apply_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """One view of a uint8 (B, H, W, C) batch, as one gather."""
    mirror, dy, dx = view
    if not (mirror or dy or dx):
        return images
    _, h, w, _ = images.shape
    dev = images.device
    rows = augment.reflect_index(torch.arange(h, device=dev) + dy, h)
    cols = augment.reflect_index(torch.arange(w, device=dev) + dx, w)
    if mirror:
        cols = cols.flip(0)
    return images[:, rows][:, :, cols]


def view_logits(model: nn.Module, images: torch.Tensor, prep: dict, views: list[View]) -> list[torch.Tensor]:
    """float32 (B, C) logits of a uint8 (B, H, W, 3) batch, one tensor per view. `prep` is the
    run's data config (mean, std, image_size, channels_last): the preprocessing training used."""
    return [model(augment.to_input(apply_view(images, v), prep["mean"], prep["std"], prep["image_size"],
                                   prep["channels_last"])).float() for v in views]


@torch.no_grad()
def tta_logits(model: nn.Module, images: torch.Tensor, prep: dict, views: list[View],
               average: str = "logits") -> torch.Tensor:
    """float32 (B, C) logits of a uint8 (B, H, W, 3) batch averaged over `views`.

    average="prob" returns log(mean softmax): still a logit vector, so the ensemble and the
    argmax treat both kinds alike."""
    total = None
    for out in view_logits(model, images, prep, views):
        out = out.softmax(1) if average == "prob" else out
        total = out if total is None else total + out
    total = total / len(views)
    return total.clamp_min(1e-12).log() if average == "prob" else total



# ---------------------------------------------------------------------------- setting names in words

# The presets above, by name, in words (their view counts are read from TTA_PRESETS).
_TTA_WORDS = {"none": "no TTA", "flip": "mirror", "shift": "shifts, no mirror", "shift1": "mirror x shifts",
              "shift2": "mirror x shifts of 1 and 2 px"}
_ADAPT_WORDS = {"bn": "BN adaptation", "tent": "TENT adaptation", "shot": "SHOT adaptation",
                "eata": "EATA adaptation"}


def setting_words(setting) -> str:
    """A prediction setting (runs.setting_name: `TTA[-prob][+ADAPT]`, e.g. 'shift1+bn') in words,
    e.g. '6-view TTA (mirror x shifts) + BN adaptation'; a list of settings (a submission's
    members) joined with '; '."""
    if not isinstance(setting, str):
        return "; ".join(setting_words(s) for s in setting)
    base, _, adapt = setting.partition("+")
    prob = base.endswith("-prob")
    base = base[:-len("-prob")] if prob else base
    if base == "none":
        words = "no TTA"
    elif base in TTA_PRESETS:
        words = f"{len(TTA_PRESETS[base])}-view TTA ({_TTA_WORDS.get(base, base)})"
    else:  # a view list, made file-safe by setting_name
        words = f"TTA over the views {base}"
    if prob:
        words += ", probabilities averaged"
    if adapt:
        words += " + " + _adaptation_words(adapt)
    return words


_PARAM_WORDS = {"norm+head": "BN affine and classifier learn", "all": "every weight learns"}


def _adaptation_words(part: str) -> str:
    """'bn0.5' -> 'BN adaptation (blend 0.5)'; 'tent-all-ens0.99' -> 'TENT adaptation (every weight
    learns; weights pulled back to the source, alpha 0.99)'; an unknown part is named as it is."""
    from competition.adapt import parse_variant

    if part.startswith("bn") and part[2:3].isdigit():
        return f"{_ADAPT_WORDS['bn']} (blend {part[2:]})"
    try:
        objective, params, alpha = parse_variant(part)
    except ValueError:
        return f"{part} adaptation"
    extra = ([_PARAM_WORDS[params]] if params in _PARAM_WORDS else []) + \
        ([f"weights pulled back to the source, alpha {alpha:g}"] if alpha is not None else [])
    return _ADAPT_WORDS.get(objective, f"{objective} adaptation") + (f" ({'; '.join(extra)})" if extra else "")

@torch.no_grad()
def evaluate(model: nn.Module, loader, data_cfg: dict, accelerator, views=None):
    """(logits, labels, positions, TTA logits) of every sample in `loader`, as numpy, gathered
    across processes (gather_for_metrics drops the samples padded onto the last shard). With
    `views` (TTA views) the 4th array holds the logits averaged over them; the plain logits
    come from the same pass (the identity view). Positions index the loader's rows."""
    model.eval()
    wanted = list(views or [])
    passes = [IDENTITY] + [v for v in wanted if v != IDENTITY]
    outs, ys, pos, ttas = [], [], [], []
    for x, y, p in loader:
        with accelerator.autocast():
            per_view = view_logits(model, x, data_cfg, passes)
        logits, y, p = accelerator.gather_for_metrics((per_view[0], y, p))
        outs.append(logits.cpu()), ys.append(y.cpu()), pos.append(p.cpu())
        if wanted:
            avg = torch.stack([per_view[passes.index(v)] for v in wanted]).mean(0)
            ttas.append(accelerator.gather_for_metrics(avg).cpu())
    if not outs:
        empty = np.zeros((0, data_cfg["num_classes"]), np.float32)
        return empty, np.zeros(0, np.int64), np.zeros(0, np.int64), empty
    cat = lambda ts: torch.cat(ts).numpy()  # noqa: E731
    return cat(outs), cat(ys), cat(pos), cat(ttas) if ttas else np.zeros((0, data_cfg["num_classes"]), np.float32)

