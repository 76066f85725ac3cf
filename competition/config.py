"""Configs as plain data: base.yaml <- presets (YAML files in configs/) <- `key=value` overrides.

A preset may name `extends: other_preset`. Unknown keys are errors, so a typo never
silently trains with a default.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from competition.files import CompetitionError

CONFIG_DIR = Path(__file__).parent / "configs"


def read_yaml(path) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            out = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise CompetitionError(f"config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise CompetitionError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(out, dict):
        raise CompetitionError(f"{path}: expected a mapping of config keys")
    return out


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = CONFIG_DIR / f"{name}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml") if q.stem != "base")
        raise CompetitionError(f"no preset {name!r}; presets: {', '.join(names)} (or a path to a .yaml)")
    return p


def load_preset(name: str, _seen=()) -> dict:
    if name in _seen:
        raise CompetitionError(f"preset {name} extends itself through {' -> '.join(_seen)}")
    cfg = read_yaml(preset_path(name))
    parent = cfg.pop("extends", None)
    if parent:
        cfg = merge(load_preset(parent, _seen + (name,)), cfg)
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
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def load_config(presets: list[str] = (), overrides: list[str] = ()) -> dict:
    base = read_yaml(CONFIG_DIR / "base.yaml")
    cfg = dict(base)
    for name in presets:
        if name:
            cfg = merge(cfg, load_preset(name))
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CompetitionError(f"override {text!r}: {k} is not a mapping")
        node[keys[-1]] = value
    unknown = sorted(set(cfg) - set(base) - {"num_classes", "classes", "mean", "std", "preset", "run_dir"})
    if unknown:
        raise CompetitionError(f"unknown config keys {unknown}; see competition/configs/base.yaml for every key")
    return cfg


def save_config(cfg: dict, path) -> None:
    from competition.files import save_text
    save_text(path, yaml.safe_dump(cfg, sort_keys=False))
