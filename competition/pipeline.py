"""The whole pipeline: folds -> train -> local suite -> predict -> ensemble -> self-training ->
score -> submission CSV. `./run.sh` is this module; every stage stays runnable alone, and this
one only decides which stage runs with which arguments.

    python -m competition.pipeline                      # offline demo on CPU (minutes): embedded digits,
                                                        # parts 1-2, --preset demo (Part 3: --parts 1,2,3 --weights FILE)
    python -m competition.pipeline --dataset cifar100   # the competition: downloads CIFAR-100 and the 19 OOD
                                                        # files when online; parts 1-3 with their full presets
    python -m competition.pipeline --dataset imagefolder --data PATH/cifar10-train.tar.gz \\
        --ood-dir DIR --parts 1,2 --folds 2 --preset demo
    python -m competition.pipeline --dataset imagefolder --data PATH --parts 1,2 --preset cpu   # part1_cpu + part2_cpu
    python -m competition.pipeline --dry-run ...        # print the stage commands, run nothing

Paths are relative to the folder you call it from; the stages run in the project's root (where
models/, data/, folds/ and submissions/ live). Everything the stages print goes to stderr; the
last line, and the only one on stdout, is the absolute path of the submission CSV, so
`csv=$(./run.sh ...)` works from anywhere. Run folders are named by the package itself
(config.resolve + runs.run_name), exactly as `competition.train` names them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from competition import folds, models
from competition.adapt import ADAPTATIONS
from competition.config import CONFIG_DIR, resolve
from competition.files import NAME_RULE, CompetitionError, cli, read_json
from competition.runs import RunDir
from competition.specs import train_spec

ROOT = Path(__file__).resolve().parent.parent
ADAPTS = ("none", *ADAPTATIONS, "auto")
# Per data set: (preset, local-suite images per cell, TTA, measure reserve). digits runs the demo
# preset and no mirror (digits are not mirror-symmetric); cifar100 reserves 5,000 training images
# to measure on (its test split is the leaderboard's); digits and cifar10 measure on their own
# test splits, which no leaderboard uses.
DEFAULTS = {"digits": ("demo", 40, "shift", "0"), "cifar10": ("", 1000, "shift1", "0"),
            "cifar100": ("", 1000, "shift1", "5000"), "imagefolder": ("", 1000, "shift1", "0.1")}


@dataclass
class Plan:
    """What the pipeline does, decided before any stage runs (every refusal comes first)."""
    dataset: str
    data: str
    dsname: str
    parts: list[int]
    folds: int
    k: int
    preset: str
    weights: str
    n: int
    tta: str
    adapt: str
    measure_n: str
    ood_dir: str
    selftrain: int
    name: str
    run_prefix: str
    retrain: bool
    overwrite: bool
    threads: int = 0
    overrides: list[str] = field(default_factory=list)
    balance: bool = False
    copies: bool = False

    @property
    def suite(self) -> str:
        """The local suite's folder: images of the test split, or of the measure reserve
        (-m<size>-n<N>); never a suite of other images. '' when there is no honest one: CIFAR-100
        without a reserve (the final submission), whose test split is the leaderboard's."""
        if self.dataset == "cifar100" and self.measure_n == "0":
            return ""
        tag = "" if self.measure_n == "0" else f"-m{self.measure_n}"
        return f"data/ood-local/{self.dsname}{tag}-n{self.n}{'-bal' if self.balance else ''}"

    def run_dir(self, part: int, fold: int) -> Path:
        """The folder `competition.train` makes for this part and fold (the package names it)."""
        name = f"{self.run_prefix}-part{part}-f{fold}-s0" if self.run_prefix else None
        cfg = resolve(part, self.presets(part), self.train_overrides(part), fold=fold, seed=0, name=name)
        return RunDir.for_config(cfg).path

    def presets(self, part: int) -> list[str]:
        """The preset added after part<N>: `part<N>_<preset>` when that exists (`--preset cpu`: part1_cpu,
        part2_cpu), else the preset itself (`--preset demo`: every part)."""
        if not self.preset:
            return []
        own = f"part{part}_{self.preset}"
        return [own] if (CONFIG_DIR / f"{own}.yaml").exists() else [self.preset]

    def train_overrides(self, part: int) -> list[str]:
        out = [f"dataset={self.dataset}"] + ([f"data={self.data}"] if self.data else []) + self.overrides
        weights = self.part3_weights()
        return out + ([f"weights={weights}"] if part == 3 and weights else [])

    def part3_weights(self) -> str:
        """--weights, or for the offline digits demo a randomly initialised ResNet-50 saved locally."""
        return self.weights or ("models/random-resnet50.pth" if self.dataset == "digits" else "")

    def submission(self) -> str:
        """A finished submission is never overwritten: --retrain (new weights) writes NAME-2,
        NAME-3, ... unless --overwrite."""
        sub, i = self.name, 2
        while self.retrain and not self.overwrite and (ROOT / "submissions" / f"{sub}.csv").exists():
            sub, i = f"{self.name}-{i}", i + 1
        return sub


