"""Stage 3: test-time-augmented logits of trained runs, for the ensemble and the submission.

    python -m competition.predict models/part1-demo-f0-s0 --ood-dir data/ood-test
    python -m competition.predict 'models/part3-*' --ood-dir data/ood-test --tta shift1 --bn-adapt
    python -m competition.predict models/part2-demo-f0-s0 --ood-dir data/ood-local/digits --tta none
    accelerate launch -m competition.predict models/part3-f0-s0 --ood-dir data/ood-test   # every GPU

For each run folder (its best.pt and saved config) it writes, next to the checkpoint:

    test_logits.npy, test_labels.npy  the dataset's clean test split (skipped when it has none)
    oof_tta_logits.npy                the held-out fold with the same TTA; rows = oof_index.npy,
                                      so the ensemble fits its weights on what it will combine
    ood/distortionNN.npy              float16 (5*N, C) per OOD file, same row order as the file
    ood_local/distortionNN.npy        the same for a local corruption suite (a folder holding
                                      corruptions.json), so it never overwrites the real files'
    ood[_local]_bnadapt/...           --bn-adapt: batch-norm statistics re-estimated per file and
                                      severity on that slice's own images (Schneider et al. 2020)
    predict.json                      per output: the source it was made from and the settings

Work already done (file newer than best.pt, same source and settings in predict.json) is
skipped unless --force. OOD files are memory-mapped and predicted batch by batch, so 19 x
50,000 images never sit in memory. Preprocessing is augment.to_input with the run's own
config, exactly as in training and validation.

TTA (--tta): a preset or a comma list of views. A view is `id`, `flip`, `DY:DX` (shift by DY
rows and DX columns, reflect padding) or `fDY:DX` (mirrored and shifted). Presets:
    none   id                                            1 view
    flip   id, flip                                      2 views
    shift1 {id, flip} x {0, (+1,+1), (-1,-1)}            6 views (airbench's mirror+translate)
    shift2 {id, flip} x {0, (+-1,+-1), (+-2,+-2)}        10 views
Without --tta each run uses the TTA its training validated (its config's oof_tta, the view
set behind the "held-out accuracy with TTA" train.py reported), or flip when that is none.
Views are averaged as logits (default) or as probabilities (--average prob; the file then
holds log of the mean probability, which softmaxes back to it).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch competition/predict.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from competition import augment, data, models
from competition.files import CompetitionError, cli, save_json, save_npy

View = tuple  # (mirror: bool, dy: int, dx: int)

TTA_PRESETS: dict[str, list[View]] = {
    "none": [(False, 0, 0)],
    "flip": [(False, 0, 0), (True, 0, 0)],
    "shift1": [(m, d, d) for m in (False, True) for d in (0, 1, -1)],
    "shift2": [(m, d, d) for m in (False, True) for d in (0, 1, -1, 2, -2)],
}


# ---------------------------------------------------------------------------- TTA


def parse_tta(spec: str) -> list[View]:
    """A preset name or a comma list of views (see the module docstring)."""
    spec = (spec or "none").strip()
    if spec in TTA_PRESETS:
        return list(TTA_PRESETS[spec])
    views = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token in ("id", "flip"):
            views.append((token == "flip", 0, 0))
            continue
        mirror = token.startswith("f")
        body = token[1:] if mirror else token
        try:
            dy, dx = (int(v) for v in body.split(":"))
        except ValueError:
            raise CompetitionError(f"--tta {spec!r}: cannot read view {token!r}; use a preset "
                                   f"({', '.join(TTA_PRESETS)}) or views like id,flip,1:1,f-1:-1") from None
        views.append((mirror, dy, dx))
    if not views:
        raise CompetitionError(f"--tta {spec!r} names no view")
    return views


def tta_name(views: list[View]) -> str:
    for name, preset in TTA_PRESETS.items():
        if preset == views:
            return name
    return ",".join(("f" if m else "") + (f"{dy}:{dx}" if dy or dx else ("flip" if m else "id"))
                    for m, dy, dx in views)


def apply_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """One TTA view of a uint8 (B, H, W, C) batch: optional mirror, then a shift by (dy, dx)
    pixels with reflect padding (the padding training's flip_translate uses), as one gather."""
    mirror, dy, dx = view
    if not (mirror or dy or dx):
        return images
    _, h, w, _ = images.shape
    dev = images.device
    rows = augment.reflect_index(torch.arange(h, device=dev) + dy, h)
    cols = augment.reflect_index(torch.arange(w, device=dev) + dx, w)
    if mirror:
        cols = cols.flip(0)
    return images[:, rows][:, :, cols]


def view_logits(model: nn.Module, images: torch.Tensor, cfg: dict, views: list[View]) -> list[torch.Tensor]:
    """float32 (B, C) logits of a uint8 (B, H, W, 3) batch, one tensor per view, each through
    to_input with the run's size and normalisation (what training and tta_logits both use)."""
    return [model(augment.to_input(apply_view(images, v), cfg["mean"], cfg["std"], cfg["image_size"],
                                   cfg["channels_last"])).float() for v in views]


@torch.no_grad()
def tta_logits(model: nn.Module, images: torch.Tensor, cfg: dict, views: list[View],
               average: str = "logits") -> torch.Tensor:
    """float32 (B, C) logits of a uint8 (B, H, W, 3) batch averaged over `views`.

    average="prob" returns log(mean softmax): still a logit vector, so the ensemble and the
    argmax treat both kinds alike."""
    total = None
    for out in view_logits(model, images, cfg, views):
        out = out.softmax(1) if average == "prob" else out
        total = out if total is None else total + out
    total = total / len(views)
    return total.clamp_min(1e-12).log() if average == "prob" else total


# ---------------------------------------------------------------------------- batch-norm adaptation


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


@contextlib.contextmanager
def bn_source_stats(model: nn.Module):
    """Yield the model's batch-norm layers; on exit (also on error) put back their running
    statistics, momentum and mode exactly as they were."""
    bns = batchnorms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)
             for m in bns]
    try:
        yield bns
    finally:
        for m, (mean, var, n, momentum, training) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = momentum
            m.train(training)


