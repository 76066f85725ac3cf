"""Threads on a shared 2-core machine: the demo's Part 1 training, epoch by epoch, under several
thread settings, with the cores idle or shared with one other job (the first-hour issue: with a
second job on the cores, torch's default thread count made the demo 5-35x slower).

    python bench/threads.py                 # as the machine is now (say whether another job runs)
    python bench/threads.py --compete       # with a competing 2-thread matrix-multiply job started here
    python bench/threads.py --epochs 4 --repeats 2

Each variant is a fresh process (`python -m competition.train --part 1 --preset demo`, digits,
no download) with its environment; the figure is the median epoch time of its metrics.csv (the
first epoch dropped: warm-up) and the process wall time. Variants run in turn, `--repeats` times,
interleaved, so a drift of the machine's speed hits all of them alike.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "default (torch: one thread per core)": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread + PASSIVE": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}
COMPETITOR = ("import torch; torch.set_num_threads(2); a = torch.randn(1024, 1024)\n"
              "while True: a = (a @ a).tanh()")


def one(env_extra: dict, epochs: int, work: Path, name: str) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "competition.train", "--part", "1", "--preset", "demo", f"epochs={epochs}",
                    f"models_dir={work / 'models'}", f"folds_dir={work / 'folds'}", f"name={name}", "progress=false"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    epoch = pd.read_csv(work / "models" / name / "metrics.csv")["epoch_time_s"].to_numpy()
    return float(np.median(epoch[1:] if len(epoch) > 1 else epoch)), wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compete", action="store_true", help="run a 2-thread matrix-multiply job beside each variant")
    args = p.parse_args(argv)
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if args.compete else None
    results = {v: [] for v in VARIANTS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for k, (name, env) in enumerate(VARIANTS.items()):
                    results[name].append(one(env, args.epochs, Path(tmp), f"v{k}-r{r}"))
    finally:
        if competitor is not None:
            competitor.kill()
    print(f"\ndemo Part 1, {args.epochs} epochs, {args.repeats} repeat(s), {os.cpu_count()} cores, "
          f"{'with a competing 2-thread job' if args.compete else 'as the machine was'}\n")
    print("| threads | median epoch s (each repeat) | process wall s (each repeat) |\n|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {', '.join(f'{e:.2f}' for e, _ in runs)} | {', '.join(f'{w:.1f}' for _, w in runs)} |")


if __name__ == "__main__":
    main()