def parse(argv=None) -> tuple[Plan, bool]:
    """(the plan, --dry-run) from the command line."""
    p = argparse.ArgumentParser(prog="python -m competition.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=tuple(DEFAULTS), help="[digits]")
    p.add_argument("--data", default="", help="the image folder or tarball (--dataset imagefolder)")
    p.add_argument("--ood-dir", default="", help="the OOD files the submission is for [cifar100: data/ood-test; "
                   "else the local suite]")
    p.add_argument("--parts", default="", help="comma list of 1,2,3 [digits: 1,2; else 1,2,3]")
    p.add_argument("--folds", type=int, default=1, help="train folds 0..FOLDS-1 [1]")
    p.add_argument("--k", type=int, default=5, help="split size [5]")
    p.add_argument("--preset", default=None, help="added after part<N>: part<N>_PRESET where that exists (cpu: part1_cpu, part2_cpu), else PRESET for "
                   "every part [digits: demo; else none]")
    p.add_argument("--weights", default="", help="Part 3 ImageNet ResNet-50 weights file (offline machines)")
    p.add_argument("--measure-n", default=None, help="training images reserved to measure the local estimate on "
                   "(folds --measure-n; N or a share below 1) [cifar100 5000, imagefolder 0.1; digits, cifar10: 0, "
                   "their test split measures]. 0 for the final submission: no local estimate then")
    p.add_argument("--n", type=int, default=None, help="local suite images per corruption and severity "
                   "[digits 40, else 1000]")
    p.add_argument("--tta", default=None, help="predict's TTA [digits: shift (no mirror); else shift1]")
    p.add_argument("--tta-adapt", default="auto", help="test-time adaptation per OOD file and severity: "
                   "none|bn|tent|shot|eata|auto [auto: BN and TENT are predicted, and each member keeps "
                   "whichever is best on its corrupted out-of-fold images; bn: cheap (one extra pass); tent, shot "
                   "(entropy + diversity), eata (reliable predictions only): ~2-3x bn's, see competition/adapt.py]")
    p.add_argument("--bn-adapt", action="store_const", const="bn", dest="tta_adapt", help="= --tta-adapt bn")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="balance the predicted classes within each OOD file and severity (ensemble --balance), "
                   "and build the local suite balanced (score suite --balanced) [cifar100: on, its files hold each "
                   "class equally (100 per class per severity); else off]")
    p.add_argument("--copies", action=argparse.BooleanOptionalAction, default=None,
                   help="predict each picture once from all its copies across the OOD files (ensemble --copies: "
                   "where the files' cells hold the same pictures in one order, read from the images) [cifar100: "
                   "on, its files are the test split's 10,000 pictures under every corruption and severity; else off]")
    p.add_argument("--selftrain", type=int, default=0, help="rounds of pseudo-label self-training on the OOD "
                   "files (needs --ood-dir) [0]")
    p.add_argument("--name", default="", help="submission name, and the prefix of its run folders "
                   "(NAME-part<P>-f<F>-s0) [submission <dataset>-<preset>-p<parts>[-bal|-nobal][-cp|-nocp]; runs <preset>-<dataset>-f<F>-s0]")
    p.add_argument("--retrain", action="store_true", help="retrain finished runs (train --force); the submission "
                   "gets a new name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission of the same name")
    p.add_argument("--threads", type=int, default=0, help="compute threads of every stage; the figures repeat "
                   "exactly for the same count (it is part of the rounding) [OMP_NUM_THREADS if set, else the cores "
                   "free when the pipeline starts]")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands, run nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every training run "
                   "(e.g. epochs=2 batch_size=64)")
    args = p.parse_intermixed_args(argv)
    return plan_from(args), args.dry_run


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def plan_from(args) -> Plan:
    bad = lambda msg: CompetitionError(f"pipeline: {msg}")  # noqa: E731
    for o in args.overrides:
        if "=" not in o:
            raise bad(f"unknown argument {o} (see --help)")
        if o.startswith("name="):
            raise bad("use --name NAME (run folders get NAME-part<P>-f<F>-s0)")
    preset, n, tta, measure = DEFAULTS[args.dataset]
    if args.dataset == "imagefolder" and not args.data:
        raise bad("--dataset imagefolder needs --data PATH")
    data = _absolute(args.data)
    dsname = folds.dataset_name(args.dataset, data or None)
    # The demo leaves Part 3 out: an ImageNet ResNet-50 needs weights from the network, and one from
    # random weights scores at chance while costing most of the demo's time (--parts 1,2,3 adds it).
    parts = args.parts or ("1,2" if args.dataset == "digits" else "1,2,3")
    if not re.fullmatch(r"[123](,[123])*", parts):
        raise bad("--parts must look like 1,2,3")
    if args.tta_adapt not in ADAPTS:
        raise bad(f"--tta-adapt must be {', '.join(ADAPTS[:-1])} or auto")
    if args.selftrain < 0:
        raise bad("--selftrain takes a number of rounds")
    ood_dir = _absolute(args.ood_dir) or ("data/ood-test" if args.dataset == "cifar100" else "")
    if args.selftrain and not ood_dir:
        raise bad("--selftrain needs --ood-dir (the unlabelled test files to pseudo-label; the local suite measures)")
    if not 1 <= args.folds <= args.k:
        raise bad(f"--folds must be 1..{args.k}")
    if args.threads < 0:
        raise bad("--threads takes a positive count (0: decide from the free cores)")
    preset = preset if args.preset is None else args.preset
    # balanced, and one prediction per picture's copies, where the dataset's files are known to allow it (the
    # competition's); the name says a change from that
    known = args.dataset == "cifar100"
    balance = known if args.balance is None else args.balance
    copies = known if args.copies is None else args.copies
    flip = ("" if balance == known else "-bal" if balance else "-nobal") + \
        ("" if copies == known else "-cp" if copies else "-nocp")
    name = args.name or f"{dsname}-{preset or 'full'}-p{parts.replace(',', '')}{flip}"
    if not NAME_RULE.fullmatch(name) or name in (".", ".."):  # files.check_name's rule
        raise bad(f"--name '{name}' must be letters, digits and . _ + - (it names files)")
    plan = Plan(dataset=args.dataset, data=data, dsname=dsname, parts=[int(x) for x in parts.split(",")],
                folds=args.folds, k=args.k, preset=preset, weights=_absolute(args.weights),
                n=args.n if args.n is not None else n, tta=args.tta or tta, adapt=args.tta_adapt,
                measure_n=args.measure_n if args.measure_n is not None else measure, ood_dir=ood_dir,
                selftrain=args.selftrain, name=name, run_prefix=args.name, retrain=args.retrain,
                overwrite=args.overwrite, threads=args.threads, overrides=list(args.overrides), balance=balance,
                copies=copies)
    refuse_early(plan)
    return plan


