"""Ablation studies: one shared setting, one thing changed per variant, a report per study.

    python -m competition.ablate lr                         # the reports' setting (configs/ablation.yaml)
    python -m competition.ablate weight_decay --budget --dataset imagefolder --data cifar10-jpg-train.tar.gz
    python -m competition.ablate mixup --budget epochs=3    # key=value overrides every variant shares
    python -m competition.ablate my_grid.yaml               # your own grid (format below)
    python -m competition.ablate batchnorm --variant ghost  # only some variants (repeatable)
    python -m competition.ablate --list                     # the studies and their variants

Studies (each variant's overrides are shown by --list):
    lr                   lr 0.01 | 0.05 | 0.2 | 0.5
    schedule             constant | cosine annealing to 0 over the run
    weight_decay         0 | 1e-4 | 5e-4
    mixup                none | mixup alpha 0.2 (one-hot labels, interpolated)
    activation           relu | sigmoid
    optimizer            SGD | Adam with linear warmup | RAdam
    batch_size_schedule  decay the LR by 1/f at 50% and 75% of the epochs (sched=step) | multiply the
                         batch size by f there instead (sched=const): same epochs, fewer updates
    batchnorm            plain | ghost BN | no weight decay on BN scale/shift | inference example weighting
    architecture         mobilenet_v1 | mobilenet_v2

A grid file:  base: {key: value, ...}             # overrides shared by every variant (optional)
              variants: {name: {key: value, ...}, ...}

Every variant is trained by competition.train.train() from configs/ablation.yaml (--budget:
configs/ablation_budget.yaml, sized for 2 CPU cores) <- grid base <- command-line key=value <-
the variant's own overrides; nested mappings such as model_args merge key by key. Runs land in
models/ablations/<study>/<variant>/ with their metrics.csv and curves.png; a finished variant with
the same config is skipped (--force retrains), and a variant identical to one already trained
in another study (e.g. the baseline shared by several studies) is copied from it. Then
models/ablations/<study>/report.md (table) and curves.png (all variants overlaid) are written
and the table printed.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from competition.config import apply_overrides, check_keys, comparable, load_config, merge, read_yaml, save_config
from competition.files import CompetitionError, cli, save_text
from competition.runs import RunDir

# ---------------------------------------------------------------------------- the studies


def _milestones(epochs: int) -> list[int]:
    """Epochs at which the step study changes the LR or the batch: 50% and 75% of the run."""
    return sorted({max(1, round(epochs * f)) for f in (0.5, 0.75)})


def _lr(cfg):
    return {f"lr{v:g}": {"lr": v} for v in (0.01, 0.05, 0.2, 0.5)}


def _schedule(cfg):
    return {"constant": {"sched": "const", "warmup_epochs": 0.0},
            "cosine": {"sched": "cosine", "min_lr": 0.0, "warmup_epochs": 0.0, "cycle_epochs": None}}


def _weight_decay(cfg):
    return {"wd0": {"weight_decay": 0.0}, "wd1e-4": {"weight_decay": 1e-4}, "wd5e-4": {"weight_decay": 5e-4}}


def _mixup(cfg):
    # label_smoothing 0: timm's Mixup then interpolates plain one-hot labels, as the report did.
    return {"none": {"mixup": 0.0, "cutmix": 0.0},
            "mixup0.2": {"mixup": 0.2, "cutmix": 0.0, "mix_prob": 1.0, "label_smoothing": 0.0}}


def _activation(cfg):
    return {a: {"model_args": {"activation": a}} for a in ("relu", "sigmoid")}


def _optimizer(cfg):
    # Adam needs warmup because its early second-moment estimates are noisy; RAdam rectifies the
    # variance instead (Liu et al. 2020), so it runs without. 5% of the run, at least one epoch
    # (or a quarter of very short runs).
    warmup = round(max(0.05 * cfg["epochs"], min(1.0, cfg["epochs"] / 4)), 3)
    return {"sgd": {"optimizer": "sgd"},
            "adam_warmup": {"optimizer": "adam", "lr": 1e-3, "warmup_epochs": warmup},
            "radam": {"optimizer": "radam", "lr": 1e-3, "warmup_epochs": 0.0}}


BATCH_FACTOR = 5  # Smith et al. 2018 grew the batch 5x where the step schedule divided the LR by 5


def _batch_size_schedule(cfg):
    m = _milestones(cfg["epochs"])
    return {"decay_lr": {"sched": "step", "step_milestones": m, "step_gamma": 1 / BATCH_FACTOR,
                         "batch_size_milestones": [], "batch_size_factor": 1, "warmup_epochs": 0.0},
            "grow_batch": {"sched": "const", "step_milestones": [], "batch_size_milestones": m,
                           "batch_size_factor": BATCH_FACTOR, "warmup_epochs": 0.0}}


def _batchnorm(cfg):
    bs = cfg["batch_size"]
    ghost = (cfg.get("model_args") or {}).get("ghost_batch_size") or 32
    ghost = ghost if ghost < bs else max(2, bs // 4)  # a ghost batch as big as the batch is plain BN
    return {"plain": {"model_args": {"bn": "batchnorm"}, "no_decay_norm_bias": False},
            "ghost": {"model_args": {"bn": "ghost", "ghost_batch_size": ghost}, "no_decay_norm_bias": False},
            "no_decay_bn": {"model_args": {"bn": "batchnorm"}, "no_decay_norm_bias": True},
            # alpha = 1/B: at inference the image counts as much as it did in its training batch
            "iew": {"model_args": {"bn": "iew", "iew_weight": round(1 / bs, 6)}, "no_decay_norm_bias": False}}


def _architecture(cfg):
    return {"mobilenet_v1": {"model": "mobilenet_v1"}, "mobilenet_v2": {"model": "mobilenet_v2"}}


STUDIES = {"lr": _lr, "schedule": _schedule, "weight_decay": _weight_decay, "mixup": _mixup,
           "activation": _activation, "optimizer": _optimizer, "batch_size_schedule": _batch_size_schedule,
           "batchnorm": _batchnorm, "architecture": _architecture}


def read_grid(path) -> tuple[str, dict, dict]:
    """(study name = file stem, base overrides, {variant: overrides}) from a grid YAML."""
    path = Path(path)
    grid = read_yaml(path)
    extra = set(grid) - {"base", "variants"}
    if extra or not isinstance(grid.get("variants"), dict) or not grid["variants"]:
        raise CompetitionError(f"{path}: a grid is `base: {{key: value}}` (optional) and `variants: {{name: "
                               f"{{key: value}}}}` (at least one){'; unknown keys ' + str(sorted(extra)) if extra else ''}")
    variants = {str(k): v or {} for k, v in grid["variants"].items()}
    bad = [k for k, v in variants.items() if not isinstance(v, dict) or "/" in k]
    if bad or not isinstance(grid.get("base") or {}, dict):
        raise CompetitionError(f"{path}: every variant must be a mapping of overrides with a plain name ({bad})")
    return path.stem, grid.get("base") or {}, variants


def plan(study: str, budget: bool = False, overrides: list[str] = (), preset: str | None = None) -> tuple[str, dict]:
    """The study's name and {variant: full config} (nothing trained). `study` is a name of
    STUDIES or a grid YAML path; configs are ablation(.budget) <- grid base <- overrides <- variant."""
    base_preset = preset or ("ablation_budget" if budget else "ablation")
    shared = load_config([base_preset], overrides)
    if study in STUDIES:
        name, variants = study, STUDIES[study](shared)
    elif Path(study).suffix in (".yaml", ".yml"):
        name, grid_base, variants = read_grid(study)
        shared = check_keys(apply_overrides(check_keys(merge(load_config([base_preset]), grid_base),
                                                       f"{study} base"), overrides), "command line")
    else:
        raise CompetitionError(f"unknown study {study!r}; studies: {', '.join(STUDIES)} (or a grid .yaml path)")
    out = {}
    for variant, over in variants.items():
        cfg = check_keys(merge(copy.deepcopy(shared), copy.deepcopy(over)), f"{name}/{variant}")
        cfg["name"] = f"ablations/{name}/{variant}"
        cfg["preset"] = base_preset
        out[variant] = cfg
    return name, out


def variant_overrides(study: str, cfg: dict | None = None) -> dict:
    """{variant: overrides} of a built-in study for a config (default: the full ablation setting)."""
    return STUDIES[study](cfg or load_config(["ablation"]))


# ---------------------------------------------------------------------------- running


def _same(a: dict, b: dict) -> bool:
    """The same training run, wherever it lives (the name is the study's folder)."""
    return comparable({**a, "name": None}) == comparable({**b, "name": None})


def _reuse(cfg: dict, run: RunDir) -> Path | None:
    """Copy an identical finished run of another study into run_dir (hard links: no extra disk),
    so the baseline several studies share is trained once. Returns the source, if any."""
    if run.path.exists():
        return None
    for other in sorted((Path(cfg["models_dir"]) / "ablations").glob(f"*/*/{RunDir.CONFIG}")):
        src = RunDir(other.parent)
        if src == run or not src.weights("last").exists():
            continue
        old = src.config()
        if _same(old, cfg):
            def link(s, d):
                try:
                    os.link(s, d)
                except OSError:
                    shutil.copy2(s, d)
            shutil.copytree(src.path, run.path, copy_function=link)
            (run / RunDir.CONFIG).unlink()  # a hard link: rewriting it in place would change the source's too
            save_config({**old, "name": cfg["name"]}, run / RunDir.CONFIG)
            return src.path
    return None


def run_study(study: str, budget: bool = False, overrides: list[str] = (), variants: list[str] | None = None,
              force: bool = False, preset: str | None = None, echo: bool = True) -> Path:
    """Train every variant (or those named) and write the report; returns report.md's path."""
    from competition import train as T

    name, configs = plan(study, budget, overrides, preset)
    if variants:
        missing = sorted(set(variants) - set(configs))
        if missing:
            raise CompetitionError(f"study {name} has no variant {missing}; it has {', '.join(configs)}")
        configs = {k: v for k, v in configs.items() if k in variants}
    for variant, cfg in configs.items():
        src = None if force else _reuse(cfg, RunDir.for_config(cfg))
        if src is not None:
            print(f"{name}/{variant}: identical to {src}; copied, not retrained")
        T.train(copy.deepcopy(cfg), force=force)
    return write_report(name, configs, Path(next(iter(configs.values()))["models_dir"]) / "ablations" / name,
                        echo=echo)


# ---------------------------------------------------------------------------- report


def summarize(frame: pd.DataFrame) -> dict:
    """One table row from a metrics.csv frame. "train" is the clean eval-mode accuracy on training
    images (train_eval_*) when the run measured it, else the running training loss/accuracy."""
    clean = "train_eval_acc" in frame and frame["train_eval_acc"].notna().any()
    tl, ta = ("train_eval_loss", "train_eval_acc") if clean else ("train_loss", "train_acc")
    last = frame.iloc[-1]
    # the last epoch with the best accuracy: train.py keeps the later epoch of a tie as best.pt
    best = int(frame.index[frame["val_acc"] == frame["val_acc"].max()][-1]) if frame["val_acc"].notna().any() \
        else len(frame) - 1
    return {"train loss": last[tl], "train acc": last[ta], "val loss": last["val_loss"], "val acc": last["val_acc"],
            "best train loss": frame[tl].min(), "best train acc": frame[ta].max(),
            "best val loss": frame["val_loss"].min(), "best val acc": frame["val_acc"].max(),
            "gap (train-val acc)": last[ta] - last["val_acc"], "epochs to best": int(frame["epoch"].iloc[best]),
            "epochs": int(last["epoch"]), "updates": int(last["updates"]),
            "wall s": float(frame["epoch_time_s"].sum())}


def markdown_table(table: pd.DataFrame) -> str:
    def fmt(col, v):
        if isinstance(v, (float, np.floating)):
            return "nan" if math.isnan(v) else f"{v:.1f}" if col == "wall s" else f"{v:.4f}"
        return str(v)

    cols = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * len(table.columns)]
    for idx, *values in table.itertuples():  # itertuples keeps each column's dtype (ints stay ints)
        lines.append("| " + " | ".join([str(idx)] + [fmt(c, v) for c, v in zip(table.columns, values)]) + " |")
    return "\n".join(lines)


