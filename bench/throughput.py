"""Training throughput (images/s) of each part's preset on this machine: one optimizer step
= flip/translate + to_input (resize, normalise) + forward + backward + step, on synthetic
uint8 32x32 batches, exactly the loop's device-side path (no data loading: it is a memory
index, see bench/data_load.py).

    python bench/throughput.py                                 # part1_cpu, part1, part2, part3
    python bench/throughput.py --preset part2 --steps 20 batch_size=512
    accelerate launch bench/throughput.py --preset part3       # (one process per GPU)

Measured (2-core AMD EPYC dev machine, torch 2.14 CPU, fp32, batch 256, nothing else running):
    part1_cpu model ([16,32,64,128], pool-first): ~1,850 img/s at 32 px, ~2,900 at 24 px
    simple_cnn [32,64,128,256]: 645 img/s; glibc malloc tuning off (--no-malloc-tuning): -25%
No GPU figures yet (no GPU was available when this was written).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from competition import augment, models, optim
from competition.config import load_config


def measure(cfg: dict, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(images/s, peak GPU GiB or nan) for `steps` training steps after `warmup`."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = {**cfg, "num_classes": 100, "pretrained": False, "weights": None}
    model = models.model_from_config(cfg).to(dev)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):
        model = torch.compile(model)
    opt = optim.make_optimizer(model, cfg)
    amp = dev.type == "cuda"
    bs = cfg["batch_size"]
    x8 = torch.randint(0, 256, (bs, 32, 32, 3), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 100, (bs,), device=dev)
    mean, std = [0.5] * 3, [0.25] * 3
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if amp:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = augment.to_input(augment.flip_translate(x8, cfg["flip"], cfg["translate"]), mean, std,
                             cfg["image_size"], cfg["channels_last"])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if amp:
        torch.cuda.synchronize()
    ips = bs * steps / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if amp else float("nan")
    return ips, mem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="preset(s); default: part1_cpu, part1, part2, part3")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 5 on CPU)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="CPU: keep glibc's default allocator settings")
    p.add_argument("overrides", nargs="*", help="key=value applied to every preset")
    args = p.parse_args(argv)
    steps = args.steps or (10 if torch.cuda.is_available() else 5)
    if not torch.cuda.is_available() and not args.no_malloc_tuning:
        from competition.train import keep_freed_memory
        keep_freed_memory()  # as train.py does on CPU
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {dev}, torch {torch.__version__}")
    print("| preset | model | image size | batch | images/s | peak GiB |\n|---|---|---|---|---|---|")
    for preset in args.preset or ["part1_cpu", "part1", "part2", "part3"]:
        cfg = load_config([preset], args.overrides)
        ips, mem = measure(cfg, steps)
        print(f"| {preset} | {cfg['model']} | {cfg['image_size']} | {cfg['batch_size']} | {ips:.0f} | {mem:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
