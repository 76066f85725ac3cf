"""The GPU check: one script, one H100/H200, under 8 minutes, writing bench/results/gpu-<date>.md.

    bash bench/gpu_check.sh ../shared/data/cifar10-jpg-train.tar.gz            # on the GPU machine
    python bench/gpu_check.py --data cifar10-jpg-train.tar.gz --out bench/results/gpu-2026-12-02.md
    python bench/gpu_check.py --dry-run --data tiny.tar.gz --out /tmp/gpu.md   # every step, tiny, CPU

Steps (each appends its section to the results file as soon as it ends, so a timeout keeps
what finished; `--skip NAME` drops one):
  throughput  training images/s per part at the batch-size finder's pick (bf16, channels-last):
              the loop's device-side step, synthetic batches (batch_size.step_throughput)
  part2_94    Part 2 (ResNet-18, CIFAR stem, plain: no AugMix, the speed recipe) on the stand-in,
              fold 0 held out: the training-loop time until held-out accuracy first reaches 94%
  airbench    airbench94 (PyPI `airbench`) on the same GPU and the same split (its CifarLoader
              files written from the stand-in): the speed anchor (94% in ~3.8 s on an A100)
  predict950k ResNet-50 at 224 px, 2-view TTA (id + flip), over 19 synthetic uint8 files of
              50,000 x 32 x 32 x 3, the competition's shape: images/s and the total (goal < 2 min)
  ddp         Part 2 for 2 epochs with one process per GPU (accelerate launch), when there are >= 2
  augmix_pair (only with --augmix-epochs N) Part 2 for N epochs with and without AugMix+JSD: clean and
              ood_check accuracy and time
--dry-run runs the same code on tiny sizes on a CPU (what the tests run): it proves the script
works, not any speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

STEPS = ("throughput", "part2_94", "airbench", "predict950k", "ddp", "augmix_pair")
# The Part 2 speed recipe for the 94% clock: the preset without AugMix+JSD (3x the compute) and
# its ood_check, at batch 512 (a 32x32 ResNet-18 step at 256 leaves an H100 idle between kernels)
# with lr scaled linearly (0.1 per 128).
PART2_FAST = ["augmix=false", "jsd=0", "ood_check=0", "select_on=clean", "batch_size=512", "lr=0.4",
              "warmup_epochs=1", "val_subset=null", "progress=false", "oof_tta=none"]


class Report:
    """The results file, appended section by section."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def section(self, title: str, lines: list[str]) -> None:
        text = f"\n## {title}\n\n" + "\n".join(lines) + "\n"
        with open(self.path, "a") as f:
            f.write(text)
        print(text, flush=True)


def environment() -> list[str]:
    from competition.runtime import provenance

    prov = provenance()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}", f"- GPUs: {', '.join(gpus) or 'none (CPU)'}",
            f"- CPU cores: {os.cpu_count()}", f"- commit: {prov['commit']} (dirty: {prov['dirty']})",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items())]


def throughput(dry: bool) -> list[str]:
    from competition.config import resolve
    from competition.batch_size import find_batch_size, step_throughput
    from competition.specs import train_spec

    rows = ["| part | image size | batch (finder) | images/s | peak GiB |", "|---|---:|---:|---:|---:|"]
    cases = [("part1", 1, []), ("part2", 2, []), ("part2 plain", 2, ["augmix=false", "jsd=0"]),
             ("part3 (train size)", 3, ["image_size=160"]), ("part3", 3, [])]
    for name, part, extra in cases:
        # The dry run checks the script, not speed: auto precision, as bf16 is emulated (minutes) on a
        # CPU without bf16 units; on the GPU, bf16 as measured.
        over = [f"mixed_precision={'auto' if dry else 'bf16'}", "channels_last=true", "pretrained=false", *extra]
        if dry:  # narrow Parts 1-2, and Part 3's ResNet-50 (no width) at batch 2-4: the same path in seconds
            over += {1: ["model_args.widths=[8,16,16]", "model_args.hidden=16"],
                     2: ["model_args.channels=[8,16,16,16]"], 3: ["image_size=32"]}[part]
        cfg = resolve(part, None, over)
        spec = train_spec(cfg)
        start, limit = ((2, 4) if part == 3 else (8, 16)) if dry else ((32, 512) if part == 3 else (128, 4096))
        bs = find_batch_size(spec, start=start, limit=limit, steps=1 if dry else 10, repeats=1 if dry else 2)
        ips, mem = step_throughput(spec.replace(batch_size=bs), steps=1 if dry else 20, warmup=1 if dry else 5)
        rows.append(f"| {name} | {cfg['image_size']} | {bs} | {ips:,.0f} | {mem:.1f} |")
    rows.append("\nSynthetic uint8 batches through flip/translate, AugMix where the preset has it, to_input "
                "(resize, normalise), forward, backward, step; images/s counts images, not AugMix views.")
    return rows


