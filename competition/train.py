"""Stage 2: train one model on the training folds and write its out-of-fold logits.

    python competition/train.py --part 1                      # CPU or one GPU
    python competition/train.py --preset part1_cpu data=PATH  # CIFAR-10-style image folder, 2 CPU cores
    python -m competition.train --part 2 --fold 1             # the same, as a module
    accelerate launch competition/train.py --part 3 --fold 0  # every GPU of the machine
    accelerate launch -m competition.train --part 3 --fold 0  # the same, as a module
    accelerate launch --num_processes 8 competition/train.py --part 2 --fold 3 --seed 1
    python competition/train.py --part 2 epochs=30 lr=0.05 model_args.stem=imagenet image_size=64
    python competition/train.py --part 2 --resume             # continue the same run exactly
    python competition/train.py --part 3 --find-batch-size    # images/s per batch size, then exit

Config: competition/configs/base.yaml <- part<N>.yaml <- --preset NAME(s) <- key=value overrides.
The run lands in models/<presets>-<dataset>-f<fold>-s<seed>/ (or models/<name>/); competition/runs.py
lists its files.

The run, top to bottom (`train`): an Accelerator; the run folder (skip a finished run, refuse
a changed one, resume or start over); the data (`TrainData`) and what it decides (the data
config: classes, mean/std, image size); the model, optimizer, schedule and EMA (`make_learner`);
then per epoch `train_one_epoch` and `end_of_epoch` (evaluate, checkpoint, curves, metrics
row, patience); finally `write_oof` (last weights, out-of-fold logits of the best weights).
One loop for every part and every device: Accelerate places the model, shards the batches
across processes, runs bf16 autocast on GPUs and accumulates gradients; only the main
process writes files.
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch competition/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch
from torch import nn

from competition import augment, data, files, folds, metrics, models, optim, plots, runtime, tta
from competition.config import comparable, resolve, validate
from competition.files import CompetitionError, cli
from competition.loader import ImageRows, as_batch, eval_loader
from competition.runs import RunDir

# ---------------------------------------------------------------------------- accelerator and run folder


def make_accelerator(cfg: dict, run: RunDir):
    """The run's Accelerator: precision, gradient accumulation, trackers, per-epoch checkpoints
    in run/checkpoints (the last two kept)."""
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    import logging

    logging.getLogger("accelerate.accelerator").addFilter(_quiet_checkpoint_rotation)
    if cfg["log_with"] == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # never block on a login prompt
    return runtime.make_accelerator(
        cfg["mixed_precision"], gradient_accumulation_steps=cfg["grad_accum"], log_with=cfg["log_with"],
        project_config=ProjectConfiguration(project_dir=str(run.path), automatic_checkpoint_naming=True,
                                            total_limit=2),
        # Frozen stages get no gradient while progressive unfreezing holds them; DDP must know.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(cfg["unfreeze"]))])


def _quiet_checkpoint_rotation(record) -> bool:
    """Drop Accelerate's "Deleting 1 checkpoints to make room" warning: keeping the last two
    checkpoints is this loop's design (total_limit=2), not news every epoch."""
    return "checkpoints to make room" not in record.getMessage()


def check_config(cfg: dict) -> None:
    """Everything about cfg that can fail, tried before the run folder is touched: values and
    ranges (config.validate), the data source, the TTA spec, the CPU augmentation, and the
    model: built (without fetching weights), one forward pass of two images at every size it
    will see, its optimizer, schedule and unfreezing groups. A typo costs one message, never a run."""
    validate(cfg)
    if cfg["dataset"] not in data.SOURCES:
        raise CompetitionError(f"config dataset={cfg['dataset']!r}: must be one of {', '.join(data.SOURCES)}")
    tta.parse_tta(cfg["oof_tta"])
    if cfg["log_with"]:
        import importlib.util

        if importlib.util.find_spec(cfg["log_with"]) is None:
            raise CompetitionError(f"config log_with={cfg['log_with']}: the {cfg['log_with']} package is not installed: "
                                   f"pip install -e '.[{cfg['log_with']}]' (or drop log_with)")
    for kind in {cfg["cpu_aug"], "strong" if cfg["strong_aug_epoch"] is not None else "none"}:
        augment.cpu_pipeline(kind)
    if cfg.get("init_from") and not RunDir(cfg["init_from"]).weights("best").exists():
        raise CompetitionError(f"config init_from={cfg['init_from']}: no best.pt there (a trained run folder)")
    if cfg.get("pseudo") and not Path(cfg["pseudo"]).is_file():
        raise CompetitionError(f"config pseudo={cfg['pseudo']}: no such file (competition.selftrain writes it)")
    if cfg.get("weights") and not Path(cfg["weights"]).is_file():
        raise CompetitionError(f"config weights={cfg['weights']}: no such file (an ImageNet ResNet-50 state dict)")
    model = models.model_from_config({**cfg, "pretrained": False, "weights": None}, 10).eval()
    for size in sorted({cfg["image_size"] or 32, *(cfg.get("train_sizes") or {}).values()}):
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, 3, size, size))
        except Exception as e:
            raise CompetitionError(f"{cfg['model']} {cfg.get('model_args') or {}} cannot take {size}x{size} input "
                                   f"({type(e).__name__}: {str(e)[:200]}); choose another image_size (or "
                                   f"train_sizes) for this model") from None
        if tuple(out.shape) != (2, 10):
            raise CompetitionError(f"{cfg['model']}: {size}x{size} input gives output {tuple(out.shape)}, not "
                                   f"(batch, classes); choose another image_size")
    optim.make_scheduler(optim.make_optimizer(model, cfg), cfg)
    for epoch in sorted(int(k) for k in cfg.get("unfreeze") or {}):
        models.set_trainable(model, models.unfrozen_prefixes(cfg["unfreeze"], epoch))


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose value differs between two configs (comparable keys only)."""
    a, b = comparable(old), comparable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def prepare_run_folder(run: RunDir, cfg: dict, accelerator, resume: bool, force: bool) -> Path | None | bool:
    """Apply the run-folder rules before anything is written. Returns False to skip ("already
    trained with this config"), else the old run's folder moved aside by --force (deleted once
    the new run has finished its first epoch, put back if it fails before) or None.

    A finished run (summary.json) with the same config is skipped; any other existing run is
    refused unless --resume (continue from the last good checkpoint, same config only) or
    --force. One process at a time: the folder's lock names the one training it."""
    main = accelerator.is_main_process
    if main:
        files.check_writable(run.path.parent, "models_dir")
        if run.path.exists():
            run.check_unlocked("training it again")
    exists, aside = (run / RunDir.CONFIG).exists(), None
    if exists and not force:
        changed = changed_keys(run.config(), cfg)
        if run.finished and not changed:
            accelerator.print(f"{run}: already trained with this config{' (nothing to resume)' if resume else ''}; "
                              f"skipping (--force retrains)")
            return False
        if changed and (resume or run.finished):
            raise CompetitionError(
                f"{run} was trained with other values of {', '.join(changed)}"
                f"{' (--resume continues a run with its own config)' if resume else ''}: drop those overrides, "
                f"pass --force to retrain it, or name=NEW for a new run")
        if not resume:
            raise CompetitionError(f"{run} holds a partial run (no summary.json: interrupted or still running): pass "
                                   f"--resume to continue it, --force to retrain it, or name=NEW for a new run")
    if resume and not exists:
        raise CompetitionError(f"--resume: {run} holds no run to resume; train it without --resume")
    if resume and force and changed_keys(run.config(), cfg):  # it would rewrite the config as if it had always held
        raise CompetitionError(f"--resume --force: {run} was trained with other values of "
                               f"{', '.join(changed_keys(run.config(), cfg))}; --resume continues a run with its own "
                               f"config only: drop those overrides, or --force alone to retrain it")
    if resume and run.latest_checkpoint() is None:
        raise CompetitionError(f"--resume: {run.checkpoint_dir} holds no checkpoint (interrupted in its first "
                               f"epoch?); retrain with --force")
    if force and not resume and main and run.path.exists():
        files.check_inside(run.path, cfg["models_dir"], "--force (the run folder to replace)")
        aside = run.move_aside("replaced")
        accelerator.print(f"--force: {run} moved to {aside}; it is deleted once the new run has finished an epoch")
    if main:
        run.acquire_lock()
    accelerator.wait_for_everyone()
    return aside


