"""Configs as plain data: base.yaml <- presets (YAML files in configs/) <- `key=value` overrides.

A preset may name `extends: other_preset`. Unknown keys and values of the wrong type are errors
at load, so a typo never silently trains with a default. The dict stays the stored form (a run
folder's config.yaml, what `comparable` compares); competition/specs.py types it for the stages.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from competition import specs
from competition.files import CompetitionError, check_name, save_text
# What each key accepts (RULES: {key: (kind, low, high, None allowed)}) comes from the typed fields
# of competition/specs.py, the one table of types; check_value raises the clear error.
from competition.specs import RULES, bad_value, check_value  # noqa: F401 (config.RULES: re-exported)

CONFIG_DIR = Path(__file__).parent / "configs"


class AliasRefused(yaml.YAMLError):
    """A YAML alias in a config (see _Loader): its name and line."""

    def __init__(self, anchor: str, line: int):
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line

    def why(self) -> str:
        return (f"uses the YAML alias *{self.anchor}; configs take no aliases (a file someone sent could expand one "
                f"into billions of values): write the value out instead")


class _Loader(yaml.SafeLoader):
    """safe_load, with two YAML 1.2 readings of YAML 1.1 values: 1e-3 is a float (1.1 wants a dot,
    1.0e-3, and reads `lr=1e-3` as the string '1e-3', which would only fail deep inside the
    optimizer), and only true/false are booleans (1.1 also reads yes/no/on/off, so the documented
    `mixed_precision=no` arrived as False and was refused).

    Aliases (`*name`) are refused: a config is a few dozen keys that never need one, and nine
    nested lists of nine aliases each ("billion laughs") load in microseconds as shared objects,
    then expand to 9**9 values the first time anything prints or copies them (MemoryError).
    Anchors (`&name`) alone expand nothing and pass."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {  # the add above gave the class its own copy of the table
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(path) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            out = yaml.load(f, Loader=_Loader) or {}
    except FileNotFoundError:
        raise CompetitionError(f"config {path} does not exist") from None
    except AliasRefused as e:
        raise CompetitionError(f"{path}: line {e.line} {e.why()}") from None
    except yaml.YAMLError as e:
        raise CompetitionError(f"{path} is not valid YAML: {e}") from None
    except RecursionError:  # PyYAML composes nested [ or { recursively: thousands of them (a sent file) end here
        raise CompetitionError(f"{path} nests lists or mappings too deeply to read (not a config this code wrote): "
                               f"restore the file, or write it again") from None
    if not isinstance(out, dict):
        raise CompetitionError(f"{path}: expected a mapping of config keys")
    return out


def preset_path(name: str, near: Path | None = None) -> Path:
    """A preset by name (configs/<name>.yaml) or a .yaml path; a relative path in `extends:` is
    looked up next to the preset that names it first, then from the working directory."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        for q in ([near / p] if near is not None and not p.is_absolute() else []) + [p]:
            if q.exists():
                return q
    p = CONFIG_DIR / f"{name}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml") if q.stem != "base")
        raise CompetitionError(f"no preset {name!r}; presets: {', '.join(names)} (or a path to a .yaml)")
    return p


def load_preset(name: str, _seen=(), _near: Path | None = None) -> dict:
    path = preset_path(name, _near).resolve()
    if path in _seen:
        raise CompetitionError(f"preset {name} extends itself through {' -> '.join(p.stem for p in _seen)}")
    cfg = read_yaml(path)
    parent = cfg.pop("extends", None)
    if parent:
        cfg = merge(load_preset(str(parent), _seen + (path,), path.parent), cfg)
    return cfg


# Epoch schedules ({epoch: value}): a preset or override replaces one whole, never merges epoch by epoch.
SCHEDULES = ("unfreeze", "train_sizes")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in SCHEDULES else v
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise CompetitionError(f"override {text!r} must look like key=value (e.g. lr=0.05)")
    key, value = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise CompetitionError(f"override {text!r}: no key before '=' (it must look like key=value, e.g. lr=0.05)")
    try:
        return key.strip().split("."), yaml.load(value, Loader=_Loader) if value.strip() else None
    except AliasRefused as e:
        raise CompetitionError(f"override {key.strip()}=...: the value {e.why()}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise CompetitionError(f"override {text!r}: the value is not valid YAML ({first}); quote it, or close its "
                               f"brackets (e.g. model_args.widths=[8,16,32])") from None


def base_config() -> dict:
    """configs/base.yaml: every key, with its default."""
    return read_yaml(CONFIG_DIR / "base.yaml")


# Settings of a later stage that once lived in the training config: a training config holds only
# what changes the trained weights, and says where these belong instead of ignoring them.
PREDICTION_KEYS = {"bn_adapt": "python -m competition.predict RUN --adapt bn (run.sh --tta-adapt bn)"}


def check_keys(cfg: dict, where: str = "config") -> dict:
    """`cfg` unchanged, or an error naming keys base.yaml does not have, each with the closest
    valid key (a typo never trains), or a prediction setting with the stage it belongs to."""
    valid = set(base_config()) | specs.DERIVED_KEYS
    misplaced = sorted(set(cfg) & set(PREDICTION_KEYS))
    if misplaced:
        raise CompetitionError(f"{where}: {', '.join(misplaced)} is a prediction setting, not a training one: "
                               f"drop it and use {'; '.join(PREDICTION_KEYS[k] for k in misplaced)}")
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise specs.unknown_keys_error(unknown, valid, where)
    return cfg


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`key=value` / `a.b=value` texts applied to a copy of cfg (values parsed as YAML)."""
    cfg = dict(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {}) if isinstance(node.get(k, {}), dict) else node.get(k)
            node = node[k]
            if not isinstance(node, dict):
                raise CompetitionError(f"override {text!r}: {k} is not a mapping")
        node[keys[-1]] = value
    return cfg


