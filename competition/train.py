"""Stage 2: train one model on the training folds and write its out-of-fold logits.

    python competition/train.py --part 1                      # CPU or one GPU
    python competition/train.py --preset part1_cpu            # CIFAR-10 stand-in, 2 CPU cores, < 150 s
    accelerate launch competition/train.py --part 3 --fold 0  # every GPU of the machine
    accelerate launch --num_processes 8 competition/train.py --part 2 --fold 3 --seed 1
    python competition/train.py --part 2 epochs=30 lr=0.05 model_args.stem=imagenet image_size=64
    python competition/train.py --part 2 --resume             # continue the same run exactly
    python competition/train.py --part 3 --find-batch-size    # images/s per batch size, then exit

Config: competition/configs/base.yaml <- part<N>.yaml <- --preset NAME(s) <- key=value overrides.
The run lands in models/<presets>-f<fold>-s<seed>/ (or models/<name>/): config.yaml (resolved),
checkpoints/ (Accelerate state each epoch), best.pt, last.pt, metrics.csv, curves.png and
oof_logits.npy + oof_index.npy (the held-out fold, best weights, rows of the folds CSV).

One loop for every part and every device: Accelerate places the model, shards the batches
across processes, runs bf16 autocast on GPUs and accumulates gradients; only the main
process writes files.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch competition/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch
from torch import nn

from competition import augment, data, folds, models, optim, predict
from competition.config import load_config, save_config
from competition.files import CompetitionError, atomic_path, cli, save_json, save_npy, save_text

# ---------------------------------------------------------------------------- CPU runtime


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of handing it back to the kernel after every step.

    Each CPU training step frees and re-allocates tens of MB of activations; with glibc's
    defaults the large blocks are mmap'ed and munmap'ed every time, and page faults took a
    quarter of the wall time of a 2-core run (`sys` time). Keeping them in the heap made
    bench/throughput.py 25% faster there. No effect on GPUs (CUDA has its own caching
    allocator); a no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
                    and libc.mallopt(m_top_pad, 256 * 2**20))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------- data


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images held in memory; a batch is one fancy-index, not N __getitem__ calls.

    Returns (images uint8 (B, H, W, 3), labels int64 (B,), sample indices int64 (B,)); the
    indices let gathered predictions be matched to rows of the folds CSV."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, transform=None):
        self.images, self.labels, self.rows, self.transform = images, labels, rows, transform

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, positions):
        rows = self.rows[np.asarray(positions)]
        x = self.images[rows]
        if self.transform is not None:
            x = np.stack([self.transform(image=im)["image"] for im in x])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[rows]), torch.from_numpy(rows)

    def __getitem__(self, i):
        return self.__getitems__([i])


def _as_batch(batch):  # __getitems__ already returns the batch; keeps workers picklable
    return batch


def split_indices(cfg: dict, labels: np.ndarray, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out rows for cfg['fold'] from folds/<dataset>.csv (written with the
    defaults, k=5 seed 0, when it does not exist yet)."""
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
    fold = frame["fold"].to_numpy()
    k = int(fold.max()) + 1
    if cfg["fold"] == -1:
        return np.arange(len(labels)), np.arange(0)
    if not 0 <= cfg["fold"] < k:
        raise CompetitionError(f"fold={cfg['fold']} but {path} has folds 0..{k - 1} (or -1 to train on all)")
    return np.flatnonzero(fold != cfg["fold"]), np.flatnonzero(fold == cfg["fold"])