def refuse_early(plan: Plan) -> None:
    """What a later stage would refuse, said when the plan is made rather than after an hour of training:
    self-training on the images the local estimate is measured on (selftrain refuses the measure), and
    a submission of this name already made for other OOD files (ensemble refuses to replace it)."""
    bad = lambda msg: CompetitionError(f"pipeline: {msg}")  # noqa: E731
    target = ROOT / plan.ood_dir if plan.ood_dir else None
    measured = target is not None and (
        bool(plan.suite) and target.resolve() == (ROOT / plan.suite).resolve()
        or (read_json(target / "suite.json", {}, kind=dict) or {}).get("split") == "measure")
    if plan.selftrain and measured:
        raise bad(f"--selftrain would pseudo-label {plan.ood_dir}: the local estimate is measured on those images "
                  f"(the local suite, or one of the measure reserve). Pseudo-label the competition's files, or a "
                  f"pool of other images (python -m competition.score suite --out POOL --fold F ... with F a fold "
                  f"no run holds out) as --ood-dir")
    sub = ROOT / "submissions" / plan.name
    made = (read_json(Path(f"{sub}.json"), {}, kind=dict) or {}) if Path(f"{sub}.csv").is_file() else {}
    goal = ROOT / (plan.ood_dir or plan.suite) if plan.ood_dir or plan.suite else None
    if made.get("ood_dir") and goal and not plan.overwrite and (ROOT / made["ood_dir"]).resolve() != goal.resolve():
        raise bad(f"submissions/{plan.name}.json is a submission for {made['ood_dir']}, and this one would be for "
                  f"{goal}: pass --overwrite to replace it, or --name for another (--name also names the runs, "
                  f"which are then trained anew)")