def load_config(presets: list[str] = (), overrides: list[str] = ()) -> dict:
    """base.yaml <- each preset (its `by_part` table applied for the config's part) <- overrides."""
    cfg, by_part = base_config(), []
    for name in presets:
        if name:
            preset = load_preset(name)
            # `by_part: {2: {...}}` in a generic preset (demo.yaml) applies only to that part, so
            # one preset can shrink every part in its own way.
            by_part.append(preset.pop("by_part", None) or {})
            cfg = merge(cfg, preset)
    for table in by_part:
        part_cfg = table.get(cfg.get("part")) or table.get(str(cfg.get("part"))) or {}
        cfg = merge(cfg, part_cfg)
    cfg = check_keys(apply_overrides(cfg, overrides))
    for key, value in cfg.items():  # a mistyped value fails here, at load, naming its key
        check_value(key, value)
    return cfg


def resolve(part: int | None = None, presets: list[str] | None = None, overrides: list[str] = (),
            **fields) -> dict:
    """The config of a training run: part<N>.yaml and the presets in order, the overrides, then
    the command line's own flags (`fields` not None: fold, seed, name, weights). `preset` names
    the run: "part1 + part1_cpu" -> part1_cpu, "part3 + demo" -> part3-demo."""
    names = ([f"part{part}"] if part is not None else []) + list(presets or [])
    names = names or ["part1"]
    cfg = load_config(names, overrides)
    cfg.update({k: v for k, v in fields.items() if v is not None})
    if part is not None:
        cfg["part"] = part
    kept = [p for i, p in enumerate(names) if not any(q.startswith(p) for q in names[i + 1:])]
    cfg["preset"] = "-".join(Path(p).stem for p in kept)
    return cfg


# ---------------------------------------------------------------------------- value checks


def validate(cfg: dict) -> dict:
    """`cfg` unchanged when every key holds an acceptable value, else one clear error."""
    check_keys(cfg)
    for key, value in cfg.items():
        check_value(key, value)
    if cfg.get("name") is not None:
        check_name(cfg["name"], "config name (the run folder under models_dir)", nested=True)
    for epoch, size in (cfg.get("train_sizes") or {}).items():
        if not str(epoch).isdigit() or isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 512:
            raise bad_value("train_sizes", cfg["train_sizes"], "must map epochs (whole numbers >= 0) to image sizes "
                                                               "8..512, e.g. {0: 24, 6: 32}")
    if cfg.get("select_on") == "ood" and not cfg.get("ood_check"):
        raise bad_value("select_on", "ood", "needs ood_check > 0 (the corrupted held-out images it selects on)")
    if cfg.get("pseudo") and (cfg.get("mixup") or cfg.get("cutmix") or cfg.get("jsd")):
        raise bad_value("pseudo", cfg["pseudo"], "takes its own soft targets: set mixup=0 cutmix=0 jsd=0")
    if cfg.get("jsd") and not cfg.get("augmix"):
        raise bad_value("jsd", cfg["jsd"], "needs augmix=true (the consistency is between AugMix views)")
    if cfg.get("jsd") and (cfg.get("mixup") or cfg.get("cutmix")):
        raise bad_value("jsd", cfg["jsd"], "cannot be combined with mixup/cutmix (soft targets); set mixup=0 cutmix=0")
    if (cfg.get("mixup") or cfg.get("cutmix")) and cfg["batch_size"] % 2:
        raise bad_value("batch_size", cfg["batch_size"], "must be even with mixup/cutmix (timm pairs each image "
                                                          "with its mirror in the batch)")
    return cfg


# Keys that do not change what a run learns: a finished run with other values of these is
# still the same run (no retraining, no refusal). The three folders are where things are, not
# what they hold: a models/ folder copied to another machine or path keeps its runs.
NOT_COMPARED = frozenset({"progress", "log_with", "workers", "stop_after", "data_dir", "folds_dir", "models_dir"})


def complete(cfg: dict) -> dict:
    """A copy of cfg with base.yaml's default for every key it lacks: a config saved before the
    key existed, as specs.train_spec (which takes every key) needs it."""
    return {**base_config(), **cfg}


def comparable(cfg: dict) -> dict:
    """What decides whether two configs train the same run. Keys added to base.yaml after a run
    was made count as their default, so a new knob does not invalidate every finished run."""
    full = complete(cfg)
    # PREDICTION_KEYS: runs saved when those keys were training keys still compare equal.
    return {k: v for k, v in full.items() if k not in NOT_COMPARED and k not in PREDICTION_KEYS}


class _Dumper(yaml.SafeDumper):
    """safe_dump, writing a value two keys share out twice: it would write an alias (*id001),
    which _Loader refuses."""

    def ignore_aliases(self, data):
        return True


def save_config(cfg: dict, path) -> None:
    """A config (or any plain mapping) as YAML, keys in their order, written atomically."""
    save_text(path, yaml.dump(cfg, Dumper=_Dumper, sort_keys=False))