def train_run(args: list[str], work: Path, name: str) -> Path:
    from competition import train

    return Path(train.main(["--name", name, f"models_dir={work / 'models'}", f"folds_dir={work / 'folds'}",
                            f"data_dir={work / 'data'}", *args]))


def part2_94(data: str, work: Path, dry: bool) -> list[str]:
    import pandas as pd

    args = ["--part", "2", "dataset=imagefolder", f"data={data}", *PART2_FAST]
    args += ["epochs=2", "model_args.channels=[8,16,16,16]", "batch_size=32"] if dry else ["epochs=20"]
    t0 = time.time()
    run = train_run(args, work, "gpu-part2-fast")
    wall = time.time() - t0
    m = pd.read_csv(run / "metrics.csv")
    m["loop_s"] = m["epoch_time_s"].cumsum()
    hit = m[m["val_acc"] >= 0.94]
    summary = json.loads((run / "summary.json").read_text())
    lines = [f"- recipe: `--part 2 {' '.join(args[2:])}`",
             f"- time to 94% held-out (fold 0, {summary.get('oof_images', '?')} images; training loop incl. "
             f"per-epoch evaluation): "
             + (f"**{hit['loop_s'].iloc[0]:.1f} s** at epoch {int(hit['epoch'].iloc[0])}" if len(hit)
                else f"not reached in {len(m)} epochs (best {m['val_acc'].max():.4f})"),
             f"- whole run: loop {summary['training_loop_s']} s, process wall {wall:.1f} s (data decode, setup, OOF)",
             "", "| epoch | val_acc | loop s | img/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {int(r.epoch)} | {r.val_acc:.4f} | {r.loop_s:.1f} | {r.images_per_s:,.0f} |" for r in m.itertuples()]
    return lines