@torch.no_grad()
def adapt_bn(model: nn.Module, batches, blend: float = 1.0, reduce=None) -> int:
    """Re-estimate every batch-norm layer's running statistics on `batches` (float input tensors,
    no labels) and leave the model in eval mode using them. Call inside bn_source_stats.

    The statistics are reset and momentum set to None, so they become the cumulative average
    over all the batches rather than an exponential average dominated by the last few. Only
    the BN layers run in train mode: dropout stays off, so the statistics are those the layers
    will see at prediction time. blend < 1 mixes in the source statistics: blend * adapted +
    (1 - blend) * source, a prior that helps when a slice holds few images. `reduce(tensor)`
    averages across processes (each saw only its shard). Returns the images seen."""
    bns = batchnorms(model)
    source = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    for x in batches:
        model(x)
        seen += len(x)
    for m, (mean, var) in zip(bns, source):
        if reduce is not None:
            m.running_mean.copy_(reduce(m.running_mean))
            m.running_var.copy_(reduce(m.running_var))
        if blend != 1.0:
            m.running_mean.mul_(blend).add_(mean, alpha=1 - blend)
            m.running_var.mul_(blend).add_(var, alpha=1 - blend)
    model.eval()
    return seen


# ---------------------------------------------------------------------------- output folders


def ood_subdir(ood_dir, bn_adapt: bool = False) -> str:
    """Where a run keeps its logits for `ood_dir`: `ood` for the competition's files, `ood_local`
    for a local corruption suite (it holds corruptions.json), `_bnadapt` for adapted ones."""
    base = "ood_local" if (Path(ood_dir) / "corruptions.json").exists() else "ood"
    return base + ("_bnadapt" if bn_adapt else "")


def source_stamp(path) -> list:
    """What an OOD logits file was made from: the OOD file's resolved path, size and mtime."""
    path = Path(path)
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def read_manifest(run_dir) -> dict:
    import json

    path = Path(run_dir) / "predict.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        return {}  # unreadable: everything is redone