def write_report(study: str, configs: dict, out_dir: Path, echo: bool = True) -> Path:
    from competition.plots import plot_overlay

    frames, rows = {}, {}
    for variant, cfg in configs.items():
        path = RunDir.for_config(cfg).metrics_csv
        if not path.exists():
            raise CompetitionError(f"{path} is missing: variant {variant} has not been trained")
        frames[variant] = pd.read_csv(path)
        rows[variant] = summarize(frames[variant])
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "variant"
    any_cfg = next(iter(configs.values()))
    clean = all("train_eval_acc" in f for f in frames.values())
    cols = ["train_loss", "train_eval_loss", "val_loss", "train_acc", "train_eval_acc", "val_acc", "lr"]
    png = plot_overlay(frames, out_dir / "curves.png", title=f"ablation: {study}", columns=cols)
    changed = "\n".join(f"- **{v}**: {_describe(configs[v], any_cfg, configs)}" for v in configs)
    data = any_cfg.get("data") or any_cfg["dataset"]
    text = (f"# Ablation: {study}\n\n"
            f"Shared setting: preset `{any_cfg.get('preset')}`, {any_cfg['model']} {any_cfg['model_args']}, "
            f"data `{data}` fold {any_cfg['fold']} held out (train subset {any_cfg['train_subset']}, val subset "
            f"{any_cfg['val_subset']}), {any_cfg['epochs']} epochs, batch {any_cfg['batch_size']}, "
            f"{any_cfg['optimizer']} lr {any_cfg['lr']} momentum {any_cfg['momentum']}, weight decay "
            f"{any_cfg['weight_decay']}, {any_cfg['sched']} schedule, seed {any_cfg['seed']} (unless a variant below says otherwise).\n\n"
            f"Variants (what differs from the others):\n{changed}\n\n"
            f"\"train\" columns are {'clean eval-mode accuracy/loss on ' + str(any_cfg['eval_train']) + ' training images (train_eval_*)' if clean else 'the running training loss/accuracy (with augmentation)'}; "
            f"\"best\" is the best epoch of each column; the gap is final train acc - final val acc; wall s is the "
            f"sum of epoch times (training + evaluation); updates are optimizer steps.\n\n"
            f"{markdown_table(table)}\n\n![curves]({png.name})\n")
    report = out_dir / "report.md"
    save_text(report, text)
    if echo:
        print(f"\n{report}\n\n{markdown_table(table)}\n")
    return report


