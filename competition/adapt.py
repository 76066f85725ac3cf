"""Test-time adaptation to an unlabelled slice of OOD images (one corruption file and severity).

    BN adaptation  re-estimate every batch-norm layer's statistics on the slice's own images
                   (Schneider et al. 2020, "Improving robustness against common corruptions by
                   covariate shift adaptation"); no gradient, one pass.
    learned        also learn the BN layers' scale and shift on the whole slice, for `steps`
                   passes with a cosine-decaying learning rate, minimising one of OBJECTIVES:
      tent         the mean prediction entropy (Wang et al., ICLR 2021; its offline variant,
                   several passes over the test set, beat the online one there);
      shot         information maximisation (SHOT-IM, Liang et al., ICML 2020): entropy of each
                   prediction minus the entropy of the slice's mean prediction, so the slice
                   cannot collapse onto a few classes;
      eata         entropy of the reliable predictions only, weighted by their confidence (EATA's
                   sample selection, Niu et al., ICML 2022: entropy below 0.4 ln C, weight
                   exp(E0 - H)); its Fisher anti-forgetting term is not needed here, every slice
                   starts from the source weights.
    which parameters learn (`params`, PARAMS): the BN affine ones (TENT's choice, the default),
                   those and the classifier (norm+head), or every one (all). TENT chose BN affine
                   for stability and cost; on these models which one pays is measured, not assumed.
    weight ensembling (`ensemble_alpha`, ROID's continual weight ensembling, Marsden et al., WACV
                   2024): after every update the learning parameters are pulled back toward the
                   source, params <- alpha * params + (1 - alpha) * source, bounding how far many
                   passes at a large learning rate can drift.

Every adaptation is temporary: `bn_source_stats` / `source_weights` put the source model back
when the slice is done (also on error), so one slice never leaks into the next: episodic.
Two label-free guards a learned slice answers to, each sending predict back to BN adaptation on
that slice: `collapsed`, its predictions spread over clearly fewer classes than BN adaptation's on
the same images; `drifted`, they disagree with BN adaptation's on more than a fraction of them.
These objectives are a few lines each on top of the loop below, which is why they are written
here rather than taken from a library (the reference implementations are research repositories,
not packages).
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn

# The guards' defaults live with predict's settings (specs, which must not import torch).
from competition.specs import COLLAPSE_TOL, MAX_DISAGREE


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@contextlib.contextmanager
def bn_source_stats(model: nn.Module):
    """Yield the model's batch-norm layers; on exit (also on error) put back their running
    statistics, momentum and mode exactly as they were."""
    bns = batchnorms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)
             for m in bns]
    try:
        yield bns
    finally:
        for m, (mean, var, n, momentum, training) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = momentum
            m.train(training)


@torch.no_grad()
def adapt_bn(model: nn.Module, batches, blend: float = 1.0, reduce=None) -> int:
    """Re-estimate every batch-norm layer's running statistics on `batches` (float input tensors,
    no labels) and leave the model in eval mode using them. Call inside bn_source_stats.

    The statistics are reset and momentum set to None, so they become the cumulative average
    over all the batches rather than an exponential average dominated by the last few. Only
    the BN layers run in train mode: dropout stays off, so the statistics are those the layers
    will see at prediction time. blend < 1 mixes in the source statistics: blend * adapted +
    (1 - blend) * source, a prior that helps when a slice holds few images. `reduce(tensor)`
    averages across processes (each saw only its shard). Returns the images seen."""
    bns = batchnorms(model)
    source = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    for x in batches:
        model(x)
        seen += len(x)
    for m, (mean, var) in zip(bns, source):
        if reduce is not None:
            m.running_mean.copy_(reduce(m.running_mean))
            m.running_var.copy_(reduce(m.running_var))
        if blend != 1.0:
            m.running_mean.mul_(blend).add_(mean, alpha=1 - blend)
            m.running_var.mul_(blend).add_(var, alpha=1 - blend)
    model.eval()
    return seen


def bn_affine(model: nn.Module) -> list[nn.Parameter]:
    """The scale and shift of every batch-norm layer: all TENT updates."""
    return [p for m in batchnorms(model) if m.affine for p in (m.weight, m.bias)]


@contextlib.contextmanager
def source_weights(model: nn.Module):
    """On exit (also on error), every parameter and buffer is back to its value on entry, and
    requires_grad and train/eval modes too: episodic adaptation never leaks into the next slice."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        yield model
    finally:
        model.load_state_dict(saved)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
            p.grad = None
        for n, m in model.named_modules():
            m.train(modes[n])


