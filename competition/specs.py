"""Typed specs: what each key of a training config is, grouped by the part of the run that reads
it (TrainSpec), and the settings of the later stages (PredictSpec, EnsembleSpec).

The config stays a plain dict where it is stored and compared (base.yaml <- presets <- overrides,
models/<run>/config.yaml, config.comparable). At a stage's entry `train_spec(cfg)` loads a
resolved one into these frozen dataclasses, and each part of the run takes its section:

    spec = train_spec(cfg)
    models.model_from_config(spec.model, num_classes)        # ModelSpec
    optim.make_optimizer(net, spec.optim)                    # OptimSpec
    optim.make_scheduler(opt, spec.schedule, spec.loop.epochs)
    augment.BatchAugment(spec.augment, ...)                  # AugmentSpec

The fields below are the one table of what each key accepts: the type of its annotation (`| None`:
null allowed) and the range or choices of its `knob(...)`; config.RULES and check_value, which
check presets and overrides at load, are derived from them. A wrong type or an unknown key fails
when a spec is made, naming the key. Defaults and the reason for each key are in
competition/configs/base.yaml, which a test keeps in step with these classes (every key in
exactly one section).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields

from competition.files import CompetitionError

OPTIMIZERS = ("sgd", "adamw", "adam", "radam")
# Upper bounds of the counts the loop iterates over before training starts (the per-epoch batch
# schedule, the scheduler): epochs=1000000000 was accepted and spent hours there before the first
# step. Far above any real run (the presets train 10-40 epochs).
MAX_EPOCHS = 10_000
SCHEDULES = ("cosine", "const", "step")


def knob(low=None, high=None, *, above=None, choices=None):
    """A spec field's allowed values: low <= value <= high (inclusive), value > above (only 0:
    strictly positive), one of choices (texts); for a list of whole numbers, low bounds each."""
    if above not in (None, 0):
        raise ValueError(f"knob(above={above}): only above=0 (strictly positive) has a rule")
    return field(metadata={"low": "gt0" if above == 0 else low, "high": high, "choices": choices})


class _Section:
    """A spec section: its values checked (and whole numbers given for a float made floats) when made."""

    @classmethod
    def from_config(cls, cfg: typing.Mapping):
        """This section's keys of a config dict (each copied: the spec never shares a list or
        mapping with the dict)."""
        missing = [f.name for f in fields(cls) if f.name not in cfg]
        if missing:
            raise CompetitionError(f"config lacks {', '.join(missing)}: a training config holds every key of "
                                   f"competition/configs/base.yaml (config.complete fills a saved older one)")
        return cls(**{f.name: copy.deepcopy(cfg[f.name]) for f in fields(cls)})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            check_value(f.name, value)
            if RULES[f.name][0] == "num" and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))


@dataclass(frozen=True)
class RunSpec(_Section):
    """Which run: its part and folder (runs.run_name reads these, with data.fold and loop.seed)."""
    part: int = knob(0, 3)
    name: str | None = knob()
    models_dir: str = knob()


@dataclass(frozen=True)
class DataSpec(_Section):
    """The images and rows a run trains and evaluates on, and how they are fed
    (train_data.TrainData, resolve_data_config)."""
    dataset: str = knob()
    data: str | None = knob()
    data_dir: str = knob()
    folds_dir: str = knob()
    fold: int = knob(-1)
    exclude_folds: list[int] | None = knob(0)
    train_subset: int | None = knob(1)
    val_subset: int | None = knob(1)
    eval_train: int | None = knob(0)
    ood_check: int = knob(0)
    pseudo: str | None = knob()
    image_size: int | None = knob(8, 512)
    train_sizes: dict | None = knob()
    norm: str = knob(choices=("data", "imagenet", "none"))
    workers: int = knob(0, 256)  # DataLoader processes: a typo's million would fork until the machine stalls


@dataclass(frozen=True)
class ModelSpec(_Section):
    """The network and its starting weights (models.model_from_config, learner)."""
    model: str = knob()
    model_args: dict | None = knob()
    pretrained: bool = knob()
    weights: str | None = knob()
    channels_last: bool = knob()
    compile: bool = knob()
    init_from: str | None = knob()


@dataclass(frozen=True)
class AugmentSpec(_Section):
    """Training-time augmentation: per-image CPU pipelines, batched device flips/shifts, noise/blur,
    erasing, AugMix, mixup/cutmix (augment.train_input, augment.BatchAugment)."""
    cpu_aug: str = knob()
    strong_aug_epoch: int | None = knob(0)
    flip: bool = knob()
    translate: int = knob(0, 16)
    mixup: float = knob(0)
    cutmix: float = knob(0)
    mix_prob: float = knob(0, 1)
    random_erasing: float = knob(0, 1)
    noise_blur: float = knob(0, 1)
    noise_std: float = knob(0, 1)
    blur_sigma: float = knob(0.3, 5)
    augmix: bool = knob()
    augmix_severity: int = knob(1, 10)
    jsd: float = knob(0)


@dataclass(frozen=True)
class OptimSpec(_Section):
    """The optimizer, the loss's label smoothing, the update's batch and its schedule
    (optim.make_optimizer, optim.batch_size_at, train_data.process_batch)."""
    optimizer: str = knob(choices=OPTIMIZERS)
    lr: float = knob(above=0)
    momentum: float = knob(0, 1)
    nesterov: bool = knob()
    weight_decay: float = knob(0)
    no_decay_norm_bias: bool = knob()
    layer_decay: float | None = knob(high=1, above=0)
    grad_clip: float | None = knob(above=0)
    grad_accum: int = knob(1)
    label_smoothing: float = knob(0, 0.999)
    batch_size: int = knob(1)
    batch_size_milestones: list[int] | None = knob(0)
    batch_size_factor: int = knob(1)


@dataclass(frozen=True)
class ScheduleSpec(_Section):
    """The learning-rate schedule on the epoch clock, and progressive unfreezing (optim.make_scheduler)."""
    sched: str = knob(choices=SCHEDULES)
    warmup_epochs: float = knob(0, MAX_EPOCHS)
    warmup_lr: float = knob(0)
    min_lr: float = knob(0)
    cycle_epochs: float | None = knob(above=0)
    cycle_mul: float = knob(above=0)
    cycle_decay: float = knob(above=0)
    step_milestones: list[int] | None = knob(0)
    step_gamma: float = knob(above=0)
    unfreeze: dict | None = knob()


@dataclass(frozen=True)
class LoopSpec(_Section):
    """How the loop runs, selects, stops and reports (train.py, runtime.training_accelerator)."""
    seed: int = knob(0, 2**32 - 1)  # numpy's seed range: a larger one failed in set_seed with a traceback
    epochs: int = knob(1, MAX_EPOCHS)
    stop_after: int | None = knob(1, MAX_EPOCHS)
    patience: int | None = knob(1, MAX_EPOCHS)
    ema: float | None = knob(high=0.999999, above=0)
    select_on: str = knob(choices=("clean", "ood"))
    oof_tta: str = knob()
    mixed_precision: str = knob(choices=("auto", "no", "bf16", "fp16"))
    log_with: str | None = knob(choices=("tensorboard", "wandb"))
    progress: bool = knob()


@dataclass(frozen=True)
class TrainSpec:
    """A training run's config, typed: one section per part of the run."""
    run: RunSpec
    data: DataSpec
    model: ModelSpec
    augment: AugmentSpec
    optim: OptimSpec
    schedule: ScheduleSpec
    loop: LoopSpec

    def replace(self, **keys) -> "TrainSpec":
        """This spec with some keys (named as in base.yaml) set to other values, each in its section."""
        changes: dict[str, dict] = {}
        for key, value in keys.items():
            if key not in SECTION_OF:
                raise unknown_keys_error([key], KEYS, "TrainSpec.replace")
            changes.setdefault(SECTION_OF[key], {})[key] = value
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **kv)
                                            for section, kv in changes.items()})