def _describe(cfg: dict, _ref: dict, configs: dict) -> str:
    """The keys (flattened) whose value differs between variants, with this variant's values."""
    flat = {v: _flatten(c) for v, c in configs.items()}
    keys = sorted({k for f in flat.values() for k in f if k != "name" and len({str(g.get(k)) for g in flat.values()}) > 1})
    mine = _flatten(cfg)
    return ", ".join(f"`{k}={mine.get(k)}`" for k in keys) or "(same as the others)"


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and k != "unfreeze":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m competition.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", nargs="?", help=f"{' | '.join(STUDIES)} | path/to/grid.yaml")
    p.add_argument("--budget", action="store_true", help="configs/ablation_budget.yaml: CPU-sized runs")
    p.add_argument("--preset", help="base preset instead of ablation / ablation_budget")
    p.add_argument("--dataset", help="digits | cifar100 | imagefolder")
    p.add_argument("--data", help="imagefolder: folder or .tar.gz")
    p.add_argument("--variant", action="append", help="train and report only this variant (repeatable)")
    p.add_argument("--force", action="store_true", help="delete and retrain the variants' run folders")
    p.add_argument("--list", action="store_true", help="print the studies' variants and their overrides, then exit")
    p.add_argument("overrides", nargs="*", help="config key=value shared by every variant")
    args = p.parse_intermixed_args(argv)  # flags may come after the key=value overrides
    overrides = list(args.overrides)
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    if args.data:
        overrides.append(f"data={args.data}")
    if args.list or not args.study:
        cfg = load_config([args.preset or ("ablation_budget" if args.budget else "ablation")], overrides)
        for study, fn in STUDIES.items():
            print(study)
            for variant, over in fn(cfg).items():
                print(f"    {variant:14s} {over}")
        return None
    return run_study(args.study, args.budget, overrides, args.variant, args.force, args.preset)


if __name__ == "__main__":
    cli(main)()