OBJECTIVES = ("tent", "shot", "eata")
# Every adaptation a prediction setting can carry (pred/<TTA>+<name>): the one list predict, ensemble,
# board and the pipeline accept.
ADAPTATIONS = ("bn", *OBJECTIVES)


def slice_loss(logits: torch.Tensor, objective: str) -> torch.Tensor:
    """The unsupervised loss of one batch of a slice (float32 logits), by objective."""
    logp = logits.log_softmax(1)
    p = logp.exp()
    entropy = -(p * logp).sum(1)
    if objective == "tent":
        return entropy.mean()
    if objective == "shot":
        mean = p.mean(0)
        return entropy.mean() + (mean * mean.clamp_min(1e-8).log()).sum()  # minus the diversity's entropy
    if objective == "eata":
        e0 = 0.4 * math.log(logits.shape[1])
        weight = (entropy < e0).float() * torch.exp(e0 - entropy.detach())
        return (weight * entropy).mean()
    raise ValueError(f"unknown objective {objective!r}: one of {', '.join(OBJECTIVES)}")


PARAMS = ("bn", "norm+head", "all")  # which parameters `learn` updates; bn: TENT's own choice


def classifier(model: nn.Module) -> nn.Module:
    """The model's final classifier layer: timm's get_classifier() where the model has one (and it
    holds weights), else the last nn.Linear registered (the head of this package's CNNs)."""
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("no classifier layer (no nn.Linear, no get_classifier)")
    return linears[-1]


def learnable(model: nn.Module, params: str = "bn") -> list[nn.Parameter]:
    """The parameters `learn` updates under `params` (one of PARAMS), each once."""
    if params == "bn":
        chosen = bn_affine(model)
    elif params == "norm+head":
        chosen = bn_affine(model) + list(classifier(model).parameters())
    elif params == "all":
        chosen = list(model.parameters())
    else:
        raise ValueError(f"unknown params {params!r}: one of {', '.join(PARAMS)}")
    return list({id(p): p for p in chosen}.values())  # a tied weight learns once


def variant(objective: str, params: str = "bn", ensemble_alpha: float | None = None) -> str:
    """The name of a learned adaptation in a prediction setting (pred/<TTA>+<variant>): the
    objective alone under the defaults, so folders written before these options keep their names;
    '-norm_head' / '-all' and '-ens<alpha>' otherwise ('+' would split the setting name)."""
    return (objective + (f"-{params.replace('+', '_')}" if params != "bn" else "")
            + (f"-ens{ensemble_alpha:g}" if ensemble_alpha is not None else ""))


def parse_variant(name: str) -> tuple[str, str, float | None]:
    """The inverse of `variant`, and the one reader of the names it writes: 'tent' -> ('tent',
    'bn', None), 'shot-norm_head-ens0.99' -> ('shot', 'norm+head', 0.99); 'bn' -> ('bn', 'bn',
    None). ValueError for any other name, including spellings of a real variant that predict
    never writes ('tent-ens0.990', 'tent-bn', 'bn-all'): those would name no folder."""
    # the alpha last and read to the end: '-ens1e-05' is what variant writes for 1e-5
    spelled = [p.replace("+", "_") for p in PARAMS if p != "bn"]
    parts = re.fullmatch(rf"([a-z]+)(?:-({'|'.join(map(re.escape, spelled))}))?(?:-ens(.+))?", name)
    adaptation, params, alpha = parts.groups() if parts else ("", None, None)
    params = (params or "bn").replace("_", "+")
    try:
        alpha = None if alpha is None else float(alpha)
    except ValueError:
        alpha = math.nan  # refused below, with every other malformed name
    if (adaptation not in ADAPTATIONS or (adaptation not in OBJECTIVES and (params != "bn" or alpha is not None))
            or (alpha is not None and not 0.0 <= alpha <= 1.0) or variant(adaptation, params, alpha) != name):
        raise ValueError(f"{name!r} is not an adaptation a prediction setting carries: bn, or "
                         f"{'|'.join(OBJECTIVES)} with -{'/-'.join(spelled)} "
                         f"and/or -ens<alpha in 0..1> (e.g. tent-all, shot-norm_head-ens0.99)")
    return adaptation, params, alpha