def ood_logits_paths(run_dir, ood_dir, bn_adapt: bool = False) -> list[Path]:
    """The run's logits files for every file of `ood_dir`, checked: present, and predicted from
    these very files (predict.json). A clear error says which predict command is missing."""
    run_dir, ood_dir = Path(run_dir), Path(ood_dir)
    sub = ood_subdir(ood_dir, bn_adapt)
    manifest = read_manifest(run_dir)
    how = (f"run `python -m competition.predict {run_dir} --ood-dir {ood_dir}"
           f"{' --bn-adapt' if bn_adapt else ''}` first")
    out = []
    for src in data.ood_files(ood_dir, expected=None):
        path = run_dir / sub / src.name
        if not path.exists():
            raise CompetitionError(f"{path} is missing: {how}")
        entry = manifest.get(f"{sub}/{src.name}")
        if entry is None or entry.get("source") != source_stamp(src):
            raise CompetitionError(f"{path} was predicted from other OOD files than {src} (or before it changed): "
                                   f"{how} (it redoes stale files)")
        out.append(path)
    return out


# ---------------------------------------------------------------------------- the predictor


class _Rows(torch.utils.data.Dataset):
    """Rows of a (possibly memory-mapped) uint8 image array; a batch reads only its rows."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, positions):
        pos = np.asarray(positions)
        r = self.rows[pos]
        if len(r) and r[-1] - r[0] == len(r) - 1:  # contiguous: a slice reads an mmap sequentially
            x = self.images[r[0]:r[-1] + 1]
        else:
            x = self.images[r]
        return torch.from_numpy(np.array(x)), torch.from_numpy(pos.astype(np.int64))  # copy: mmaps are read-only

    def __getitem__(self, i):
        return self.__getitems__([i])


def _as_batch(batch):
    return batch


class Predictor:
    """One run's model on the Accelerate device, predicting uint8 image arrays with TTA.

    Every process takes a share of the batches; gather_for_metrics (with each sample's
    position) reassembles them in order and drops the padding of the last shard."""

    def __init__(self, model: nn.Module, cfg: dict, accelerator, views: list[View], average: str = "logits",
                 batch_size: int = 512, bar=None):
        self.cfg, self.acc, self.views, self.average, self.batch_size, self.bar = (
            cfg, accelerator, views, average, batch_size, bar)
        # Not accelerator.prepare(model): DDP is not needed without gradients, and in train mode it
        # would broadcast rank 0's BN buffers over those each rank re-estimated.
        model = model.to(accelerator.device).eval()
        if cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def _loader(self, images: np.ndarray, rows: np.ndarray):
        dl = torch.utils.data.DataLoader(_Rows(images, rows), batch_size=self.batch_size, shuffle=False,
                                         collate_fn=_as_batch)
        return self.acc.prepare_data_loader(dl)

    def predict(self, images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (len(rows), C) TTA logits of images[rows] (all rows when None), in that order."""
        rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        out = np.zeros((len(rows), self.cfg["num_classes"]), np.float32)
        if not len(rows):
            return out
        for x, pos in self._loader(images, rows):
            with self.acc.autocast():
                logits = tta_logits(self.model, x, self.cfg, self.views, self.average)
            logits, pos = self.acc.gather_for_metrics((logits.float(), pos))
            out[pos.cpu().numpy()] = logits.cpu().numpy()
            if self.bar is not None:
                self.bar.update(len(pos) * len(self.views))
        return out

    def predict_adapted(self, images: np.ndarray, rows: np.ndarray, blend: float = 1.0) -> np.ndarray:
        """Logits of images[rows] after re-estimating BN statistics on those same images; the
        source statistics are back in place when it returns."""
        def batches():
            for x, _ in self._loader(images, rows):
                with self.acc.autocast():
                    yield augment.to_input(x, self.cfg["mean"], self.cfg["std"], self.cfg["image_size"],
                                           self.cfg["channels_last"])
                if self.bar is not None:
                    self.bar.update(len(x) * self.acc.num_processes)

        reduce = (lambda t: self.acc.reduce(t, "mean")) if self.acc.num_processes > 1 else None
        with bn_source_stats(self.model):
            adapt_bn(self.model, batches(), blend, reduce)
            return self.predict(images, rows)