# The learned adaptations' fallbacks to BN (competition.adapt.collapsed / drifted), one home for
# their defaults. The collapse guard's 0.1 nats: a class histogram clearly narrower than BN's.
COLLAPSE_TOL = 0.1
# The drift guard's default, chosen on the choose images (repeat 2's pool, bench/NOTES.md "Round 2"),
# never on the measure: at 0.15 (the prior) a drift of -2 points on 94 of 95 slices passed (TENT on all
# parameters, lr 1e-4: 8% of labels changed, the class histogram intact, so the entropy guard never
# fired); at 0.05 every setting tried stayed within 0.2 of BN; 0.02 was no better there and would cap
# what a method may change below the few % a real gain needs.
MAX_DISAGREE = 0.05


@dataclass(frozen=True)
class PredictSpec:
    """What a run's predicted logits are (competition.predict): the TTA and how its views are
    averaged, the adapted settings written besides the plain one with their settings, and the
    batch size. Not a training key: a run's weights never depend on these. predict.predict_spec
    reads predict's command line into one; code makes one directly."""
    tta: str | None = None  # a preset (none, flip, shift1, shift2) or views; None: the run's oof_tta, else flip
    average: str = "logits"  # views averaged as logits | prob
    adapts: tuple[str, ...] = ()  # adapted OOD settings besides the plain one: bn, tent, shot, eata
    bn_blend: float = 1.0  # BN statistics = bn_blend * adapted + (1 - bn_blend) * source
    learn_steps: int = 1  # learned adaptation (tent, shot, eata): passes over each slice (1: TENT's own)
    learn_lr: float = 1e-3  # its Adam learning rate
    learn_batch: int = 128  # its images per update
    learn_params: str = "bn"  # which parameters learn: bn | norm+head | all (adapt.PARAMS)
    learn_ensemble: float | None = None  # ROID weight ensembling toward the source after each update; None: off
    collapse_tol: float | None = COLLAPSE_TOL  # its fallback to BN (class-histogram entropy, nats); None: never
    max_disagree: float | None = MAX_DISAGREE  # its fallback to BN (fraction of labels differing from BN's); None: never
    batch_size: int = 512  # images per batch per process

    def __post_init__(self):
        object.__setattr__(self, "adapts", tuple(self.adapts))
        if self.average not in ("logits", "prob"):
            raise CompetitionError(f"--average must be logits or prob, not {self.average!r}")
        if not 0.0 <= self.bn_blend <= 1.0:
            raise CompetitionError(f"--bn-blend {self.bn_blend}: must lie in 0..1 (1 = only the adapted statistics)")
        for flag, value in (("--tent-steps", self.learn_steps), ("--tent-batch", self.learn_batch),
                            ("--batch-size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompetitionError(f"{flag} {value!r}: must be a whole number >= 1")
        if not self.learn_lr > 0:
            raise CompetitionError(f"--tent-lr {self.learn_lr}: must be above 0")
        for flag, value in (("--learn-ensemble", self.learn_ensemble), ("--max-disagree", self.max_disagree)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise CompetitionError(f"{flag} {value}: must lie in 0..1")

    @property
    def learn_args(self) -> dict:
        """The learned adaptations' settings as predict.json records them ({objective}_{key})."""
        return {"steps": self.learn_steps, "lr": self.learn_lr, "batch": self.learn_batch, "guard": self.collapse_tol,
                "params": self.learn_params, "ensemble": self.learn_ensemble, "disagree": self.max_disagree}


@dataclass(frozen=True)
class EnsembleSpec:
    """How the members' logits are combined into a submission (competition.ensemble.build)."""
    method: str = "caruana"  # caruana (greedy selection with replacement) | equal
    rounds: int = 40  # caruana's selection rounds: weights are multiples of 1/rounds
    tta: str | None = None  # the TTA setting of the logits used; None: each run's own, as predict's
    adapt: str = "none"  # adapted OOD logits: none, bn, tent, shot, eata, or auto (per member, from its OOF)
    fit_on: str = "auto"  # weights fitted on clean or corrupted (ood) out-of-fold images; auto: ood where all have it
    # Predicted classes balanced per OOD file and severity (runs.balance_classes): for files whose every
    # severity holds each class equally, as the competition's do (CIFAR-100's test split, 100 per class).
    balance: bool = False
    # One prediction per picture from all its copies where the files' cells hold the same pictures in one
    # order (competition.copies finds them from the pixels; CIFAR-100-C's files do): the mean of their probabilities.
    copies: bool = False

    def __post_init__(self):
        for key, value, allowed in (("method", self.method, ("caruana", "equal")),
                                    ("fit-on", self.fit_on, ("auto", "clean", "ood"))):
            if value not in allowed:
                raise CompetitionError(f"--{key} must be one of {', '.join(allowed)}, not {value!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise CompetitionError(f"--rounds {self.rounds!r}: must be a whole number >= 1")
        for key in ("balance", "copies"):
            if not isinstance(getattr(self, key), bool):
                raise CompetitionError(f"{key} {getattr(self, key)!r}: must be true or false")


# Keys config.resolve adds to a config that are no knob of the run (the presets it was made from:
# part of the run folder's name).
DERIVED_KEYS = frozenset({"preset"})
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(TrainSpec)[f.name] for f in fields(TrainSpec)}
SECTION_OF = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
KEYS = frozenset(SECTION_OF)


def train_spec(cfg: typing.Mapping) -> TrainSpec:
    """The spec of a resolved training config (every key of base.yaml; `preset` is allowed and
    left out): an unknown key, a missing one or a value of the wrong type is one error naming it."""
    unknown = sorted(set(cfg) - KEYS - DERIVED_KEYS)
    if unknown:
        raise unknown_keys_error(unknown, KEYS, "config")
    return TrainSpec(**{name: cls.from_config(cfg) for name, cls in SECTIONS.items()})


def unknown_keys_error(unknown, valid, where: str) -> CompetitionError:
    """The error for keys no spec has, each with the closest valid key (a typo never trains)."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return CompetitionError(f"{where}: unknown config key(s) {', '.join(hints)}; every key is in "
                            f"competition/configs/base.yaml")


# ---------------------------------------------------------------------------- value checks

def _rule(name: str, hint, meta) -> tuple:
    """(kind, low, high, None allowed) of a field: kind int | num (int or float) | bool | str |
    ints (a list of ints >= low) | map; for str, `low` is the list of choices (None: any); low
    "gt0" means strictly above 0."""
    args = typing.get_args(hint)
    nullable = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if nullable else hint
    if base is bool:
        return ("bool",)
    kind = {int: "int", float: "num", str: "str", dict: "map"}.get(base)
    if kind is None and typing.get_origin(base) is list:
        kind = "ints"
    if kind is None:
        raise TypeError(f"spec field {name}: no rule for type {hint}")
    choices = list(meta["choices"]) if meta["choices"] else None
    return (kind, choices if kind == "str" else meta["low"], meta["high"], nullable)


# What each key accepts, from the fields above: {key: (kind, low, high, None allowed)}. Checked
# before a run writes or deletes anything, so a typo costs one message, never a run folder.
RULES: dict[str, tuple] = {f.name: _rule(f.name, typing.get_type_hints(cls)[f.name], f.metadata)
                           for cls in SECTIONS.values() for f in fields(cls)}


def bad_value(key: str, value, want: str) -> CompetitionError:
    return CompetitionError(f"config {key}={value!r}: {want} (set it in a preset or as {key}=VALUE; "
                            f"competition/configs/base.yaml documents every key)")


def check_value(key: str, value) -> None:
    """Raise a clear error unless `value` is what `key` accepts (RULES)."""
    rule = RULES.get(key)
    if rule is None:
        return
    kind, *rest = rule
    nullable = rest[2] if rest else False
    if value is None:
        if kind == "bool" or not nullable:
            raise bad_value(key, value, "a value is required")
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad_value(key, value, "must be true or false")
        return
    low, high = rest[0], rest[1]
    if kind in ("int", "num"):
        ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (kind == "num" and not math.isfinite(value)):
            # YAML reads 1e400 as inf: refused like lr=inf and nan
            raise bad_value(key, value, "must be a whole number" if kind == "int" else "must be a finite number")
        if (low == "gt0" and not value > 0) or (isinstance(low, (int, float)) and value < low) or \
                (high is not None and value > high):
            lo = "above 0" if low == "gt0" else f">= {low}" if low is not None else ""
            hi = f"<= {high}" if high is not None else ""
            raise bad_value(key, value, f"must be {' and '.join(x for x in (lo, hi) if x)}")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise bad_value(key, value, "must be a text")
        if low is not None and value not in low:
            raise bad_value(key, value, f"must be one of {', '.join(low)}")
    elif kind == "ints":
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
            raise bad_value(key, value, f"must be a list of whole numbers >= {low}, e.g. [10, 20]")
    elif kind == "map" and not isinstance(value, dict):
        raise bad_value(key, value, "must be a mapping, e.g. {key: value}")
