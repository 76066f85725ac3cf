"""Part 3's fine-tuning mechanics, measured on a small CPU run: what each ResNet-50 stage's
learning rate is, whether frozen stages' BatchNorm statistics move while they are frozen, and
where the schedule puts the learning rate (warmup end, restarts, the last update).

    python bench/finetune_mechanics.py                   # the part3 preset as shipped
    python bench/finetune_mechanics.py --preset part3 epochs=15 cycle_epochs=5

1. LR per stage: the optimizer's parameter groups (lr_scale x lr), stage by stage.
2. Drift: trains the part3 preset for 2 epochs on 512 digits images at 64 px from a saved
   random ResNet-50 state dict (the local-weights path real weights take), with unfreezing
   {0: [head], 1: [layer4]}, so stem..layer3 are frozen throughout; reports the largest change
   of any running_mean / running_var in each stage between the weights file and the run's last weights.
3. Schedule: walks the preset's scheduler over its whole run (390 updates per epoch, CIFAR's
   50,000 images at batch 128) and reports the LR of the update after warmup, the epochs where
   the LR jumps back up, and the LR the last update used, next to min_lr.
Uses only make_optimizer / make_scheduler (with a config dict, or its typed spec where the commit
has competition/specs.py) / train.main, so it runs on older commits too (the before/after table
of the issue "GPU-ready").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from competition import models, optim, train
from competition.config import resolve
from competition.runs import RunDir

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def stage_of(name: str) -> str:  # not models.stage_of: older commits, which this also measures, lack it
    top = name.split(".")[0]
    return {"conv1": "stem", "bn1": "stem", "fc": "head"}.get(top, top)


def make_optimizer(model, cfg: dict):
    """optim.make_optimizer on this commit: given the typed spec (competition/specs.py) where the
    commit has one, the config dict on older ones."""
    try:
        from competition.specs import train_spec
    except ImportError:
        return optim.make_optimizer(model, cfg)
    return optim.make_optimizer(model, train_spec(cfg).optim)


def make_scheduler(opt, cfg: dict):
    """optim.make_scheduler on this commit (spec and epochs, or the dict of older commits)."""
    try:
        from competition.specs import train_spec
    except ImportError:
        return optim.make_scheduler(opt, cfg)
    return optim.make_scheduler(opt, train_spec(cfg).schedule, cfg["epochs"])


def lr_per_stage(cfg: dict) -> dict:
    model = models.build_model("resnet50", 100)
    opt = make_optimizer(model, cfg)
    make_scheduler(opt, {**cfg, "warmup_epochs": 0})  # sets the groups' lr from lr_scale
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, set] = {s: set() for s in STAGES}
    for g in opt.param_groups:
        for p in g["params"]:
            out[stage_of(names[id(p)])].add(round(g.get("lr_scale", 1.0) * cfg["lr"], 6))
    return {s: sorted(v) for s, v in out.items()}


def frozen_drift(cfg_args: list[str], work: Path) -> dict:
    weights = models.save_random_resnet50(work / "random-resnet50.pth")
    run_dir = train.main(["--part", "3", "--preset", "demo", "epochs=2", "train_subset=512", "image_size=64",
                          "unfreeze={0: [head], 1: [layer4]}", "ood_check=0", "select_on=clean", "ema=null",
                          f"weights={weights}", f"models_dir={work / 'models'}", f"folds_dir={work / 'folds'}",
                          "name=mechanics", *cfg_args])
    before = torch.load(weights, map_location="cpu", weights_only=True)
    after = RunDir(run_dir).load_weights("last")["model"]  # last.safetensors (or a legacy last.pt)
    drift = {s: 0.0 for s in STAGES[:-1]}
    for k, v in after.items():
        if k.endswith(("running_mean", "running_var")) and k in before:
            s = stage_of(k)
            drift[s] = max(drift[s], float((v.float() - before[k].float()).abs().max()))
    return drift


def schedule_walk(cfg: dict, steps_per_epoch: int = 390) -> dict:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    sched = make_scheduler(opt, cfg)
    lrs = []
    for epoch in range(cfg["epochs"]):
        for i in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])  # the LR this update uses
            sched.step_update(epoch + (i + 1) / steps_per_epoch)
    lrs = np.array(lrs)
    up = np.flatnonzero(np.diff(lrs) > 1e-12)
    warm = int(round(float(cfg.get("warmup_epochs") or 0) * steps_per_epoch))
    restarts = sorted({round(float((j + 1) / steps_per_epoch), 2) for j in up if j + 1 > warm})
    return dict(peak_after_warmup=float(lrs[min(warm, len(lrs) - 1)]), restart_epochs=restarts,
                last_update_lr=float(lrs[-1]), min_lr=float(cfg.get("min_lr") or 0.0), epochs=cfg["epochs"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", default=None)
    p.add_argument("--skip-training", action="store_true", help="only the LR table and the schedule walk")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = resolve(3, args.preset, args.overrides, weights=None)
    print("## LR per stage (lr x lr_scale of every parameter group touching the stage)")
    for s, v in lr_per_stage(cfg).items():
        print(f"  {s:7s} {', '.join(f'{x:.3g}' for x in v)}" + (f"  ({len(v)} different)" if len(v) > 1 else ""))
    print("## schedule over the whole run")
    for k, v in schedule_walk(cfg).items():
        print(f"  {k}: {v}")
    if not args.skip_training:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as work:
            drift = frozen_drift(args.overrides, Path(work))
        print("## largest running-statistics change over 2 epochs (stem..layer3 frozen throughout)")
        for s, v in drift.items():
            print(f"  {s:7s} {v:.3g}")


if __name__ == "__main__":
    main()