def steps(plan: Plan) -> tuple[list[tuple[str, list[str]]], str]:
    """((title, argv after `python -m`) of every stage in order, the submission's name)."""
    out = []
    data = ["--data", plan.data] if plan.data else []
    out.append((f"folds: {plan.dsname}, k={plan.k}, measure reserve {plan.measure_n}",
                ["competition.folds", "--dataset", plan.dataset, *data, "--k", str(plan.k), "--measure-n",
                 plan.measure_n, *(["--force"] if plan.retrain else [])]))  # a new split: every run is retrained
    if 3 in plan.parts and not plan.weights and plan.dataset == "digits":
        weights = plan.part3_weights()
        if not (ROOT / weights).is_file():
            out.append((f"Part 3 starts from {weights}, a RANDOMLY INITIALISED ResNet-50 saved locally so the demo "
                        f"runs offline; it is NOT ImageNet-pretrained (pass --weights PATH for real weights)",
                        ["competition.models", "--random-resnet50", weights]))
    runs = []
    for part in plan.parts:
        for fold in range(plan.folds):
            run = plan.run_dir(part, fold)
            runs.append(str(run))
            name = [f"name={plan.run_prefix}-part{part}-f{fold}-s0"] if plan.run_prefix else []
            # train itself skips a finished run with the same config (and refuses a changed one).
            out.append((f"train part {part} fold {fold} -> {run}",
                        ["competition.train", "--part", str(part), *(f"--preset={p}" for p in plan.presets(part)),
                         "--fold", str(fold), *(["--force"] if plan.retrain else []), *plan.train_overrides(part),
                         *name]))
    suite = plan.suite
    if suite:
        out.append((f"local OOD suite: {suite} ({plan.n} images x 19 corruptions x 5 severities)",
                    ["competition.score", "suite", "--out", suite, "--dataset", plan.dataset, *data, "--n",
                     str(plan.n), *(["--balanced"] if plan.balance else [])]))
    target = plan.ood_dir or suite
    ood = (["--ood-dir", suite] if suite else []) + (["--ood-dir", plan.ood_dir] if plan.ood_dir else [])
    ood += ["--download"] if plan.ood_dir and plan.dataset == "cifar100" else []
    adapt = {"none": [], "auto": ["--adapt", "bn,tent"]}.get(plan.adapt, ["--adapt", plan.adapt])
    out.append((f"predict {len(runs)} run(s) with TTA {plan.tta} (adapted predictions: {' '.join(adapt) or 'none'}): "
                f"clean test, out-of-fold, OOD", ["competition.predict", *runs, *ood, "--tta", plan.tta, *adapt]))
    if suite:  # no TTA on the suite too, for the table of what each stage adds (cheap: one view)
        out.append(("predict the suite without TTA", ["competition.predict", *runs, "--ood-dir", suite, "--tta",
                                                      "none", "--no-test", "--no-oof"]))
    sub = plan.submission()
    out.append((f"ensemble -> submissions/{sub}.csv (weights and adaptation chosen on out-of-fold images; "
                f"adaptation: {plan.adapt})",
                ["competition.ensemble", *runs, "--name", sub, "--ood-dir", target, "--tta", plan.tta, "--adapt",
                 plan.adapt, *(["--balance"] if plan.balance else []), *(["--copies"] if plan.copies else []),
                 *(["--overwrite"] if plan.overwrite else [])]))
    if plan.selftrain:  # --models-dir: the folder the runs above lie in (models_dir=... may move it)
        first = plan.parts[0]
        models_dir = resolve(first, plan.presets(first), plan.train_overrides(first))["models_dir"]
        out.append((f"self-training: {plan.selftrain} round(s) on the pseudo-labelled {target}",
                    ["competition.selftrain", f"submissions/{sub}.json", "--rounds", str(plan.selftrain),
                     "--models-dir", str(models_dir),
                     *(["--suite", suite] if suite else []), *(["--force"] if plan.overwrite else [])]))
        sub = f"{sub}-st{plan.selftrain}"
    if suite:
        out.append((f"local score on {suite}", ["competition.score", *runs, "--ood-dir", suite, "--tta", plan.tta]))
        for a in adapt[1].split(",") if adapt else []:  # the adapted predictions too: the board's adapted column
            out.append((f"local score, {a}", ["competition.score", *runs, "--ood-dir", suite, "--tta", plan.tta,
                                              "--adapt", a]))
        out.append(("score the submission", ["competition.score", f"submissions/{sub}.json", "--ood-dir", suite]))
        out.append(("the stages' table", ["competition.board", "--stages", f"submissions/{sub}.json", "--suite",
                                          suite]))
    return out, sub


