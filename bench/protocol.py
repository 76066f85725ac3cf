"""The honest protocol's setup, shared by the benches that measure under it (bench/test_time.py,
bench/robustness.py): one folds file with a measure reserve, the measuring suite built from that
reserve, and the overrides that put a member on those folds.

Roles (README, "An honest local score"): fold 0 is held out by every member, its corrupted copies
are the *choose* images; fold 1 is excluded from training (it plays the competition's unlabelled
OOD files in bench/test_time.py, and stays out in the other benches so that a variant with no
overrides is the same run); folds 2..k-1 *train*; the reserve of --measure-n images, corrupted
19 x 5, is the *measure*. Another --folds-seed draws other images in every role: an independent
repeat.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_args(p: argparse.ArgumentParser, out: str) -> None:
    """The protocol's command-line arguments, one spelling for every bench."""
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg-train.tar.gz"))
    p.add_argument("--preset", default="part1_cpu")
    p.add_argument("--measure-n", type=int, default=2000, help="the measure reserve, corrupted 19 x 5: images no "
                   "member trains on and no choice sees, the same ones under every corruption and severity (as in "
                   "CIFAR-C), so every figure carries their sampling noise: +-1.6 points (one s.e., measured at "
                   "78%%) with 500, +-0.8 with 2,000")
    p.add_argument("--k", type=int, default=10, help="folds besides the reserve (0: choose, 1: excluded from training)")
    p.add_argument("--folds-seed", type=int, default=0, help="seed of the split: another seed draws other images "
                   "in every role (an independent repeat)")
    p.add_argument("--tta", default="shift1")
    p.add_argument("--out", default=str(ROOT / "models" / out))


@dataclass(frozen=True)
class Protocol:
    out: Path
    data: str
    k: int
    measure_n: int

    @property
    def folds_dir(self) -> Path:
        return self.out / "folds"

    @property
    def measure(self) -> Path:
        return self.out / f"measure-n{self.measure_n}"

    @property
    def models_dir(self) -> Path:
        return self.out / "models"

    def member(self) -> list[str]:
        """train.py overrides that put a member on the protocol's folds (fold 0 held out: pass --fold 0)."""
        return ["dataset=imagefolder", f"data={self.data}", "exclude_folds=[1]", f"folds_dir={self.folds_dir}",
                f"models_dir={self.models_dir}"]


def prepare(args: argparse.Namespace) -> Protocol:
    """Write the folds file (with its measure reserve) and the measuring suite; both are reused
    when already there with the same settings (folds refuses a changed split)."""
    from competition import folds, score
    from competition.config import resolve

    proto = Protocol(Path(args.out), args.data, args.k, args.measure_n)
    proto.out.mkdir(parents=True, exist_ok=True)
    folds.main(["--dataset", "imagefolder", "--data", args.data, "--k", str(args.k), "--seed", str(args.folds_seed),
                "--folds-dir", str(proto.folds_dir), "--measure-n", str(args.measure_n)])
    data_dir = resolve(None, [args.preset], proto.member(), fold=0)["data_dir"]
    score.build_suite(proto.measure, "imagefolder", args.data, data_dir, str(proto.folds_dir), args.measure_n)
    return proto