# ---------------------------------------------------------------------------- data


def fold_rows(fold: np.ndarray, cfg: dict, path) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out rows for cfg['fold'], given every row's fold (from the folds file
    `path`): exclude_folds and the measure reserve (fold value folds.MEASURE) in neither; fold -1
    trains on all the others and holds out none."""
    k = int(fold.max()) + 1
    # A reserve: neither trained on nor held out. The measure reserve always is: no run, whatever
    # its config, learns from or is selected on the images the local estimate is measured on.
    excluded = np.isin(fold, cfg.get("exclude_folds") or []) | (fold == folds.MEASURE)
    if cfg["fold"] in (cfg.get("exclude_folds") or []):
        raise CompetitionError(f"fold={cfg['fold']} is also in exclude_folds {cfg['exclude_folds']}")
    if cfg["fold"] == -1:
        return np.flatnonzero(~excluded), np.arange(0)
    if not 0 <= cfg["fold"] < k:
        raise CompetitionError(f"fold={cfg['fold']} but {path} has folds 0..{k - 1} (or -1 to train on all)")
    return np.flatnonzero((fold != cfg["fold"]) & ~excluded), np.flatnonzero(fold == cfg["fold"])


def split_rows(cfg: dict, labels: np.ndarray, accelerator) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Training and held-out rows for cfg['fold'] from folds/<dataset>.csv (written with the
    defaults, k=5 seed 0, when it does not exist yet), and the id of its measure reserve."""
    name = folds.dataset_name(cfg["dataset"], cfg.get("data"))
    path = folds.folds_path(name, cfg["folds_dir"])
    if not path.exists() and accelerator.is_main_process:
        folds.write_folds(folds.folds_frame(labels), path)
        print(f"wrote {path} (k=5, seed=0); run `python -m competition.folds` to choose others")
    accelerator.wait_for_everyone()
    frame = folds.read_folds(path)
    if len(frame) != len(labels) or not np.array_equal(frame["label"].to_numpy(), labels):
        raise CompetitionError(f"{path} was made for a different dataset ({len(frame)} rows, this one has "
                               f"{len(labels)} images); rerun `python -m competition.folds --force` for it")
    train_rows, val_rows = fold_rows(frame["fold"].to_numpy(), cfg, path)
    reserve = folds.reserve_id(folds.measure_rows(frame))
    if cfg["fold"] == -1:
        return train_rows, val_rows, reserve
    n_classes = int(labels.max()) + 1
    for rows, what in ((train_rows, "training folds"), (val_rows, f"held-out fold {cfg['fold']}")):
        absent = np.setdiff1d(np.arange(n_classes), labels[rows])
        if len(absent):  # its accuracy would not measure those classes, and the OOF logits would not cover them
            raise CompetitionError(f"{path}: the {what} hold no image of class(es) {absent[:10].tolist()}: make "
                                   f"stratified folds with fewer splits (python -m competition.folds --k 2 --force) "
                                   f"or add images of those classes")
    return train_rows, val_rows, reserve


def ood_check_seed(cfg: dict) -> int:
    """The seed of a fold's corrupted check images: the fold's alone, so every run held out on
    that fold (any seed, any preset) is checked, selected and ensembled on the same images."""
    return 10_000 + int(cfg["fold"])


def ood_check_cells(val_rows: np.ndarray, n: int, seed: int, cells: int) -> np.ndarray:
    """(cells, n) held-out rows, sorted per row: each corruption and severity gets its own n
    images (repeating only when the fold has fewer than cells * n). Why not the same n images in
    every cell: the estimate's noise would then be that of n images, not of cells * n (with
    n = 100, +-4 points), and weights fitted on it chase those few images. A larger n keeps a
    smaller n's rows as the first of each cell, so runs with other ood_check sizes still share rows."""
    order = np.random.default_rng(seed).permutation(np.asarray(val_rows))
    return np.sort(np.resize(order, cells * n).reshape(n, cells).T, axis=1)


def ood_check_set(cfg: dict, images: np.ndarray, labels: np.ndarray, val_rows: np.ndarray):
    """(held-out rows (19 * 5, n), their corrupted copies (19 * 5 * n, H, W, 3), labels) for ood_check."""
    from competition import corruptions

    seed = ood_check_seed(cfg)
    cells = ood_check_cells(val_rows, cfg["ood_check"], seed, len(corruptions.CORRUPTIONS) * corruptions.SEVERITIES)
    copies = corruptions.corrupted_copies(images, seed, cache_dir=Path(cfg["data_dir"]) / "cache", cells=cells)
    return cells, copies, labels[cells].reshape(-1)


def cpu_aug_at(cfg: dict, epoch: int) -> str:
    """The per-image CPU augmentation at `epoch` (cfg cpu_aug, strong from strong_aug_epoch)."""
    late = cfg["strong_aug_epoch"] is not None and epoch >= cfg["strong_aug_epoch"]
    return "strong" if late else cfg["cpu_aug"]