def stage_env(threads: int) -> dict[str, str]:
    """Every stage computes on one thread count, decided once: each stage deciding for itself from
    the cores free at its own start (competition/__init__.py) gave one run a mix of counts, and the
    count changes the floating-point rounding, so the demo's table differed on a busy machine."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # other jobs may hold cores: waiting threads sleep
    elif "OMP_NUM_THREADS" not in env:  # set by the user, or by the package when cores were busy at start
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else os.cpu_count() or 1)
    return env


def main(argv=None) -> int:
    plan, dry_run = parse(argv)
    todo, sub = steps(plan)
    csv = ROOT / "submissions" / f"{sub}.csv"
    if dry_run:
        for title, cmd in todo:
            print(f"# {title}\npython -m {' '.join(cmd)}", file=sys.stderr)
        print(csv)
        return 0
    if 3 in plan.parts:  # offline without weights: say so now, not after Parts 1-2 have trained
        models.check_weights_source(train_spec(resolve(3, plan.presets(3), plan.train_overrides(3))).model)
    t0 = time.time()
    env = stage_env(plan.threads)
    print(f"every stage computes on {env['OMP_NUM_THREADS']} thread(s); the figures repeat exactly for the same "
          f"count and precision (--threads N)", file=sys.stderr)
    if plan.dataset == "cifar100" and not plan.suite:
        print("no measure reserve (--measure-n 0): no local estimate this time; the choices are made on "
              "out-of-fold images", file=sys.stderr)
    if not plan.ood_dir:
        print(f"no --ood-dir: the submission is made for the local suite {plan.suite} (a stand-in for the real OOD "
              f"files)", file=sys.stderr)
    for title, cmd in todo:
        print(f"\n==== [{time.time() - t0:3.0f}s] {title}", file=sys.stderr, flush=True)
        rc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, stdout=sys.stderr, env=env).returncode
        if rc:
            print(f"pipeline: stopped: `python -m {' '.join(cmd[:2])} ...` exited with {rc} (its message is above)",
                  file=sys.stderr)
            return rc
    if 3 not in plan.parts:
        print("Part 3 (ImageNet-pretrained ResNet-50) was left out: add it with --parts 1,2,3 and --weights "
              "resnet50.pth (README: The real competition), or online with --dataset cifar100", file=sys.stderr)
    print(f"\n==== [{time.time() - t0:3.0f}s] done; submission (validated against {plan.ood_dir or plan.suite}):",
          file=sys.stderr)
    print(csv)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main)())
