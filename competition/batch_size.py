"""How many images per step: training throughput per batch size on this device, and the
finder that picks the fastest (`python -m competition.train --part 3 --find-batch-size`).

    python bench/throughput.py ...   # images/s per setting, side by side (uses step_throughput)
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from competition import models, optim, runtime
from competition.augment import train_input
from competition.specs import TrainSpec


def step_throughput(spec: TrainSpec, steps: int = 5, warmup: int = 2) -> tuple[float, float]:
    """(images/s, peak GPU GiB or nan) of `steps` full training steps after `warmup`: flip/translate,
    to_input (resize, normalise), forward, backward, optimizer step, on synthetic uint8 batches
    (32x32, or already at image_size when that is smaller) of the spec's batch_size: the loop's
    device-side path without data loading (a memory index).
    Used by the batch-size finder and bench/throughput.py."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.model_from_config(spec.replace(pretrained=False, weights=None).model, 100).to(dev)
    if spec.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = optim.make_optimizer(model, spec.optim)  # before compile: the groups go by the bare module's names
    if spec.model.compile:
        model = torch.compile(model)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.mixed_precision(spec.loop.mixed_precision))
    bs, image_size = spec.optim.batch_size, spec.data.image_size
    # The loop trains on images shrunk once when its size is below the stored 32 px (TrainData.images_at).
    side = min(32, image_size or 32)
    x8 = torch.randint(0, 256, (bs, side, side, 3), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 100, (bs,), device=dev)
    prep = {"mean": [0.5] * 3, "std": [0.25] * 3, "channels_last": spec.model.channels_last}
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            runtime.sync()
            t0 = time.perf_counter()
        x = train_input(x8, spec.augment, prep, image_size or side)
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = nn.functional.cross_entropy(model(x), y.repeat(len(x) // len(y)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    runtime.sync()
    ips = bs * steps / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return ips, mem


def find_batch_size(spec: TrainSpec, start: int = 16, limit: int = 4096, steps: int = 5, repeats: int = 3) -> int:
    """Time training steps at doubling batch sizes until memory runs out or images/s stops
    improving; print the table and return the fastest size (the public starter's finder only
    looked for the largest size that fits, which is rarely the fastest). Each size is the median
    of `repeats` timings of `steps` steps, so one slow step (a page fault, another job) does not
    pick the size; peak memory is printed only on a GPU, where it is measured."""
    if not torch.cuda.is_available():
        runtime.keep_freed_memory()
    bs, best = start, (0.0, start)
    while bs <= limit:
        try:
            timings = [step_throughput(spec.replace(batch_size=bs), steps=steps, warmup=1) for _ in range(repeats)]
        except torch.OutOfMemoryError:
            print(f"batch {bs}: out of memory")
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        ips = float(np.median([t[0] for t in timings]))
        mem = f", peak {max(t[1] for t in timings):.1f} GiB" if torch.cuda.is_available() else ""
        print(f"batch {bs:5d}: {ips:9.1f} images/s (median of {repeats} x {steps} steps){mem}")
        if ips > best[0]:
            best = (ips, bs)
        elif ips < 0.9 * best[0]:
            break
        bs *= 2
    print(f"fastest: {best[1]} images per device ({best[0]:.0f} images/s at image_size {spec.data.image_size}); "
          f"pass batch_size={best[1]} (batch_size is global: x processes x grad_accum on several GPUs)")
    return best[1]