# ---------------------------------------------------------------------------- one run


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run folders from paths or glob patterns (quoted, so the shell leaves them alone)."""
    runs: list[Path] = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not hits:
            raise CompetitionError(f"{p} matches no run folder")
        for h in hits:
            h = Path(h)
            if not (h / "best.pt").exists():
                raise CompetitionError(f"{h} is not a trained run folder (no best.pt): train it first with "
                                       f"python competition/train.py, or check the path")
            if h not in runs:
                runs.append(h)
    return runs


def predict_run(run_dir, ood_dirs=(), views: list[View] | None = None, average: str = "logits",
                bn_adapt: bool | None = None, bn_blend: float = 1.0, batch_size: int = 512,
                test: bool = True, oof: bool = True, force: bool = False, accelerator=None) -> dict:
    """Write the run's TTA logits (see the module docstring). views=None and bn_adapt=None follow
    the run's config (oof_tta, or flip when that is none; bn_adapt). Returns {output path:
    'written' | 'skipped'}."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if average not in ("logits", "prob"):
        raise CompetitionError(f"--average must be logits or prob, not {average!r}")
    if not 0.0 <= bn_blend <= 1.0:
        raise CompetitionError(f"--bn-blend {bn_blend}: must lie in 0..1 (1 = only the adapted statistics)")
    acc = accelerator or Accelerator(mixed_precision="bf16" if torch.cuda.is_available()
                                     and torch.cuda.is_bf16_supported() else "no")
    main = acc.is_main_process
    model, cfg = models.load_run_model(run_dir, map_location="cpu")
    if views is None:
        views = parse_tta(cfg.get("oof_tta") or "none")
        views = views if tta_name(views) != "none" else TTA_PRESETS["flip"]
    if bn_adapt is None:
        bn_adapt = bool(cfg.get("bn_adapt"))
    if bn_adapt and not batchnorms(model):
        acc.print(f"{run_dir}: no batch-norm layers, --bn-adapt does nothing; skipping it")
        bn_adapt = False
    settings = {"tta": tta_name(views), "average": average}
    best_mtime = (run_dir / "best.pt").stat().st_mtime
    manifest = read_manifest(run_dir)
    status: dict[str, str] = {}

    def done(rel: str, record: dict) -> bool:
        path = run_dir / rel
        if force or not path.exists() or path.stat().st_mtime <= best_mtime or manifest.get(rel) != record:
            return False
        status[str(path)] = "skipped"
        return True

    def write(rel: str, record: dict, array: np.ndarray):
        if main:
            save_npy(run_dir / rel, array)
            manifest[rel] = record
            save_json(run_dir / "predict.json", manifest)
        status[str(run_dir / rel)] = "written"

    # ---- the jobs, so the progress bar knows the total before any work
    jobs = []  # (rel, record, kind, args)
    if test:
        ds = data.load(cfg["dataset"], "test", cfg["data_dir"], cfg.get("data"))
        if ds is None:
            acc.print(f"{run_dir}: {cfg.get('data')} has no test/ split; no clean test logits")
        else:
            rec = {**settings, "source": ["test", cfg["dataset"], str(cfg.get("data")), len(ds.labels)]}
            if not done("test_logits.npy", rec):
                jobs.append(("test_logits.npy", rec, "test", ds))
    if oof:
        idx_path = run_dir / "oof_index.npy"
        if not idx_path.exists():
            acc.print(f"{run_dir}: no oof_index.npy (trained with fold=-1?); no out-of-fold logits")
        else:
            rows = np.load(idx_path)
            rec = {**settings, "source": ["oof", len(rows), int(rows.sum())]}
            if not done("oof_tta_logits.npy", rec):
                jobs.append(("oof_tta_logits.npy", rec, "oof", rows))
    for ood_dir in ood_dirs:
        for src in data.ood_files(ood_dir, expected=None):
            for adapted in (False, True) if bn_adapt else (False,):
                rec = {**settings, "source": source_stamp(src)}
                if adapted:
                    rec["bn_blend"] = bn_blend
                rel = f"{ood_subdir(ood_dir, adapted)}/{src.name}"
                if not done(rel, rec):
                    jobs.append((rel, rec, "ood_bn" if adapted else "ood", src))

    def cost(kind, arg):
        n = len(arg.labels) if kind == "test" else len(arg) if kind == "oof" else \
            data.open_ood(arg, image_shape=None).shape[0]
        return n * (len(views) + (1 if kind == "ood_bn" else 0))

    skipped = len(status)
    if not jobs:
        acc.print(f"{run_dir}: all {skipped} outputs up to date (--force redoes them)")
        return status
    total = sum(cost(kind, arg) for _, _, kind, arg in jobs)
    bar = tqdm(total=total, desc=f"predict {run_dir.name}", unit="img", disable=not main,
               dynamic_ncols=True, mininterval=2)
    pred = Predictor(model, cfg, acc, views, average, batch_size, bar)
    t0 = time.time()
    train_set = None
    for rel, rec, kind, arg in jobs:
        if kind == "test":
            write(rel, rec, pred.predict(arg.images))
            if main:
                save_npy(run_dir / "test_labels.npy", arg.labels.astype(np.int64))
        elif kind == "oof":
            if train_set is None:
                train_set = data.load(cfg["dataset"], "train", cfg["data_dir"], cfg.get("data"))
            if arg.max(initial=-1) >= len(train_set.labels):
                raise CompetitionError(f"{run_dir}/oof_index.npy names row {arg.max()} but the train split has "
                                       f"{len(train_set.labels)} images: the run was trained on other data")
            write(rel, rec, pred.predict(train_set.images, arg))
        else:
            images = data.open_ood(arg, image_shape=None)
            if kind == "ood":
                logits = pred.predict(images)
            else:  # one corruption per file; each severity is its own domain, adapted separately
                n = len(images) // data.SEVERITIES
                logits = np.concatenate([pred.predict_adapted(images, np.arange(s * n, (s + 1) * n), bn_blend)
                                         for s in range(data.SEVERITIES)])
            write(rel, rec, logits.astype(np.float16))
    bar.close()
    acc.wait_for_everyone()
    acc.print(f"{run_dir}: {len(status) - skipped} written, {skipped} up to date, TTA {settings['tta']} "
              f"({len(views)} views, {average} averaged){', BN-adapted copies' if bn_adapt else ''}, "
              f"{time.time() - t0:.1f} s")
    return status


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (models/<run>) or quoted glob patterns")
    p.add_argument("--ood-dir", action="append", default=[],
                   help="folder of distortionNN.npy (the competition's, or a local suite); repeatable")
    p.add_argument("--download", action="store_true",
                   help="fetch the 19 competition OOD files into --ood-dir first when missing")
    p.add_argument("--tta", default=None, help="preset (none, flip, shift1, shift2) or views; default: the "
                   "run's oof_tta (the TTA its reported accuracy used), else flip")
    p.add_argument("--average", default="logits", choices=("logits", "prob"), help="how TTA views are averaged")
    p.add_argument("--bn-adapt", action="store_true", default=None,
                   help="also write BN-adapted OOD logits (default: the run config's bn_adapt)")
    p.add_argument("--bn-blend", type=float, default=1.0,
                   help="BN statistics = ALPHA * adapted + (1 - ALPHA) * source (default 1)")
    p.add_argument("--batch-size", type=int, default=512, help="images per batch per process")
    p.add_argument("--no-test", action="store_true", help="skip the clean test split")
    p.add_argument("--no-oof", action="store_true", help="skip the out-of-fold TTA logits")
    p.add_argument("--force", action="store_true", help="redo outputs that are up to date")
    args = p.parse_args(argv)
    from accelerate import Accelerator

    views = parse_tta(args.tta) if args.tta else None
    if args.download:  # the competition's files only: a local suite is made by competition.score
        for d in args.ood_dir:
            if not (Path(d) / "corruptions.json").exists():
                data.ood_files(d, download=True)
    runs = expand_runs(args.runs)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                      else "no")
    for run in runs:
        predict_run(run, args.ood_dir, views, args.average, args.bn_adapt, args.bn_blend, args.batch_size,
                    test=not args.no_test, oof=not args.no_oof, force=args.force, accelerator=acc)
    return runs


if __name__ == "__main__":
    cli(main)()