def learn(model: nn.Module, batches, objective: str = "tent", steps: int = 1, lr: float = 1e-3,
          params: str = "bn", ensemble_alpha: float | None = None) -> int:
    """Adapt one slice: BN layers normalise with the batch's own statistics, and the parameters
    `params` names (PARAMS: BN affine by default) learn, by minimising `objective` for `steps`
    passes over `batches` (a callable returning the slice's float input batches in a fixed order),
    Adam with the learning rate decaying on a cosine to 0 over all updates. ensemble_alpha (0..1,
    None: off): after every update the learning parameters become alpha * themselves + (1 - alpha)
    * their source values (ROID), so 1 is the same as off and 0 keeps the source exactly. Leaves
    the model in eval mode with running statistics re-estimated on the slice (adapt_bn), the way it
    then predicts. Call inside source_weights. Returns the updates made."""
    which, params = params, learnable(model, params)
    if not params:
        raise ValueError("no batch-norm affine parameters" if which == "bn" else f"no parameters to learn ({which})")
    if ensemble_alpha is not None and not 0.0 <= ensemble_alpha <= 1.0:
        raise ValueError(f"ensemble_alpha {ensemble_alpha}: must lie in 0..1")
    source = [p.detach().clone() for p in params] if ensemble_alpha is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    total = steps * sum(1 for _ in batches())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total))
                                              if steps > 1 else 1.0)  # one pass: TENT's constant lr
    model.eval()
    for m in batchnorms(model):
        m.train()  # batch statistics, as TENT normalises test batches
    updates = 0
    for _ in range(steps):
        for x in batches():
            with torch.enable_grad():
                loss = slice_loss(model(x).float(), objective)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if source is not None:
                with torch.no_grad():
                    for p, p0 in zip(params, source):
                        p.mul_(ensemble_alpha).add_(p0, alpha=1 - ensemble_alpha)
            updates += 1
    for p in params:
        p.requires_grad_(False)
    adapt_bn(model, batches())
    return updates


def tent(model: nn.Module, batches, steps: int = 1, lr: float = 1e-3) -> int:
    """TENT (Wang et al., ICLR 2021) on one slice: `learn` with the entropy objective."""
    return learn(model, batches, "tent", steps, lr)


def class_entropy(labels, num_classes: int) -> float:
    """Entropy (nats) of the predicted-class histogram of a slice (labels: a tensor or an array): ln C
    when spread evenly, 0 when every image gets one class."""
    counts = torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_classes).double()
    p = counts / counts.sum().clamp_min(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum())


def collapsed(adapted_labels, bn_labels, num_classes: int, tolerance: float = COLLAPSE_TOL) -> bool:
    """The collapse guard, label-free: a learned slice whose predicted classes are spread clearly
    less than BN adaptation's on the same images (class-histogram entropy lower by more than
    `tolerance` nats) has drifted toward a few classes; predict then keeps BN's logits there."""
    return class_entropy(adapted_labels, num_classes) < class_entropy(bn_labels, num_classes) - tolerance


def disagreement(adapted_labels, bn_labels) -> float:
    """The fraction of a slice's images whose predicted class differs from BN adaptation's."""
    a, b = torch.as_tensor(adapted_labels).flatten(), torch.as_tensor(bn_labels).flatten()
    if a.shape != b.shape:
        raise ValueError(f"{a.numel()} adapted labels against {b.numel()} BN ones")
    return float((a.long() != b.long()).double().mean()) if a.numel() else 0.0


def drifted(adapted_labels, bn_labels, max_disagree: float = MAX_DISAGREE) -> bool:
    """The drift guard, label-free: a learned slice whose predictions differ from BN adaptation's
    on the same images (the same view) on more than `max_disagree` of them has moved further than
    a method that helps moves; predict then keeps BN's logits there."""
    return disagreement(adapted_labels, bn_labels) > max_disagree