def subset(rows: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if not n or n >= len(rows):
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


# ---------------------------------------------------------------------------- state


class LoopState:
    """Everything of the loop that must survive a resume, checkpointed with Accelerate."""

    def __init__(self):
        self.epoch, self.updates, self.best_acc, self.best_epoch, self.bad_epochs = 0, 0, -1.0, -1, 0
        self.history: list[dict] = []

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def _latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    return found[-1] if found else None


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_loader(model: nn.Module, loader, cfg: dict, accelerator, views=None) -> tuple[torch.Tensor, ...]:
    """Logits, labels and rows of every sample in `loader`, gathered across processes
    (gather_for_metrics drops the samples padded onto the last shard). With `views` (TTA views,
    predict.parse_tta) a 4th tensor holds the logits averaged over them; the plain logits come
    from the same pass (the identity view)."""
    model.eval()
    identity = (False, 0, 0)
    wanted = list(views or [])
    passes = [identity] + [v for v in wanted if v != identity]
    outs, ys, rows, ttas = [], [], [], []
    for x, y, r in loader:
        with accelerator.autocast():
            per_view = predict.view_logits(model, x, cfg, passes)
        logits, y, r = accelerator.gather_for_metrics((per_view[0], y, r))
        outs.append(logits.cpu()), ys.append(y.cpu()), rows.append(r.cpu())
        if wanted:
            tta = torch.stack([per_view[passes.index(v)] for v in wanted]).mean(0)
            ttas.append(accelerator.gather_for_metrics(tta).cpu())
    empty = torch.zeros(0, cfg["num_classes"])
    if not outs:
        return empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), empty
    return torch.cat(outs), torch.cat(ys), torch.cat(rows), torch.cat(ttas) if ttas else empty