def airbench(data: str, work: Path, dry: bool) -> list[str]:
    """airbench's CifarLoader reads cifar10/{train,test}.pt under the working directory: written
    here from the stand-in with our fold split (fold 0 = its test set), so both train on the same
    40,000 images and are scored on the same 10,000."""
    from competition import data as D, folds

    ds = D.load("imagefolder", "train", work / "data", data)
    fold = folds.folds_frame(ds.labels)["fold"].to_numpy()  # k=5 seed 0: the split train.py writes
    root = work / "airbench"
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", fold != 0), ("test", fold == 0)):
        torch.save({"images": torch.from_numpy(ds.images[rows]), "labels": torch.from_numpy(ds.labels[rows]),
                    "classes": list(ds.classes)}, root / "cifar10" / f"{split}.pt")
    lines = [f"- files: {int((fold != 0).sum())} train / {int((fold == 0).sum())} test images of the stand-in"]
    if dry or not torch.cuda.is_available():
        return lines + ["- airbench94 not run: it needs CUDA (dry run)"]
    # warmup94 returns after one epoch only when verbose; train94 returns the model (it prints its
    # own GPU-timed training seconds), evaluated here with airbench94's TTA level.
    code = ("import time, torch, airbench; airbench.warmup94(verbose=True); torch.cuda.synchronize(); "
            "t = time.time(); m = airbench.train94(verbose=True); torch.cuda.synchronize(); secs = time.time() - t; "
            "test = airbench.CifarLoader('cifar10', train=False, batch_size=2000); "
            "acc = airbench.evaluate(m, test, tta_level=airbench.lib_airbench94.hyp['net']['tta_level']); "
            "print('RESULT', acc, secs)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    result = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    if out.returncode or not result:
        return lines + [f"- airbench94 failed: {(out.stderr or out.stdout)[-600:]}"]
    _, acc, secs = result[-1].split()
    return lines + [f"- airbench94: **{float(acc):.4f}** accuracy (its TTA) in {float(secs):.1f} s wall "
                    f"(train94 call after warmup94, incl. its evaluation)", "```", *out.stdout.splitlines()[-6:], "```"]


def predict950k(work: Path, dry: bool) -> list[str]:
    from competition import models, runtime, tta
    from competition.augment import IMAGENET_MEAN, IMAGENET_STD
    from competition.predict import Predictor

    n, size = (20, 32) if dry else (50_000, 224)
    ood = work / "ood"
    ood.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for k in range(19):
        f = ood / f"distortion{k:02d}.npy"
        np.save(f, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        files.append(f)
    acc = runtime.make_accelerator("auto")
    model = models.build_model("resnet50", 100)
    prep = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_size": size, "channels_last": True,
            "num_classes": 100}
    pred = Predictor(model, prep, acc, tta.parse_tta("flip"), batch_size=64 if dry else 1024)
    pred.predict(np.load(files[0], mmap_mode="r")[: 2 * (64 if dry else 1024)])  # warm up (cuDNN autotuning)
    runtime.sync()
    t0 = time.time()
    for f in files:
        pred.predict(np.load(f, mmap_mode="r"))
    runtime.sync()
    secs = time.time() - t0
    total = 19 * n
    return [f"- {total:,} images ({19} files x {n:,}), ResNet-50 at {size} px, 2 views (id + flip), "
            f"{acc.mixed_precision} on {acc.device}: **{secs:.1f} s**, {total / secs:,.0f} images/s "
            f"({2 * total / secs:,.0f} forward passes/s); memory-mapped uint8 files, outputs kept in memory"]


def ddp(work: Path, dry: bool, data: str) -> list[str]:
    gpus = torch.cuda.device_count()
    if not dry and gpus < 2:
        return [f"- {gpus} GPU: nothing to split (DDP needs 2 or more)"]
    procs = 2 if dry else gpus
    if dry:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
        args = ["--part", "1", "--preset", "demo", "epochs=1", "model_args.widths=[8,16,16]", "model_args.hidden=16",
                "batch_size=64", "train_subset=128", "ood_check=1"]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs)]
        args = ["--part", "2", "dataset=imagefolder", f"data={data}", *PART2_FAST, "epochs=2"]
    cmd = [*launch, str(ROOT / "competition" / "train.py"), *args, "--name", "gpu-ddp",
           f"models_dir={work / 'models'}", f"folds_dir={work / 'folds'}", f"data_dir={work / 'data'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if dry else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode:
        return [f"- DDP over {procs} processes failed: {out.stderr[-800:]}"]
    epochs = [ln for ln in out.stdout.splitlines() if ln.startswith("epoch ")]
    return [f"- {procs} processes: `{' '.join(cmd[3:6])} ...`", "```", *epochs, "```"]


def augmix_pair(data: str, work: Path, epochs: int, dry: bool) -> list[str]:
    rows = ["| Part 2 | epochs | clean held-out | ood_check | loop s |", "|---|---:|---:|---:|---:|"]
    for name, extra in (("plain", ["augmix=false", "jsd=0"]), ("AugMix+JSD", [])):
        args = ["--part", "2", "dataset=imagefolder", f"data={data}", f"epochs={epochs}", "progress=false",
                "ood_check=2" if dry else "ood_check=100", *extra]
        if dry:
            args += ["model_args.channels=[8,16,16,16]", "batch_size=32"]
        run = train_run(args, work, f"gpu-part2-{'plain' if extra else 'augmix'}")
        s = json.loads((run / "summary.json").read_text())
        rows.append(f"| {name} | {epochs} | {s['oof_accuracy']:.4f} | {s.get('oof_ood_accuracy', float('nan')):.4f} | "
                    f"{s['training_loop_s']} |")
    return rows


# What a GPU machine with torch already has: never downloaded for it (torch's CUDA build is its own).
PRESENT = ("torch", "torchvision", "triton")


def wheel_list(roots=("competition", "albumentations", "imagecorruptions")) -> list[str]:
    """name==version of every distribution these need, transitively, as installed here, minus the
    torch family: what an offline GPU machine with torch lacks (for `pip download --no-deps`)."""
    import importlib.metadata as md
    from packaging.requirements import Requirement

    seen, todo, out = set(), list(roots), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen or name in PRESENT or name.startswith(("nvidia-", "cuda-")):
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if name not in roots[:1]:
            out.append(f"{dist.metadata['Name']}=={dist.version}")
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return sorted(out, key=str.lower)


def main(argv=None):
    if argv is None and sys.argv[1:] == ["--list-wheels"]:
        print("\n".join(wheel_list()))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the CIFAR-10 stand-in tarball (train/<class>/<n>.jpg)")
    p.add_argument("--out", help="results file (default bench/results/gpu-<date>.md)")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on any device: checks the script, not speed")
    p.add_argument("--skip", action="append", default=[], choices=STEPS)
    p.add_argument("--augmix-epochs", type=int, default=0, help="also run augmix_pair for this many epochs")
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}.md")
    if out.exists():
        out.unlink()
    report = Report(out)
    report.section("GPU check" + (" (DRY RUN: tiny sizes, not a measurement)" if args.dry_run else ""), environment())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        steps = {"throughput": lambda: throughput(args.dry_run),
                 "part2_94": lambda: part2_94(args.data, work, args.dry_run),
                 "airbench": lambda: airbench(args.data, work, args.dry_run),
                 "predict950k": lambda: predict950k(work, args.dry_run),
                 "ddp": lambda: ddp(work, args.dry_run, args.data),
                 "augmix_pair": lambda: augmix_pair(args.data, work, args.augmix_epochs, args.dry_run)}
        failed = []
        for name, step in steps.items():
            if name in args.skip or (name == "augmix_pair" and not args.augmix_epochs):
                continue
            t0 = time.time()
            try:
                lines = step()
            except Exception as e:  # one broken step must not lose the others' results
                failed.append(name)
                lines = [f"- FAILED: {type(e).__name__}: {str(e)[:800]}"]
            report.section(f"{name} ({time.time() - t0:.0f} s)", lines)
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
