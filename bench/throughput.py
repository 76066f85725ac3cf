"""Training throughput (images/s) of each part's preset on this machine: one optimizer step
= flip/translate + to_input (resize, normalise) + forward + backward + step, on synthetic
uint8 batches (32x32, or at image_size when smaller: the loop shrinks images once), the
loop's device-side path (no data loading: it is a memory index, see bench/data_load.py).

    python bench/throughput.py                                 # part1_cpu, part1, part2, part3
    python bench/throughput.py --preset part2 --steps 20 batch_size=512
    accelerate launch bench/throughput.py --preset part3       # (one process per GPU)

Measured (2-core AMD EPYC dev machine, torch 2.14 CPU, fp32, batch 256, nothing else running;
this shared machine's speed drifts by up to ~25% from hour to hour):
    part1_cpu ([16,32,64,128] pool-first, 32 px, NHWC): 2,322 img/s; channels_last=false: 1,708
    part1 ([64,128,256] x2 convs, NCHW): 103 img/s (a GPU preset)
    earlier: glibc malloc tuning off (--no-malloc-tuning): -25%
  2026-12-03, the same kind of machine (Zen 4, AVX512-BF16), --steps 10:
    part1_cpu [16,32,64,128]: 5,334 img/s fp32, 7,300 with mixed_precision=bf16 (+37%)
    part1_cpu [16,32,64,256] (the preset since): 4,376 fp32, 5,892 bf16 (auto picks bf16 on this CPU)
No GPU figures yet (no GPU was available when this was written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from competition.config import load_config
from competition.runtime import keep_freed_memory
from competition.batch_size import step_throughput
from competition.specs import train_spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="preset(s); default: part1_cpu, part1, part2, part3")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 5 on CPU)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="CPU: keep glibc's default allocator settings")
    p.add_argument("overrides", nargs="*", help="key=value applied to every preset")
    args = p.parse_args(argv)
    steps = args.steps or (10 if torch.cuda.is_available() else 5)
    if not torch.cuda.is_available() and not args.no_malloc_tuning:
        keep_freed_memory()  # as train.py does on CPU
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {dev}, torch {torch.__version__}")
    print("| preset | model | image size | batch | images/s | peak GiB |\n|---|---|---|---|---|---|")
    for preset in args.preset or ["part1_cpu", "part1", "part2", "part3"]:
        cfg = load_config([preset], args.overrides)
        ips, mem = step_throughput(train_spec(cfg), steps)
        print(f"| {preset} | {cfg['model']} | {cfg['image_size']} | {cfg['batch_size']} | {ips:.0f} | {mem:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