def loss_acc(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    if not len(labels):
        return float("nan"), float("nan")
    return (nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item())


# ---------------------------------------------------------------------------- config and run folder


def resolve(args, overrides: list[str]) -> tuple[dict, list[str]]:
    presets = [f"part{args.part}"] if args.part is not None else []
    presets += args.preset or []
    if not presets:
        presets = ["part1"]
    cfg = load_config(presets, overrides)
    for key in ("fold", "seed", "name", "weights"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.part is not None:
        cfg["part"] = args.part
    # "part1 + part1_cpu" names the run part1_cpu; "part3 + demo" names it part3-demo.
    names = [p for i, p in enumerate(presets) if not any(q.startswith(p) for q in presets[i + 1:])]
    cfg["preset"] = "-".join(Path(p).stem for p in names)
    return cfg, presets


def run_folder(cfg: dict) -> Path:
    return Path(cfg["models_dir"]) / (cfg.get("name") or f"{cfg['preset']}-f{cfg['fold']}-s{cfg['seed']}")


# Keys train() derives from the data, and keys that do not change what a run learns.
_NOT_COMPARED = {"num_classes", "classes", "mean", "std", "run_dir", "progress", "log_with", "workers", "stop_after"}


def _comparable(cfg: dict) -> dict:
    from competition.config import CONFIG_DIR, read_yaml

    # Keys added to base.yaml after a run was made count as their default, so a new knob does
    # not invalidate every finished run.
    full = {**read_yaml(CONFIG_DIR / "base.yaml"), **cfg}
    return {k: v for k, v in full.items() if k not in _NOT_COMPARED}


# ---------------------------------------------------------------------------- the loop


def train(cfg: dict, resume: bool = False, force: bool = False) -> Path:
    """Train the run `cfg` describes; returns its folder. See the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    run_dir = run_folder(cfg)
    cfg["run_dir"] = str(run_dir)
    if not torch.cuda.is_available():
        keep_freed_memory()
    mp = cfg["mixed_precision"]
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if cfg["log_with"] == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # never block on a login prompt
    accelerator = Accelerator(
        # Several processes without a GPU (torchrun on a CPU box) need Accelerate's gloo backend.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1,
        mixed_precision=mp, gradient_accumulation_steps=cfg["grad_accum"], log_with=cfg["log_with"],
        project_config=ProjectConfiguration(project_dir=str(run_dir), automatic_checkpoint_naming=True,
                                            total_limit=2),
        # Frozen stages get no gradient while progressive unfreezing holds them; DDP must know.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(cfg["unfreeze"]))])
    main = accelerator.is_main_process
    say = accelerator.print

    # ---- run folder: a finished run with the same config is skipped, anything else is explicit
    ckpt = _latest_checkpoint(run_dir)
    if (run_dir / "config.yaml").exists() and not resume and not force:
        old = _load_yaml(run_dir / "config.yaml")
        done = (run_dir / "last.pt").exists()
        same = _comparable(old) == _comparable(cfg)
        if done and same:
            say(f"{run_dir}: already trained with this config; skipping (--force retrains)")
            return run_dir
        raise CompetitionError(
            f"{run_dir} already holds a {'finished' if done else 'partial'} run"
            f"{' with a different config' if not same else ''}: pass --resume to continue it, --force to "
            f"delete and retrain it, or name=NEW for a new run")
    if resume and ckpt is None:
        raise CompetitionError(f"--resume: {run_dir}/checkpoints holds no checkpoint to resume from")
    if force and not resume and main and run_dir.exists():
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()

    # ---- data
    t_start = time.time()
    set_seed(cfg["seed"])
    ds = data.load(cfg["dataset"], "train", cfg["data_dir"], cfg.get("data"))
    train_rows, val_rows = split_indices(cfg, ds.labels, accelerator)
    train_rows = subset(train_rows, cfg["train_subset"], cfg["seed"])
    cfg["num_classes"], cfg["classes"] = len(ds.classes), list(ds.classes)
    cfg["mean"], cfg["std"] = augment.input_stats(ds.images[train_rows], cfg["norm"])
    if cfg["image_size"] is None:
        cfg["image_size"] = ds.images.shape[1]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    say(f"run {run_dir}: {cfg['model']} on {cfg['dataset']} fold {cfg['fold']}: {len(train_rows)} train / "
        f"{len(val_rows)} held-out images, {cfg['num_classes']} classes, {accelerator.num_processes} process(es) "
        f"on {accelerator.device}, precision {mp}")

    # Training sizes below the stored one: resize the images once per size, not every batch
    # (10% of a 24 px CPU step). Only shrinking: a 32 -> 224 copy would not fit in memory.
    sized_images: dict = {}

    def train_images(size: int) -> np.ndarray:
        if size >= ds.images.shape[1]:
            return ds.images
        if size not in sized_images:
            sized_images[size] = augment.shrink_images(ds.images, size)
        return sized_images[size]

    val_eval_rows = subset(val_rows, cfg["val_subset"], cfg["seed"] + 1)
    n_train_eval = int(cfg.get("eval_train") or 0)
    train_eval_rows = subset(train_rows, n_train_eval, cfg["seed"] + 2) if n_train_eval else np.arange(0)

    def eval_loader(rows):
        bs = max(cfg["batch_size"], 256)
        return accelerator.prepare(torch.utils.data.DataLoader(
            ArrayDataset(ds.images, ds.labels, rows), batch_size=bs, shuffle=False, collate_fn=_as_batch))

    val_loader = eval_loader(val_eval_rows) if len(val_eval_rows) else None
    train_eval_loader = eval_loader(train_eval_rows) if len(train_eval_rows) else None

    # One sampler generator, reseeded from (seed, epoch) before each epoch: the shuffle order of
    # an epoch does not depend on whether the run was resumed.
    shuffle_gen = torch.Generator()
    loaders: dict = {}

    def train_loader(epoch: int):
        bs = optim.batch_size_at(cfg, epoch)
        kind = "strong" if cfg["strong_aug_epoch"] is not None and epoch >= cfg["strong_aug_epoch"] else cfg["cpu_aug"]
        size = train_size_at(cfg, epoch)
        if (bs, kind, size) not in loaders:
            workers = cfg["workers"] if kind not in (None, "none") else 0
            dl = torch.utils.data.DataLoader(
                ArrayDataset(train_images(size), ds.labels, train_rows, augment.cpu_pipeline(kind)), batch_size=bs,
                sampler=torch.utils.data.RandomSampler(range(len(train_rows)), generator=shuffle_gen),
                drop_last=len(train_rows) >= bs * accelerator.num_processes, collate_fn=_as_batch,
                num_workers=workers, pin_memory=torch.cuda.is_available())
            loaders[(bs, kind, size)] = accelerator.prepare(dl)
        shuffle_gen.manual_seed(cfg["seed"] * 100_003 + epoch)
        return loaders[(bs, kind, size)], bs, kind

    # ---- model, optimizer, schedule
    model = models.model_from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.make_optimizer(model, cfg)
    scheduler = optim.make_scheduler(optimizer, cfg)
    ema = None
    if cfg["ema"]:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg["ema"], device=accelerator.device)
    if cfg["compile"]:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    batch_aug = augment.BatchAugment(cfg, cfg["num_classes"], accelerator.device)
    if cfg["mixup"] or cfg["cutmix"]:
        from timm.loss import SoftTargetCrossEntropy
        loss_fn = SoftTargetCrossEntropy()  # Mixup already folded label smoothing into the targets
    else:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"] or 0.0)

    # timm schedulers stay out of prepare (Accelerate would step them once per process); they and
    # the loop state are checkpointed alongside the model.
    state = LoopState()
    accelerator.register_for_checkpointing(scheduler, state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if resume:
        accelerator.load_state(str(ckpt))
        # With automatic naming the next save would otherwise reuse checkpoint_0 and collide.
        accelerator.project_configuration.iteration = int(ckpt.name.split("_")[-1]) + 1
        say(f"resumed from {ckpt} at epoch {state.epoch}")
    if cfg["log_with"]:
        try:
            accelerator.init_trackers(run_dir.name.replace("/", "_"), config={
                k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()
                if k != "classes"})
        except Exception as e:
            raise CompetitionError(f"log_with={cfg['log_with']}: could not start the tracker ({e}); "
                                   f"pip install {cfg['log_with']}, or drop log_with") from None
    say(f"{cfg['model']}: {n_params / 1e6:.2f} M parameters; {cfg['epochs']} epochs, batch {cfg['batch_size']} x "
        f"{accelerator.num_processes} process(es) x {cfg['grad_accum']} accumulation, {cfg['optimizer']} lr "
        f"{cfg['lr']}, {cfg['sched']} schedule")

    # ---- epochs
    from tqdm.auto import tqdm

    t_loop = last_plot = time.time()
    stop = False
    while state.epoch < cfg["epochs"] and not stop:
        epoch = state.epoch
        prefixes = models.unfrozen_prefixes(cfg["unfreeze"], epoch)
        if cfg["unfreeze"]:
            n_open = models.set_trainable(net, prefixes)
            say(f"epoch {epoch + 1}: training {'all' if prefixes is None else prefixes} ({n_open} tensors)")
        loader, bs, kind = train_loader(epoch)
        size = train_size_at(cfg, epoch)
        model.train()
        t0, seen = time.time(), 0
        loss_sum = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        steps = len(loader)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   disable=not (main and cfg["progress"]), dynamic_ncols=True)
        for i, (x, y, _) in enumerate(loader):
            with accelerator.accumulate(model):
                x = train_input(x, cfg, size)
                x, target = batch_aug(x, y)
                y = y[: len(x)]
                logits = model(x)
                loss = loss_fn(logits, target)
                accelerator.backward(loss)
                if cfg["grad_clip"] and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                state.updates += 1
                scheduler.step_update(epoch + (i + 1) / steps)
                if ema is not None:
                    ema.update(net, step=state.updates)
            loss_sum += loss.detach() * len(x)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(x)
            if i % 25 == 0 or i == steps - 1:
                if not torch.isfinite(loss_sum):  # checked every 25 steps: each check is a device sync
                    raise CompetitionError(
                        f"{run_dir}: the training loss became {loss_sum.item()} in epoch {epoch + 1} (step {i}); "
                        f"lower lr (now {cfg['lr']}), set grad_clip=1.0 or mixed_precision=no, then rerun with "
                        f"--force (or --resume from the last good epoch)")
                bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.3f}", lr=f"{_lr(optimizer):.2g}")
            bar.update(1)
        bar.close()
        seen_all = accelerator.reduce(torch.tensor(float(seen), device=accelerator.device), "sum").item()
        train_loss = accelerator.reduce(loss_sum, "sum").item() / max(seen_all, 1)
        train_acc = accelerator.reduce(correct.float(), "sum").item() / max(seen_all, 1)
        train_time = time.time() - t0

        eval_model = ema.module if ema is not None else net
        val_loss, val_acc = loss_acc(*predict_loader(eval_model, val_loader, cfg, accelerator)[:2]) \
            if val_loader is not None else (float("nan"), float("nan"))
        row = dict(epoch=epoch + 1, lr=_lr(optimizer), batch_size=bs, image_size=size, updates=state.updates, cpu_aug=kind,
                   train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc)
        if train_eval_loader is not None:
            row["train_eval_loss"], row["train_eval_acc"] = loss_acc(
                *predict_loader(eval_model, train_eval_loader, cfg, accelerator)[:2])
        row.update(epoch_time_s=round(time.time() - t0, 2), images_per_s=round(seen_all / train_time, 1))
        state.history.append(row)
        state.epoch += 1

        # best.pt: a tie goes to the later epoch (trained longer, at a lower learning rate);
        # patience counts epochs without a strictly better accuracy.
        improved = val_loader is None or val_acc >= state.best_acc
        state.bad_epochs = 0 if val_loader is None or val_acc > state.best_acc else state.bad_epochs + 1
        if improved:
            state.best_acc, state.best_epoch = val_acc, epoch + 1
        if main:
            sd = _state_dict(eval_model)
            if improved:
                _save_weights(run_dir / "best.pt", sd, cfg, row)
            # A matplotlib figure costs ~1 s on a CPU: redraw at most once a minute, and at the end.
            replot = time.time() - last_plot >= 60
            write_metrics(run_dir, state.history, plot=replot)
            last_plot = time.time() if replot else last_plot
        accelerator.save_state()
        if cfg["log_with"]:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
        eta = (cfg["epochs"] - state.epoch) * (time.time() - t0)
        say(f"epoch {epoch + 1}/{cfg['epochs']}  loss {train_loss:.4f} acc {train_acc:.4f}  val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.4f}  lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s {row['images_per_s']:.0f} img/s"
            f"  ETA {eta / 60:.1f} min" + ("  *" if improved and val_loader is not None else ""))
        if cfg["stop_after"] and state.epoch >= cfg["stop_after"] and state.epoch < cfg["epochs"]:
            if main:
                write_metrics(run_dir, state.history)
            say(f"stop_after={cfg['stop_after']}: stopping after epoch {state.epoch}; continue with --resume")
            return run_dir
        if cfg["patience"] and state.bad_epochs >= cfg["patience"]:
            say(f"early stop: no better val_acc for {cfg['patience']} epochs (best {state.best_acc:.4f} at "
                f"epoch {state.best_epoch})")
            stop = True
    loop_time = time.time() - t_loop

    # ---- last weights, then out-of-fold logits with the best weights
    summary = dict(epochs=state.epoch, updates=state.updates)
    accelerator.wait_for_everyone()
    eval_model = ema.module if ema is not None else net
    if main:
        _save_weights(run_dir / "last.pt", _state_dict(eval_model), cfg, state.history[-1] if state.history else {})
        if state.history:
            write_metrics(run_dir, state.history)
    accelerator.wait_for_everyone()
    if len(val_rows):
        best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
        eval_model.load_state_dict(best["model"])
        views = predict.parse_tta(cfg["oof_tta"])
        views = views if predict.tta_name(views) != "none" else None
        logits, labels, rows, tta_logits = predict_loader(eval_model, eval_loader(val_rows), cfg, accelerator, views)
        if main:
            order = torch.argsort(rows)
            save_npy(run_dir / "oof_logits.npy", logits[order].numpy().astype(np.float32))
            save_npy(run_dir / "oof_index.npy", rows[order].numpy().astype(np.int64))
        oof_loss, oof_acc = loss_acc(logits, labels)
        say(f"out-of-fold: {len(rows)} images, accuracy {oof_acc:.4f}, loss {oof_loss:.4f} (best epoch "
            f"{state.best_epoch})")
        summary.update(oof_images=len(rows), oof_accuracy=oof_acc, oof_loss=oof_loss, best_epoch=state.best_epoch)
        if views:
            # The accuracy a submission made with this TTA would have; the logits themselves come
            # from competition.predict (oof_tta_logits.npy), next to the OOD ones.
            tta_acc = loss_acc(tta_logits, labels)[1]
            say(f"out-of-fold with TTA {cfg['oof_tta']} ({len(views)} views): accuracy {tta_acc:.4f}")
            summary.update(oof_tta=cfg["oof_tta"], oof_tta_accuracy=tta_acc)
    if cfg["log_with"]:
        accelerator.end_training()
    summary.update(training_loop_s=round(loop_time, 1), total_s=round(time.time() - t_start, 1))
    if main:
        save_json(run_dir / "summary.json", summary)
    say(f"done: {run_dir}  training loop {loop_time:.1f} s, total {summary['total_s']:.1f} s")
    return run_dir


def train_input(images: torch.Tensor, cfg: dict, size: int) -> torch.Tensor:
    """A uint8 (B, H, W, 3) training batch -> the model's float input at `size`: random flip and
    shift (cfg flip, translate), then to_input. The loop and step_throughput both use this."""
    x = augment.flip_translate(images, cfg["flip"], cfg["translate"])
    return augment.to_input(x, cfg["mean"], cfg["std"], size, cfg["channels_last"])


def train_size_at(cfg: dict, epoch: int) -> int:
    """Training image size at `epoch` under progressive resizing (cfg train_sizes)."""
    size = cfg["image_size"]
    for start, s in sorted((int(k), v) for k, v in (cfg.get("train_sizes") or {}).items()):
        if epoch >= start:
            size = s
    return size


def _lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _state_dict(model: nn.Module) -> dict:
    sd = model.state_dict()
    return {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in sd.items()}


def _save_weights(path: Path, sd: dict, cfg: dict, row: dict) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save({"model": sd, "config": cfg, "metrics": row}, tmp)


def _load_yaml(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text()) or {}


def write_metrics(run_dir: Path, history: list[dict], plot: bool = True) -> None:
    """metrics.csv (one row per epoch) and, if `plot`, curves.png (loss, accuracy, learning rate)."""
    frame = pd.DataFrame(history)
    with atomic_path(run_dir / "metrics.csv", ".csv") as tmp:
        frame.to_csv(tmp, index=False)
    if plot:
        from competition.curves import plot_run

        plot_run(frame, run_dir / "curves.png", title=run_dir.name)


# ---------------------------------------------------------------------------- batch size finder


def step_throughput(cfg: dict, steps: int = 5, warmup: int = 2) -> tuple[float, float]:
    """(images/s, peak GPU GiB or nan) of `steps` full training steps after `warmup`: flip/translate,
    to_input (resize, normalise), forward, backward, optimizer step, on synthetic uint8 batches
    (32x32, or already at image_size when that is smaller) of cfg batch_size: the loop's
    device-side path without data loading (a memory index).
    Used by the batch-size finder and bench/throughput.py."""
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
    # The loop trains on images shrunk once when its size is below the stored 32 px (train_images).
    side = min(32, cfg["image_size"] or 32)
    x8 = torch.randint(0, 256, (bs, side, side, 3), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 100, (bs,), device=dev)
    mean, std = [0.5] * 3, [0.25] * 3
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        x = train_input(x8, {**cfg, "mean": mean, "std": std}, cfg["image_size"])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync()
    ips = bs * steps / (time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if amp else float("nan")
    return ips, mem


def find_batch_size(cfg: dict, start: int = 16, limit: int = 4096, steps: int = 3) -> int:
    """Time training steps at doubling batch sizes until memory runs out or images/s stops
    improving; print the table and return the fastest size (the public starter's finder only
    looked for the largest size that fits, which is rarely the fastest)."""
    if not torch.cuda.is_available():
        keep_freed_memory()
    bs, best = start, (0.0, start)
    while bs <= limit:
        try:
            ips, mem = step_throughput({**cfg, "batch_size": bs}, steps=steps, warmup=1)
        except torch.OutOfMemoryError:
            print(f"batch {bs}: out of memory")
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        print(f"batch {bs:5d}: {ips:9.1f} images/s, peak {mem:.1f} GiB")
        if ips > best[0]:
            best = (ips, bs)
        elif ips < 0.9 * best[0]:
            break
        bs *= 2
    print(f"fastest: batch_size={best[1]} ({best[0]:.0f} images/s at image_size {cfg['image_size']}); "
          f"pass batch_size={best[1]}")
    return best[1]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", type=int, choices=(1, 2, 3), help="1 simple CNN | 2 ResNet-18 | 3 pretrained ResNet-50")
    p.add_argument("--preset", action="append", help="competition/configs/NAME.yaml (or a path); repeatable")
    p.add_argument("--fold", type=int, help="held-out fold (-1: train on every image)")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run folder under models/ (default <presets>-f<fold>-s<seed>)")
    p.add_argument("--weights", help="Part 3: local ImageNet ResNet-50 weights file (offline machines)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing run folder of this name and retrain")
    p.add_argument("--find-batch-size", action="store_true", help="time batch sizes on this device, then exit")
    p.add_argument("overrides", nargs="*", help="config key=value (see competition/configs/base.yaml)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before or after flags
    cfg, _ = resolve(args, args.overrides)
    if args.find_batch_size:
        return find_batch_size(cfg)
    return train(cfg, resume=args.resume, force=args.force)


if __name__ == "__main__":
    cli(main)()
