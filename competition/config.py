"""Configs as plain data: base.yaml <- presets (YAML files in configs/) <- `key=value` overrides.

A preset may name `extends: other_preset`. Unknown keys are errors, so a typo never
silently trains with a default.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from competition.files import CompetitionError, save_text

CONFIG_DIR = Path(__file__).parent / "configs"


class _Loader(yaml.SafeLoader):
    """safe_load, except that 1e-3 is a float: YAML 1.1 wants a dot (1.0e-3) and reads `lr=1e-3`
    as the string '1e-3', which would only fail (or not) deep inside the optimizer."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            out = yaml.load(f, Loader=_Loader) or {}
    except FileNotFoundError:
        raise CompetitionError(f"config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise CompetitionError(f"{path} is not valid YAML: {e}") from None
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


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "unfreeze" else v
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise CompetitionError(f"override {text!r} must look like key=value (e.g. lr=0.05)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.load(value, Loader=_Loader) if value.strip() else None


def base_config() -> dict:
    """configs/base.yaml: every key, with its default."""
    return read_yaml(CONFIG_DIR / "base.yaml")


def check_keys(cfg: dict, where: str = "config") -> dict:
    """`cfg` unchanged, or an error naming keys base.yaml does not have (a typo never trains)."""
    unknown = sorted(set(cfg) - set(base_config()) - {"preset"})
    if unknown:
        raise CompetitionError(f"{where}: unknown config keys {unknown}; see competition/configs/base.yaml for "
                               f"every key")
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
    return check_keys(apply_overrides(cfg, overrides))


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


# Keys that do not change what a run learns: a finished run with other values of these is
# still the same run (no retraining, no refusal).
NOT_COMPARED = frozenset({"progress", "log_with", "workers", "stop_after"})


def comparable(cfg: dict) -> dict:
    """What decides whether two configs train the same run. Keys added to base.yaml after a run
    was made count as their default, so a new knob does not invalidate every finished run."""
    full = {**base_config(), **cfg}
    return {k: v for k, v in full.items() if k not in NOT_COMPARED}


def save_config(cfg: dict, path) -> None:
    """A config (or any plain mapping) as YAML, keys in their order, written atomically."""
    save_text(path, yaml.safe_dump(cfg, sort_keys=False))
