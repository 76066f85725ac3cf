"""What one optimizer update touches (`Learner`): the model, its optimizer (timm parameter
groups), the per-update timm schedule, the EMA, the batch augmentation and the loss, made from
the run's spec (specs.TrainSpec) and the data config by `make_learner` and placed on the device by
Accelerate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from competition import augment, models, optim
from competition.files import CompetitionError
from competition.runs import RunDir, check_weights
from competition.specs import TrainSpec


@dataclass
class Learner:
    """What one optimizer update touches. `model` is Accelerate-prepared (DDP-wrapped when
    distributed), `net` the bare module (for unfreezing, EMA and state dicts); `spec` the run's
    spec it was made from (the loop's uint8 batch augmentation reads spec.augment)."""
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: object
    batch_aug: augment.BatchAugment
    loss_fn: nn.Module
    n_params: int
    spec: TrainSpec

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation uses: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.net


def make_learner(spec: TrainSpec, data_cfg: dict, accelerator) -> Learner:
    """Model, optimizer (timm parameter groups), per-update timm schedule, EMA, batch
    augmentation and loss, placed on the device by Accelerate."""
    with accelerator.main_process_first():  # one process fetches hub weights; the others read its cache
        model = models.model_from_config(spec.model, data_cfg["num_classes"])
    if spec.model.init_from:
        source = RunDir(spec.model.init_from)
        state = source.load_weights("best")["model"]
        check_weights(source.weights("best"), state, model.state_dict())  # as predict checks what it loads
        model.load_state_dict(state)
    n_params = sum(p.numel() for p in model.parameters())
    if spec.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The bare module, kept before compile and prepare wrap it: unfreezing, EMA, evaluation and
    # state dicts use its parameter names (unwrap_model would keep torch.compile's wrapper, and
    # every name would gain `_orig_mod.`).
    net = model
    optimizer = optim.make_optimizer(net, spec.optim)
    scheduler = optim.make_scheduler(optimizer, spec.schedule, spec.loop.epochs)
    if spec.model.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if spec.loop.ema:
        from timm.utils import ModelEmaV3
        # Built from the prepared (on-device) module: a copy on the same device keeps timm's
        # batched foreach update (one given device= from a CPU model falls back to a per-tensor loop).
        ema = ModelEmaV3(net, decay=spec.loop.ema)
    aug, smoothing = spec.augment, spec.optim.label_smoothing
    batch_aug = augment.BatchAugment(aug, data_cfg["num_classes"], data_cfg["std"], smoothing)
    if aug.mixup or aug.cutmix or spec.data.pseudo:
        from timm.loss import SoftTargetCrossEntropy
        loss_fn = SoftTargetCrossEntropy()  # Mixup (or TrainData.targets) already folded label smoothing in
    elif aug.jsd:
        from timm.loss import JsdCrossEntropy
        loss_fn = JsdCrossEntropy(num_splits=3, alpha=aug.jsd, smoothing=smoothing or None)
    else:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    return Learner(model, net, optimizer, scheduler, ema, batch_aug, loss_fn, n_params, spec)


def check_model(spec: TrainSpec) -> None:
    """Build the spec's model (without fetching weights), run one forward pass of two images at
    every size it will see, make its optimizer, schedule and unfreezing groups: a typo in any of
    them costs one message before the run folder is touched, never a run."""
    m = spec.model
    model = models.model_from_config(spec.replace(pretrained=False, weights=None).model, 10).eval()
    for size in sorted({spec.data.image_size or 32, *(spec.data.train_sizes or {}).values()}):
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, 3, size, size))
        except Exception as e:
            raise CompetitionError(f"{m.model} {m.model_args or {}} cannot take {size}x{size} input "
                                   f"({type(e).__name__}: {str(e)[:200]}); choose another image_size (or "
                                   f"train_sizes) for this model") from None
        if tuple(out.shape) != (2, 10):
            raise CompetitionError(f"{m.model}: {size}x{size} input gives output {tuple(out.shape)}, not "
                                   f"(batch, classes); choose another image_size")
    optim.make_scheduler(optim.make_optimizer(model, spec.optim), spec.schedule, spec.loop.epochs)
    unfreeze = spec.schedule.unfreeze
    for epoch in sorted(int(k) for k in unfreeze or {}):
        models.set_trainable(model, models.unfrozen_prefixes(unfreeze, epoch))
