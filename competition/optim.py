"""Optimizers, learning-rate schedules and batch-size schedules, from timm where it has them.

Schedules run on a continuous epoch clock: after each optimizer update the loop calls
`scheduler.step_update(epoch + fraction_done)`. Warmup, cycle lengths and milestones are
therefore all in epochs, and stay right when the batch size (hence the number of updates
per epoch) changes under a batch-size schedule.
"""
from __future__ import annotations

from torch import nn

from competition import models, specs
from competition.files import CompetitionError
from competition.specs import OptimSpec, ScheduleSpec

OPTIMIZERS = specs.OPTIMIZERS


def make_optimizer(model: nn.Module, spec: OptimSpec):
    """timm's create_optimizer_v2 over `param_groups(model, spec)`: no weight decay on norms and
    biases (`no_decay_norm_bias`) and, when `layer_decay` is set, one learning rate per ResNet stage."""
    from timm.optim import create_optimizer_v2

    name = spec.optimizer
    if name not in OPTIMIZERS:
        raise CompetitionError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    kwargs = {}
    if name == "sgd":
        # timm's "sgd" is Nesterov SGD; "momentum" is classical momentum SGD.
        name = "sgd" if spec.nesterov else "momentum"
        kwargs["momentum"] = spec.momentum
    return create_optimizer_v2(param_groups(model, spec), opt=name, lr=spec.lr, weight_decay=spec.weight_decay,
                               **kwargs)


def param_groups(model: nn.Module, spec: OptimSpec) -> list[dict]:
    """Parameter groups by (stage, decayed or not). With `layer_decay` d, a ResNet stage k steps
    below the head gets lr_scale d^k (head 1, layer4 d, layer3 d^2, ..., stem d^5), which timm's
    schedulers multiply into every LR they set. Written here rather than timm's layer_decay
    because timm groups ResNets per residual block (its fine-grained group_matcher: 18 groups for
    a ResNet-50), so 0.7 would give the first block 0.7^16 = 0.003 x lr, not one factor per stage."""
    layer_decay = spec.layer_decay
    depth = {None: -1, **{stage: k for k, stage in enumerate(models.RESNET_GROUPS)}}  # head 0, layer4 1, ..., stem 5
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        stage = models.stage_of(name) if layer_decay else None
        if layer_decay and stage is None:
            raise CompetitionError(f"layer_decay needs a model with ResNet stages (resnet18/resnet50): parameter "
                                   f"{name} belongs to none of {', '.join(models.RESNET_GROUPS)}")
        no_decay = spec.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias"))
        g = groups.setdefault((stage, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else spec.weight_decay})
        if layer_decay:
            g["lr_scale"], g["stage"] = float(layer_decay) ** depth[stage], stage
        g["params"].append(p)
    # timm's order (no-decay group first, then decayed), stage by stage from the head down: an
    # optimizer checkpoint written with timm's groups loads into these.
    return [g for (stage, no_decay), g in sorted(groups.items(), key=lambda kv: (depth[kv[0][0]], not kv[0][1]))]


def make_scheduler(optimizer, spec: ScheduleSpec, epochs: int):
    """timm scheduler on the epoch clock (t_in_epochs=False: stepped per update by the loop), for a
    run of `epochs` epochs.

    cosine: linear warmup, then cosine annealing to min_lr with warm restarts every
            cycle_epochs (x cycle_mul each time, peak x cycle_decay); one cycle if unset
    step:   multiply by step_gamma at each of step_milestones (epochs)
    const:  constant after warmup (the 'constant' arm of the schedule study)
    """
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

    warmup = spec.warmup_epochs
    common = dict(warmup_t=warmup, warmup_lr_init=spec.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if spec.sched == "cosine":
        cycle = spec.cycle_epochs or max(epochs - warmup, 1e-6)
        return CosineLRScheduler(optimizer, t_initial=cycle, lr_min=spec.min_lr, cycle_mul=spec.cycle_mul,
                                 cycle_decay=spec.cycle_decay, cycle_limit=10_000 if spec.cycle_epochs else 1, **common)
    if spec.sched in ("step", "const"):
        milestones = list(spec.step_milestones or []) if spec.sched == "step" else []
        # timm applies milestone m from t = m - 1 (its historical convention); +1 makes the LR drop at
        # epoch m, where batch_size_at grows the batch under the same milestones.
        return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in milestones], decay_rate=spec.step_gamma,
                                    **common)
    raise CompetitionError(f"sched must be cosine, step or const, not {spec.sched!r}")


def batch_size_at(spec: OptimSpec, epoch: int) -> int:
    """Global batch size (images per optimizer update, all processes together) at `epoch` under
    the batch-size schedule (Smith et al. 2018: multiply the batch by a factor where a step
    schedule would divide the learning rate)."""
    grow = sum(1 for m in spec.batch_size_milestones or [] if epoch >= m)
    return int(spec.batch_size * spec.batch_size_factor ** grow)
