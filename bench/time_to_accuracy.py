"""Time to accuracy on the CIFAR-10 stand-in: train a preset with one fold held out and report
when the held-out accuracy first reaches each target (training-loop seconds, epochs).

    python bench/time_to_accuracy.py --preset part1_cpu --target 0.8
    python bench/time_to_accuracy.py --part 2 --target 0.94 epochs=20      # on a GPU
    python bench/time_to_accuracy.py --part 2 --data /path/cifar10-jpg-train.tar.gz --fold 1

Defaults: dataset imagefolder on ../shared/data/cifar10-jpg-train.tar.gz (50,000 JPEGs, the
stand-in for CIFAR-100), fold 0 of folds/cifar10-jpg-train.csv held out (10,000 images), run
folder models/bench/<presets>-f<fold>. Every epoch evaluates the whole held-out fold.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd

from competition import train
from competition.config import resolve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", type=int)
    p.add_argument("--preset", action="append")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, action="append", help="held-out accuracy targets (repeatable)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    cfg = resolve(args.part, args.preset, ["dataset=imagefolder", f"data={args.data}", "val_subset=null",
                                           *args.overrides], fold=args.fold, seed=args.seed)
    cfg["name"] = f"bench/{cfg['preset']}-f{args.fold}-s{args.seed}"
    t0 = time.time()
    run_dir = train.train(cfg, force=True)
    wall = time.time() - t0
    m = pd.read_csv(run_dir / "metrics.csv")
    m["train_s"] = m["epoch_time_s"].cumsum()
    print(f"\n{cfg['preset']} on {Path(args.data).name}, fold {args.fold} held out; process wall time {wall:.1f} s "
          f"(incl. data load and final OOF pass)")
    print(m[["epoch", "val_acc", "train_s", "images_per_s"]].to_string(index=False))
    for target in args.target or [0.8]:
        hit = m[m["val_acc"] >= target]
        if len(hit):
            r = hit.iloc[0]
            print(f"time to {target:.0%}: {r['train_s']:.1f} s of training (epoch {int(r['epoch'])})")
        else:
            print(f"time to {target:.0%}: not reached (best {m['val_acc'].max():.4f})")


if __name__ == "__main__":
    main()