def train_size_at(cfg: dict, epoch: int, image_size: int) -> int:
    """Training image size at `epoch` under progressive resizing (cfg train_sizes)."""
    size = image_size
    for start, s in sorted((int(k), v) for k, v in (cfg.get("train_sizes") or {}).items()):
        if epoch >= start:
            size = s
    return size


class TrainData:
    """The run's images in memory, its row sets, and its DataLoaders.

    Rows: `train_rows` (the training folds, or a subset), `val_rows` (the whole held-out fold:
    the OOF logits), `val_check_rows` (what each epoch evaluates), `train_eval_rows` (clean
    accuracy on training images). `loader(epoch)` returns that epoch's training loader; one is
    made per (batch size, CPU augmentation, image size) of the schedule and reused, and its
    shuffle is reseeded from (seed, epoch), so an epoch's order does not depend on resuming."""

    def __init__(self, cfg: dict, accelerator):
        self.cfg, self.acc = cfg, accelerator
        # Evaluation batches per process: at least the training one (no gradients: it fits), at least 256.
        self.eval_batch = max(process_batch(cfg, cfg["batch_size"], accelerator.num_processes), 256)
        # One process downloads and extracts (CIFAR, an image-folder tarball) while the others
        # wait, then they read its files: N processes writing one path at once corrupt it.
        with accelerator.main_process_first():
            ds = data.load(cfg["dataset"], "train", cfg["data_dir"], cfg.get("data"))
        if len(ds.classes) < 2:
            raise CompetitionError(f"{cfg.get('data') or cfg['dataset']}: {len(ds.classes)} class ({ds.classes}); a "
                                   f"classifier needs at least 2 (an image folder holds one sub-folder per class)")
        self.images, self.labels, self.classes = ds.images, ds.labels, list(ds.classes)
        self.data_sha1 = data_id(ds)  # the source data, before any pseudo-labels
        train_rows, self.val_rows, self.measure_reserve = split_rows(cfg, ds.labels, accelerator)
        self.train_rows = data.sample_rows(train_rows, cfg["train_subset"], cfg["seed"])
        self.soft = None  # (N, C) soft targets of every row when pseudo-labelled images join the training set
        if cfg.get("pseudo"):
            self._add_pseudo(cfg["pseudo"], len(ds.classes))
        self.val_check_rows = data.sample_rows(self.val_rows, cfg["val_subset"], cfg["seed"] + 1)
        n = int(cfg.get("eval_train") or 0)
        self.train_eval_rows = data.sample_rows(self.train_rows, n, cfg["seed"] + 2) if n else np.arange(0)
        self.val_loader = self.eval_loader(self.val_check_rows) if len(self.val_check_rows) else None
        self.train_eval_loader = self.eval_loader(self.train_eval_rows) if len(self.train_eval_rows) else None
        self.ood_rows, self.ood_loader = np.zeros((0, 0), np.int64), None
        if cfg.get("ood_check") and len(self.val_rows):
            self.ood_rows, images, labels = ood_check_set(cfg, self.images, self.labels, self.val_rows)
            self.ood_loader = accelerator.prepare(eval_loader(images, np.arange(len(images)), labels,
                                                              self.eval_batch))
        self._sized: dict[int, np.ndarray] = {}
        self._loaders: dict[tuple, object] = {}
        self._shuffle = torch.Generator()

    def _add_pseudo(self, path, n_classes: int) -> None:
        """Append the pseudo-labelled OOD images of `path` (competition.selftrain writes it) to the
        training rows, with their soft targets; the labelled rows get one-hot targets."""
        from competition.files import read_npz

        z = read_npz(path, ("images", "probs"), "a pseudo-label file written by competition.selftrain")
        images, probs = z["images"], z["probs"].astype(np.float32)
        if images.shape[1:] != self.images.shape[1:] or probs.shape != (len(images), n_classes):
            raise CompetitionError(f"{path}: images {images.shape} / targets {probs.shape} do not fit this data set "
                                   f"({self.images.shape[1:]} images, {n_classes} classes)")
        n = len(self.images)
        self.soft = np.concatenate([np.eye(n_classes, dtype=np.float32)[self.labels], probs])
        self.images = np.concatenate([self.images, images])
        self.labels = np.concatenate([self.labels, probs.argmax(1)])
        self.train_rows = np.concatenate([self.train_rows, n + np.arange(len(images))])

    def targets(self, pos: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Soft targets of a training batch (positions in train_rows), label smoothing applied."""
        t = torch.from_numpy(self.soft[self.train_rows[pos.cpu().numpy()]])
        t = t * (1 - smoothing) + smoothing / t.shape[1]
        return t.pin_memory() if torch.cuda.is_available() else t  # pinned: the upload does not block the host

    def eval_loader(self, rows: np.ndarray):
        return self.acc.prepare(eval_loader(self.images, rows, self.labels, self.eval_batch))

    def images_at(self, size: int) -> np.ndarray:
        """The images at a training size below the stored one, resized once (not every batch:
        10% of a 24 px CPU step). Only shrinking: a 32 -> 224 copy would not fit in memory."""
        if size >= self.images.shape[1]:
            return self.images
        if size not in self._sized:
            self._sized[size] = augment.shrink_images(self.images, size)
        return self._sized[size]

    def loader(self, epoch: int, image_size: int):
        """(loader, batch size, CPU augmentation, image size) of `epoch`."""
        cfg = self.cfg
        bs, kind, size = optim.batch_size_at(cfg, epoch), cpu_aug_at(cfg, epoch), train_size_at(cfg, epoch, image_size)
        micro = process_batch(cfg, bs, self.acc.num_processes)
        if (bs, kind, size) not in self._loaders:
            workers = cfg["workers"] if kind not in (None, "none") else 0
            dl = torch.utils.data.DataLoader(
                ImageRows(self.images_at(size), self.train_rows, self.labels, augment.cpu_pipeline(kind)),
                batch_size=micro, sampler=torch.utils.data.RandomSampler(range(len(self.train_rows)),
                                                                         generator=self._shuffle),
                drop_last=len(self.train_rows) >= micro * self.acc.num_processes, collate_fn=as_batch,
                num_workers=workers, pin_memory=torch.cuda.is_available(),
                worker_init_fn=functools.partial(seed_worker, process=self.acc.process_index))
            self._loaders[(bs, kind, size)] = self.acc.prepare(dl)
        self._shuffle.manual_seed(cfg["seed"] * 100_003 + epoch)
        loader = self._loaders[(bs, kind, size)]
        transform = loader.dataset.transform
        if transform is not None and not loader.num_workers:  # in this process: seeded per (seed, epoch, rank)
            transform.set_random_seed(int(np.random.SeedSequence([cfg["seed"], epoch, self.acc.process_index])
                                          .generate_state(1)[0]))
        return loader, bs, kind, size


def process_batch(cfg: dict, global_batch: int, processes: int) -> int:
    """Images per process per forward pass for a global batch (cfg batch_size = images per
    optimizer update, all processes and accumulation steps together). The global batch is held
    constant, so a run means the same updates at the same lr on 1 GPU or 8 (no lr scaling rule
    to apply); it must split evenly."""
    parts = processes * cfg["grad_accum"]
    if global_batch % parts:
        raise CompetitionError(f"batch_size={global_batch} (the global batch: images per optimizer update) does not "
                               f"split over {processes} process(es) x grad_accum {cfg['grad_accum']}; choose a "
                               f"multiple of {parts}")
    micro = global_batch // parts
    if (cfg.get("mixup") or cfg.get("cutmix")) and micro % 2:
        raise CompetitionError(f"batch_size={global_batch} gives {micro} images per process and step, odd; mixup/cutmix "
                               f"pair images within a batch: choose a multiple of {2 * parts}")
    return micro


def seed_worker(worker_id: int, process: int = 0) -> None:
    """worker_init_fn: albumentations keeps its own random state, which DataLoader's worker
    seeding does not touch, so without this every worker (and every epoch, and every process)
    would repeat the same augmentations. torch gives each worker of each epoch its own seed
    (drawn from the checkpointed global RNG); the process index separates DDP ranks."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(int(np.random.SeedSequence([info.seed % 2**32, process]).generate_state(1)[0]))


def resolve_data_config(cfg: dict, td: TrainData) -> dict:
    """What the data decides, kept apart from the user's config (timm's resolve_data_config
    idea): the classes, the input statistics of the training images, the model's image size."""
    mean, std = augment.input_stats(td.images[td.train_rows], cfg["norm"])
    if cfg.get("init_from"):  # fine-tuning: the weights expect the inputs they were trained on
        source = RunDir(cfg["init_from"]).data_config()
        mean, std = source["mean"], source["std"]
    out = {"num_classes": len(td.classes), "classes": td.classes, "mean": mean, "std": std,
           "image_size": int(cfg["image_size"] or td.images.shape[1]), "channels_last": bool(cfg["channels_last"])}
    if td.ood_rows.size:
        out["ood_check_seed"] = ood_check_seed(cfg)
    if td.measure_reserve:  # the images score's leak check knows this run never saw
        out["measure_reserve"] = td.measure_reserve
    out["data_sha1"] = td.data_sha1
    out["source_image_size"] = list(td.images.shape[1:3])  # OOD files must hold images of this size
    return out


def data_id(ds) -> str:
    """A short fingerprint of a data set's images and labels (data.fingerprint of each)."""
    return data.fingerprint(ds.images)[:16] + data.fingerprint(ds.labels)[:8]


def check_same_data(run: RunDir, cfg: dict, current: str | None = None) -> None:
    """Refuse to skip or resume a run whose data changed behind the same path since it trained
    (its data_config records the fingerprint; runs from before it have none and pass)."""
    if not (run / RunDir.DATA_CONFIG).exists():
        return
    recorded = run.data_config().get("data_sha1")
    if recorded is None:
        return
    if current is None:
        ds = data.load(cfg["dataset"], "train", cfg["data_dir"], cfg.get("data"))
        current = data_id(ds)
    if current != recorded:
        raise CompetitionError(f"{run} was trained on other images than {cfg.get('data') or cfg['dataset']} holds now "
                               f"(data fingerprint {recorded} then, {current} now): --force retrains it on these, "
                               f"name=NEW trains a new run")


# ---------------------------------------------------------------------------- model, optimizer, schedule


@dataclass
class Learner:
    """What one optimizer update touches. `model` is Accelerate-prepared (DDP-wrapped when
    distributed), `net` the bare module (for unfreezing, EMA and state dicts)."""
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: object
    batch_aug: augment.BatchAugment
    loss_fn: nn.Module
    n_params: int

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation uses: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.net


def make_learner(cfg: dict, data_cfg: dict, accelerator) -> Learner:
    """Model, optimizer (timm parameter groups), per-update timm schedule, EMA, batch
    augmentation and loss, placed on the device by Accelerate."""
    with accelerator.main_process_first():  # one process fetches hub weights; the others read its cache
        model = models.model_from_config(cfg, data_cfg["num_classes"])
    if cfg.get("init_from"):
        model.load_state_dict(RunDir(cfg["init_from"]).load_weights("best")["model"])
    n_params = sum(p.numel() for p in model.parameters())
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # The bare module, kept before compile and prepare wrap it: unfreezing, EMA, evaluation and
    # state dicts use its parameter names (unwrap_model would keep torch.compile's wrapper, and
    # every name would gain `_orig_mod.`).
    net = model
    optimizer = optim.make_optimizer(net, cfg)
    scheduler = optim.make_scheduler(optimizer, cfg)
    if cfg["compile"]:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if cfg["ema"]:
        from timm.utils import ModelEmaV3
        # Built from the prepared (on-device) module: a copy on the same device keeps timm's
        # batched foreach update (one given device= from a CPU model falls back to a per-tensor loop).
        ema = ModelEmaV3(net, decay=cfg["ema"])
    batch_aug = augment.BatchAugment(cfg, data_cfg["num_classes"], data_cfg["std"])
    if cfg["mixup"] or cfg["cutmix"] or cfg.get("pseudo"):
        from timm.loss import SoftTargetCrossEntropy
        loss_fn = SoftTargetCrossEntropy()  # Mixup (or TrainData.targets) already folded label smoothing in
    elif cfg.get("jsd"):
        from timm.loss import JsdCrossEntropy
        loss_fn = JsdCrossEntropy(num_splits=3, alpha=cfg["jsd"], smoothing=cfg["label_smoothing"] or None)
    else:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"] or 0.0)
    return Learner(model, net, optimizer, scheduler, ema, batch_aug, loss_fn, n_params)


class LoopState:
    """Everything of the loop that must survive a resume, checkpointed with Accelerate."""

    def __init__(self):
        self.epoch, self.updates, self.best_acc, self.best_epoch, self.bad_epochs = 0, 0, -1.0, -1, 0
        self.history: list[dict] = []
        # A checkpoint taken mid-epoch (a stop request): batches done in `epoch` and their running sums.
        self.step, self.partial = 0, {}
        self.loop_s = 0.0  # seconds spent in epochs, summed over every session of a resumed run
        self.processes = None  # how many processes trained up to the checkpoint

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def restore(run: RunDir, learner: Learner, accelerator, resume: bool) -> LoopState:
    """The loop state, registered for checkpointing with the schedule and EMA (timm schedulers
    stay out of prepare: Accelerate would step them once per process); loaded from the latest
    checkpoint when resuming."""
    state = LoopState()
    portable_checkpoints(accelerator, learner.net)
    accelerator.register_for_checkpointing(learner.scheduler, state)
    if learner.ema is not None:
        accelerator.register_for_checkpointing(learner.ema)
    if resume:
        ckpt = newest_complete_checkpoint(run, 2 + (learner.ema is not None), accelerator)
        try:
            accelerator.load_state(str(ckpt))
        except ValueError as e:
            if "parameter group" not in str(e):
                raise
            raise CompetitionError(f"--resume: {ckpt} holds optimizer state for other parameter groups than this "
                                   f"code makes (saved before one-lr-per-stage layer_decay?): it cannot continue "
                                   f"exactly; retrain with --force") from None
        # With automatic naming the next save would otherwise reuse checkpoint_0 and collide.
        accelerator.project_configuration.iteration = int(ckpt.name.split("_")[-1]) + 1
        where = f"epoch {state.epoch + 1} step {state.step}" if state.step else f"the end of epoch {state.epoch}"
        accelerator.print(f"resumed from {ckpt} at {where}")
        if state.processes not in (None, accelerator.num_processes):
            accelerator.print(f"the checkpoint was written by {state.processes} process(es), this run has "
                              f"{accelerator.num_processes}: weights, optimizer, schedule and global batch continue; "
                              f"the data order and augmentation draws from here on differ from an uninterrupted run")
    state.processes = accelerator.num_processes
    return state


def bare_name(key: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def portable_checkpoints(accelerator, net: nn.Module) -> None:
    """Checkpoints hold the bare module's parameter names and load into the bare module.
    Accelerate saves the *wrapped* model's state dict, so a checkpoint written by N processes
    (DDP: `module.` prefixes) or with compile (`_orig_mod.`) would not load into a run with
    another process count or compile setting; these hooks make it load into any (and still
    read checkpoints saved before them)."""
    def save(models_, weights, output_dir):
        for i, w in enumerate(weights):
            weights[i] = {bare_name(k): v.contiguous() for k, v in w.items()}  # channels-last: safetensors wants contiguous

    def load(models_, input_dir):
        net.load_state_dict({bare_name(k): v for k, v in RunDir.checkpoint_weights(Path(input_dir)).items()})
        models_.clear()  # loaded here: Accelerate must not load them again into the wrapped model

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def newest_complete_checkpoint(run: RunDir, custom: int, accelerator) -> Path:
    """The newest checkpoint whose every file loads; newer broken ones (a crash mid-save, a
    truncated copy) are moved to broken-checkpoints/ with a message, so the next save cannot
    collide with them and nothing is silently resumed inexactly."""
    found = run.checkpoints()
    problems = {c: RunDir.checkpoint_problem(c, custom) for c in reversed(found)}
    good = next((c for c, why in problems.items() if why is None), None)
    broken = [c for c, why in problems.items() if why is not None and (good is None or c.name > good.name)]
    for c in broken:
        accelerator.print(f"{c} cannot be resumed from ({problems[c]}); "
                          f"{'falling back to ' + good.name if good else 'and no older checkpoint loads either'}")
    accelerator.wait_for_everyone()
    if good is None:
        raise CompetitionError(f"--resume: no checkpoint in {run.checkpoint_dir} loads completely "
                               f"({'; '.join(f'{c.name}: {w}' for c, w in problems.items())}); retrain with --force")
    if accelerator.is_main_process:
        for c in broken:
            (run / "broken-checkpoints").mkdir(exist_ok=True)
            shutil.move(str(c), str(run / "broken-checkpoints" / c.name))
    accelerator.wait_for_everyone()
    return good


def start_trackers(run: RunDir, cfg: dict, accelerator) -> None:
    if not cfg["log_with"]:
        return
    try:
        accelerator.init_trackers(run.name.replace("/", "_"), config={
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()})
    except Exception as e:
        raise CompetitionError(f"log_with={cfg['log_with']}: could not start the tracker ({e}); "
                               f"pip install {cfg['log_with']}, or drop log_with") from None


# ---------------------------------------------------------------------------- one epoch


def train_input(images: torch.Tensor, cfg: dict, prep: dict, size: int) -> torch.Tensor:
    """A uint8 (B, H, W, 3) training batch -> the model's float input at `size`: random flip and
    shift (cfg flip, translate), AugMix when set, then to_input. The loop and step_throughput
    both use this."""
    x = augment.flip_translate(images, cfg["flip"], cfg["translate"])
    if cfg.get("augmix"):  # with jsd: clean + 2 AugMix views, stacked (JsdCrossEntropy splits them)
        views = augment.augmix_views(x, 2 if cfg.get("jsd") else 1, cfg.get("augmix_severity", 3))
        x = torch.cat([x, *views]) if cfg.get("jsd") else views[0]
    return augment.to_input(x, prep["mean"], prep["std"], size, prep["channels_last"])


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop at the next step and checkpoint (a second Ctrl-C
    stops at once). With several processes the request is shared every 25 steps, so every
    rank stops at the same step."""

    def __init__(self):
        self.name, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\n{self.name}: stopping after this step and saving a checkpoint (again to stop at once)",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def now(self, accelerator, step: int) -> bool:
        if accelerator.num_processes == 1:
            return self.name is not None
        if step % 25:
            return False
        flag = torch.tensor(float(self.name is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0


def epoch_batches(loader, state: LoopState, accelerator):
    """The epoch's batches, from the step a mid-epoch checkpoint stopped at. Starting a
    DataLoader iterator (its first batch) draws its workers' base seed from the global RNG; the
    interrupted process had already drawn it for this epoch, so the draw is undone here to keep
    the RNG stream exact."""
    if not state.step:
        yield from loader
        return
    batches = iter(accelerator.skip_first_batches(loader, state.step))
    rng = torch.get_rng_state()
    first = next(batches, None)
    torch.set_rng_state(rng)
    if first is not None:
        yield first
        yield from batches


def train_one_epoch(learner: Learner, loader, cfg: dict, data_cfg: dict, size: int, state: LoopState,
                    accelerator, run: RunDir, stop: StopRequest, soft=None) -> dict | None:
    """One pass over the training loader; the schedule steps per update. Returns the running
    loss and accuracy (over every process) and the images seen; None when a stop request
    ended the epoch early (state.step and state.partial then say where, for the checkpoint)."""
    model, optimizer, epoch = learner.model, learner.optimizer, state.epoch
    model.train()
    models.frozen_norms_to_eval(learner.net)  # frozen stages keep their running statistics
    t0, steps, p = time.time(), len(loader), state.partial
    seen = int(p.get("seen", 0))
    loss_sum = torch.tensor(float(p.get("loss_sum", 0.0)), device=accelerator.device)
    correct = torch.tensor(float(p.get("correct", 0.0)), device=accelerator.device)
    bar = runtime.progress(steps, f"epoch {epoch + 1}/{cfg['epochs']}", accelerator.is_main_process and cfg["progress"],
                           initial=state.step, leave=False)
    for i, (x, y, pos) in enumerate(epoch_batches(loader, state, accelerator), start=state.step):
        if stop.now(accelerator, i):
            state.step, state.partial = i, {"seen": seen, "loss_sum": loss_sum.item(), "correct": correct.item()}
            bar.close()
            return None
        with accelerator.accumulate(model):
            x = train_input(x, cfg, data_cfg, size)
            x, target = learner.batch_aug(x, y)
            if soft is not None:  # pseudo-labelled images: soft targets for every row
                target = soft(pos, cfg["label_smoothing"] or 0.0).to(x.device, non_blocking=True)
            y = y[: len(x)]
            logits = model(x)
            loss = learner.loss_fn(logits, target)
            accelerator.backward(loss)
            if cfg["grad_clip"] and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            state.updates += 1
            learner.scheduler.step_update(epoch + (i + 1) / steps)
            if learner.ema is not None:
                learner.ema.update(learner.net, step=state.updates)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach()[: len(y)].argmax(1) == y).sum()  # with jsd: the clean third
        seen += len(y)
        if i % 25 == 0 or i == steps - 1:
            if not torch.isfinite(loss_sum):  # checked every 25 steps: each check is a device sync
                raise CompetitionError(
                    f"{run}: the training loss became {loss_sum.item()} in epoch {epoch + 1} (step {i}); "
                    f"lower lr (now {cfg['lr']}), set grad_clip=1.0 or mixed_precision=no, then rerun with "
                    f"--force (or --resume from the last good epoch)")
            bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.3f}", lr=f"{_lr(optimizer):.2g}")
        bar.update(1)
    bar.close()
    state.step, state.partial = 0, {}
    seen_all = accelerator.reduce(torch.tensor(float(seen), device=accelerator.device), "sum").item()
    return {"train_loss": accelerator.reduce(loss_sum, "sum").item() / max(seen_all, 1),
            "train_acc": accelerator.reduce(correct.float(), "sum").item() / max(seen_all, 1),
            "images": seen_all, "seconds": time.time() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, loader, data_cfg: dict, accelerator, views=None):
    """(logits, labels, positions, TTA logits) of every sample in `loader`, as numpy, gathered
    across processes (gather_for_metrics drops the samples padded onto the last shard). With
    `views` (TTA views) the 4th array holds the logits averaged over them; the plain logits
    come from the same pass (the identity view). Positions index the loader's rows."""
    model.eval()
    wanted = list(views or [])
    passes = [tta.IDENTITY] + [v for v in wanted if v != tta.IDENTITY]
    outs, ys, pos, ttas = [], [], [], []
    for x, y, p in loader:
        with accelerator.autocast():
            per_view = tta.view_logits(model, x, data_cfg, passes)
        logits, y, p = accelerator.gather_for_metrics((per_view[0], y, p))
        outs.append(logits.cpu()), ys.append(y.cpu()), pos.append(p.cpu())
        if wanted:
            avg = torch.stack([per_view[passes.index(v)] for v in wanted]).mean(0)
            ttas.append(accelerator.gather_for_metrics(avg).cpu())
    if not outs:
        empty = np.zeros((0, data_cfg["num_classes"]), np.float32)
        return empty, np.zeros(0, np.int64), np.zeros(0, np.int64), empty
    cat = lambda ts: torch.cat(ts).numpy()  # noqa: E731
    return cat(outs), cat(ys), cat(pos), cat(ttas) if ttas else np.zeros((0, data_cfg["num_classes"]), np.float32)


def loss_acc(model: nn.Module, loader, data_cfg: dict, accelerator) -> tuple[float, float]:
    if loader is None:
        return float("nan"), float("nan")
    logits, labels, _, _ = evaluate(model, loader, data_cfg, accelerator)
    return metrics.log_loss(logits, labels), metrics.accuracy(logits, labels)


class MetricsWriter:
    """metrics.csv every epoch; curves.png at most once a minute and at the end (a matplotlib
    figure costs ~1 s on a CPU)."""

    def __init__(self, run: RunDir):
        self.run, self.last_plot = run, time.time()

    def write(self, history: list[dict], final: bool = False) -> None:
        from competition.files import atomic_path

        frame = pd.DataFrame(history)
        with atomic_path(self.run.metrics_csv, ".csv") as tmp:
            frame.to_csv(tmp, index=False)
        if final or time.time() - self.last_plot >= 60:
            plots.plot_run(frame, self.run.curves_png, title=self.run.name)
            self.last_plot = time.time()


def end_of_epoch(run: RunDir, cfg: dict, data_cfg: dict, td: TrainData, learner: Learner, state: LoopState,
                 accelerator, stats: dict, epoch_start: float, writer: MetricsWriter, bs: int, kind: str,
                 size: int) -> str | None:
    """Evaluate, keep best.pt, write the metrics row and the checkpoint, print the epoch line.
    Returns why the loop stops after this epoch ("stop_after", "patience") or None."""
    epoch, eval_model = state.epoch, learner.eval_model
    val_loss, val_acc = loss_acc(eval_model, td.val_loader, data_cfg, accelerator)
    row = dict(epoch=epoch + 1, lr=_lr(learner.optimizer), batch_size=bs, image_size=size, updates=state.updates,
               cpu_aug=kind, train_loss=stats["train_loss"], train_acc=stats["train_acc"], val_loss=val_loss,
               val_acc=val_acc)
    if td.train_eval_loader is not None:
        row["train_eval_loss"], row["train_eval_acc"] = loss_acc(eval_model, td.train_eval_loader, data_cfg,
                                                                 accelerator)
    if td.ood_loader is not None:
        row["ood_loss"], row["ood_acc"] = loss_acc(eval_model, td.ood_loader, data_cfg, accelerator)
    row.update(epoch_time_s=round(time.time() - epoch_start, 2),
               images_per_s=round(stats["images"] / stats["seconds"], 1))
    state.history.append(row)
    state.epoch += 1
    state.loop_s += time.time() - epoch_start
    # best.pt: the best held-out accuracy, clean or corrupted (select_on); a tie goes to the later
    # epoch (trained longer, at a lower learning rate); patience counts epochs without a strictly
    # better one, and the epoch line marks those with `*`.
    acc = row["ood_acc"] if cfg.get("select_on") == "ood" else val_acc
    checked = td.val_loader is not None
    improved = not checked or acc >= state.best_acc
    strictly = checked and acc > state.best_acc
    state.bad_epochs = 0 if not checked or strictly else state.bad_epochs + 1
    if improved:
        state.best_acc, state.best_epoch = acc, epoch + 1
    if accelerator.is_main_process:
        if improved:
            run.save_weights("best", _state_dict(eval_model), cfg, data_cfg, row)
        writer.write(state.history)
    accelerator.save_state()
    if cfg["log_with"]:
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
    eta = (cfg["epochs"] - state.epoch) * (time.time() - epoch_start)
    accelerator.print(
        f"epoch {epoch + 1}/{cfg['epochs']}  loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  val_loss "
        f"{val_loss:.4f} val_acc {val_acc:.4f}  lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s "
        f"{row['images_per_s']:.0f} img/s  ETA {eta / 60:.1f} min" + (f"  ood_acc {row['ood_acc']:.4f}" if "ood_acc" in row
                                                                  else "") + ("  *" if strictly else ""))
    if cfg["stop_after"] and state.epoch >= cfg["stop_after"] and state.epoch < cfg["epochs"]:
        return "stop_after"
    if cfg["patience"] and state.bad_epochs >= cfg["patience"]:
        accelerator.print(f"early stop: no better {'ood' if cfg.get('select_on') == 'ood' else 'val'}_acc for "
                          f"{cfg['patience']} epochs (best {state.best_acc:.4f} at epoch {state.best_epoch})")
        return "patience"
    return None


def write_oof(run: RunDir, cfg: dict, data_cfg: dict, td: TrainData, learner: Learner, state: LoopState,
              accelerator, writer: MetricsWriter) -> dict:
    """last.pt and the final curves, then the out-of-fold logits of the best weights over the
    whole held-out fold (and their accuracy under the config's oof_tta). Returns summary figures."""
    summary = dict(epochs=state.epoch, updates=state.updates)
    accelerator.wait_for_everyone()
    eval_model = learner.eval_model
    if accelerator.is_main_process:
        run.save_weights("last", _state_dict(eval_model), cfg, data_cfg, state.history[-1] if state.history else {})
        if state.history:
            writer.write(state.history, final=True)
    accelerator.wait_for_everyone()
    if not len(td.val_rows):
        return summary
    eval_model.load_state_dict(run.load_weights("best")["model"])
    views = tta.parse_tta(cfg["oof_tta"])
    views = views if tta.tta_name(views) != "none" else None
    logits, labels, pos, tta_logits = evaluate(eval_model, td.eval_loader(td.val_rows), data_cfg, accelerator, views)
    rows = td.val_rows[pos]
    if accelerator.is_main_process:
        order = np.argsort(rows)
        run.save_oof(rows[order], logits[order])
    if td.ood_loader is not None:
        ood_logits, ood_labels, ood_pos, _ = evaluate(eval_model, td.ood_loader, data_cfg, accelerator)
        if accelerator.is_main_process:
            run.save_oof_ood(td.ood_rows, ood_logits[np.argsort(ood_pos)])
        summary.update(oof_ood_images=len(ood_labels), oof_ood_accuracy=metrics.accuracy(ood_logits, ood_labels))
    oof_loss, oof_acc = metrics.log_loss(logits, labels), metrics.accuracy(logits, labels)
    accelerator.print(f"out-of-fold: {len(rows)} images, accuracy {oof_acc:.4f}, loss {oof_loss:.4f} (best epoch "
                      f"{state.best_epoch})")
    summary.update(oof_images=len(rows), oof_accuracy=oof_acc, oof_loss=oof_loss, best_epoch=state.best_epoch)
    if views:
        # The accuracy a submission made with this TTA would have; the logits themselves come
        # from competition.predict (pred/<setting>/oof.npy), next to the OOD ones.
        tta_acc = metrics.accuracy(tta_logits, labels)
        accelerator.print(f"out-of-fold with TTA {cfg['oof_tta']} ({len(views)} views): accuracy {tta_acc:.4f}")
        summary.update(oof_tta=cfg["oof_tta"], oof_tta_accuracy=tta_acc)
    return summary


# ---------------------------------------------------------------------------- the run


def train(cfg: dict, resume: bool = False, force: bool = False, command: str | None = None) -> Path:
    """Train the run `cfg` describes (cfg is not modified); returns its folder. `command` is how
    the user started it, for the resume hint after a stop request."""
    check_config(cfg)
    run = RunDir.for_config(cfg)
    accelerator = make_accelerator(cfg, run)
    for epoch in range(cfg["epochs"]):  # the batch schedule must split over these processes: say so now
        process_batch(cfg, optim.batch_size_at(cfg, epoch), accelerator.num_processes)
    aside = prepare_run_folder(run, cfg, accelerator, resume, force)
    if aside is False:
        check_same_data(run, cfg)
        return run.path
    try:
        with StopRequest() as stop:
            return run_training(run, cfg, accelerator, resume, stop, aside, command)
    except BaseException:
        if aside is not None and aside.exists() and accelerator.is_main_process:
            shutil.rmtree(run.path, ignore_errors=True)  # the new run did not finish an epoch: the old one is back
            aside.rename(run.path)
            print(f"the new run stopped before finishing an epoch; the previous {run} is restored", file=sys.stderr)
        raise
    finally:
        if accelerator.is_main_process:
            run.release_lock()


def run_training(run: RunDir, cfg: dict, accelerator, resume: bool, stop: StopRequest, aside: Path | None,
                 command: str | None) -> Path:
    """The run, top to bottom, once its folder is claimed (see the module docstring)."""
    from accelerate.utils import set_seed

    t_start = time.time()
    set_seed(cfg["seed"])
    td = TrainData(cfg, accelerator)
    if resume:
        check_same_data(run, cfg, td.data_sha1)
    data_cfg = resolve_data_config(cfg, td)
    if accelerator.is_main_process:
        run.save_configs(cfg, data_cfg)
    accelerator.print(
        f"run {run}: {cfg['model']} on {cfg['dataset']} fold {cfg['fold']}: {len(td.train_rows)} train / "
        f"{len(td.val_rows)} held-out images, {data_cfg['num_classes']} classes, {accelerator.num_processes} "
        f"process(es) on {accelerator.device}, {_precision(accelerator)}")
    learner = make_learner(cfg, data_cfg, accelerator)
    state = restore(run, learner, accelerator, resume)
    start_trackers(run, cfg, accelerator)
    accelerator.print(
        f"{cfg['model']}: {learner.n_params / 1e6:.2f} M parameters; {cfg['epochs']} epochs, {cfg['optimizer']} lr "
        f"{cfg['lr']}, {cfg['sched']} schedule; batch {cfg['batch_size']} per update (global) = "
        f"{accelerator.num_processes} process(es) x {process_batch(cfg, cfg['batch_size'], accelerator.num_processes)} "
        f"images x {cfg['grad_accum']} accumulation step(s); the global batch is held constant on any number of "
        f"processes, so lr needs no scaling")

    writer, why = MetricsWriter(run), None
    while state.epoch < cfg["epochs"] and why is None:
        epoch_start = time.time()
        if cfg["unfreeze"]:
            prefixes = models.unfrozen_prefixes(cfg["unfreeze"], state.epoch)
            n_open = models.set_trainable(learner.net, prefixes)
            accelerator.print(f"epoch {state.epoch + 1}: training {'all' if prefixes is None else prefixes} "
                              f"({n_open} tensors)")
        loader, bs, kind, size = td.loader(state.epoch, data_cfg["image_size"])
        stats = train_one_epoch(learner, loader, cfg, data_cfg, size, state, accelerator, run, stop,
                                td.targets if td.soft is not None else None)
        if stats is None:  # a stop request mid-epoch: checkpoint where it is
            state.loop_s += time.time() - epoch_start
            accelerator.save_state()
            why = "signal"
            break
        why = end_of_epoch(run, cfg, data_cfg, td, learner, state, accelerator, stats, epoch_start, writer, bs,
                           kind, size)
        if aside is not None and aside.exists() and accelerator.is_main_process:
            shutil.rmtree(aside)  # --force: the new run has finished an epoch; the old one goes now
        why = why or ("signal" if stop.name else None)
    if why == "signal":
        resume_hint = f"`{command} --resume`" if command else "the same command with --resume (without --force)"
        raise files.Interrupted(f"{stop.name} in epoch {state.epoch + (1 if state.step else 0)}"
                                f"{f' at step {state.step}' if state.step else ''}; checkpoint saved in "
                                f"{run.latest_checkpoint()}; continue exactly with {resume_hint}")
    if why == "stop_after":
        accelerator.print(f"stop_after={cfg['stop_after']}: stopping after epoch {state.epoch}; continue with "
                          f"--resume")
        return run.path

    summary = write_oof(run, cfg, data_cfg, td, learner, state, accelerator, writer)
    if cfg["log_with"]:
        accelerator.end_training()
    from competition.corruptions import trained_on

    summary["trained_on"] = trained_on(cfg)  # the CIFAR-C corruptions whose family training saw
    # The precision auto resolved to on this machine: the config says only "auto".
    summary.update(precision=_precision(accelerator), training_loop_s=round(state.loop_s, 1),
                   total_s=round(time.time() - t_start, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                   **runtime.provenance())
    if accelerator.is_main_process:
        run.save_summary(summary)  # last: its presence marks the run finished
    accelerator.print(f"done: {run}  training loop {state.loop_s:.1f} s, total {summary['total_s']:.1f} s")
    return run.path


def _precision(accelerator) -> str:
    mp = accelerator.mixed_precision
    return "fp32" if mp == "no" else f"{mp} autocast"


def _lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _state_dict(model: nn.Module) -> dict:
    sd = model.state_dict()
    return {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in sd.items()}


# ---------------------------------------------------------------------------- batch size finder


def step_throughput(cfg: dict, steps: int = 5, warmup: int = 2) -> tuple[float, float]:
    """(images/s, peak GPU GiB or nan) of `steps` full training steps after `warmup`: flip/translate,
    to_input (resize, normalise), forward, backward, optimizer step, on synthetic uint8 batches
    (32x32, or already at image_size when that is smaller) of cfg batch_size: the loop's
    device-side path without data loading (a memory index).
    Used by the batch-size finder and bench/throughput.py."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = {**cfg, "pretrained": False, "weights": None}
    model = models.model_from_config(cfg, 100).to(dev)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = optim.make_optimizer(model, cfg)  # before compile: the groups go by the bare module's names
    if cfg.get("compile"):
        model = torch.compile(model)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.mixed_precision(cfg["mixed_precision"]))
    bs = cfg["batch_size"]
    # The loop trains on images shrunk once when its size is below the stored 32 px (TrainData.images_at).
    side = min(32, cfg["image_size"] or 32)
    x8 = torch.randint(0, 256, (bs, side, side, 3), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 100, (bs,), device=dev)
    prep = {"mean": [0.5] * 3, "std": [0.25] * 3, "channels_last": cfg["channels_last"]}
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            runtime.sync()
            t0 = time.perf_counter()
        x = train_input(x8, cfg, prep, cfg["image_size"] or side)
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = nn.functional.cross_entropy(model(x), y.repeat(len(x) // len(y)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    runtime.sync()
    ips = bs * steps / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return ips, mem


def find_batch_size(cfg: dict, start: int = 16, limit: int = 4096, steps: int = 5, repeats: int = 3) -> int:
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
            timings = [step_throughput({**cfg, "batch_size": bs}, steps=steps, warmup=1) for _ in range(repeats)]
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
    print(f"fastest: {best[1]} images per device ({best[0]:.0f} images/s at image_size {cfg['image_size']}); "
          f"pass batch_size={best[1]} (batch_size is global: x processes x grad_accum on several GPUs)")
    return best[1]


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", type=int, choices=(1, 2, 3), help="1 simple CNN | 2 ResNet-18 | 3 pretrained ResNet-50")
    p.add_argument("--preset", action="append", help="competition/configs/NAME.yaml (or a path); repeatable")
    p.add_argument("--fold", type=int, help="held-out fold (-1: train on every image)")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run folder under models/ (default <presets>-<dataset>-f<fold>-s<seed>)")
    p.add_argument("--weights", help="Part 3: local ImageNet ResNet-50 weights file (offline machines)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing run folder of this name and retrain")
    p.add_argument("--find-batch-size", action="store_true", help="time batch sizes on this device, then exit")
    p.add_argument("overrides", nargs="*", help="config key=value (see competition/configs/base.yaml)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after flags
    cfg = resolve(args.part, args.preset, args.overrides, fold=args.fold, seed=args.seed, name=args.name,
                  weights=args.weights)
    if args.find_batch_size:
        return find_batch_size(cfg)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--force", "--resume")]
    command = shlex.join(["python", "-m", "competition.train", *argv])
    return train(cfg, resume=args.resume, force=args.force, command=command)


if __name__ == "__main__":
    cli(main)()
