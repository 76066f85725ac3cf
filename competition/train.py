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

The run, top to bottom (`train`): an Accelerator; the run folder (`runs.prepare_run_folder`:
skip a finished run, refuse a changed one, resume or start over); the data
(`train_data.TrainData`) and what it decides (the data config: classes, mean/std, image size);
the model, optimizer, schedule and EMA (`learner.make_learner`) and the checkpointed loop state
(`checkpoints.restore`); then per epoch `train_one_epoch` and `end_of_epoch` (evaluate,
checkpoint, curves, metrics row, patience); finally `write_oof` (last weights, out-of-fold
logits of the best weights). The batch-size finder lives in competition/batch_size.py.
One loop for every part and every device: Accelerate places the model, shards the batches
across processes, runs bf16 autocast on GPUs and accumulates gradients; only the main
process writes files.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch competition/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from competition import augment, data, files, metrics, models, optim, runtime, tta
from competition.checkpoints import LoopState, epoch_batches, restore, save_checkpoint, state_dict, stop_message
from competition.config import resolve, validate
from competition.files import CompetitionError, cli
from competition.learner import Learner, check_model, make_learner
from competition.runs import MetricsWriter, RunDir, check_same_data, drop_asides, prepare_run_folder
from competition.specs import TrainSpec, train_spec
from competition.train_data import TrainData, process_batch, resolve_data_config


# ---------------------------------------------------------------------------- accelerator and config


def check_config(cfg: dict) -> TrainSpec:
    """Everything about cfg that can fail, tried before the run folder is touched: values and
    ranges (config.validate), the data source, the TTA spec, the CPU augmentation, and the
    model: built (without fetching weights), one forward pass of two images at every size it
    will see, its optimizer, schedule and unfreezing groups. A typo costs one message, never a run.
    Returns the typed spec the run's parts take (specs.TrainSpec)."""
    validate(cfg)
    spec = train_spec(cfg)
    dataset, log_with, aug, model = spec.data.dataset, spec.loop.log_with, spec.augment, spec.model
    if dataset not in data.SOURCES:
        raise CompetitionError(f"config dataset={dataset!r}: must be one of {', '.join(data.SOURCES)}")
    tta.parse_tta(spec.loop.oof_tta)
    if log_with:
        if importlib.util.find_spec(log_with) is None:
            raise CompetitionError(f"config log_with={log_with}: the {log_with} package is not installed: "
                                   f"pip install -e '.[{log_with}]' (or drop log_with)")
    for kind in {aug.cpu_aug, "strong" if aug.strong_aug_epoch is not None else "none"}:
        augment.cpu_pipeline(kind)
    if model.init_from and not RunDir(model.init_from).weights("best").exists():
        raise CompetitionError(f"config init_from={model.init_from}: no best.pt there (a trained run folder)")
    if spec.data.pseudo and not Path(spec.data.pseudo).is_file():
        raise CompetitionError(f"config pseudo={spec.data.pseudo}: no such file (competition.selftrain writes it)")
    if model.weights and not Path(model.weights).is_file():
        raise CompetitionError(f"config weights={model.weights}: no such file (an ImageNet ResNet-50 state dict)")
    models.check_weights_source(spec.model)  # offline without weights: the message now, before any folder
    check_model(spec)
    return spec


# ---------------------------------------------------------------------------- one epoch


def train_one_epoch(learner: Learner, loader, data_cfg: dict, size: int, state: LoopState, accelerator,
                    run: RunDir, stop: runtime.StopRequest, soft=None) -> dict | None:
    """One pass over the training loader; the schedule steps per update. Returns the running
    loss and accuracy (over every process) and the images seen; None when a stop request
    ended the epoch early (state.step and state.partial then say where, for the checkpoint)."""
    model, optimizer, epoch, spec = learner.model, learner.optimizer, state.epoch, learner.spec
    model.train()
    models.frozen_norms_to_eval(learner.net)  # frozen stages keep their running statistics
    t0, steps, p = time.time(), len(loader), state.partial
    seen = int(p.get("seen", 0))
    loss_sum = torch.tensor(float(p.get("loss_sum", 0.0)), device=accelerator.device)
    correct = torch.tensor(float(p.get("correct", 0.0)), device=accelerator.device)
    bar = runtime.progress(steps, f"epoch {epoch + 1}/{spec.loop.epochs}",
                           accelerator.is_main_process and spec.loop.progress, initial=state.step, leave=False)
    for i, (x, y, pos) in enumerate(epoch_batches(loader, state, accelerator), start=state.step):
        if stop.now(accelerator, i):
            state.step, state.partial = i, {"seen": seen, "loss_sum": loss_sum.item(), "correct": correct.item()}
            bar.close()
            return None
        with accelerator.accumulate(model):
            x = augment.train_input(x, spec.augment, data_cfg, size)
            x, target = learner.batch_aug(x, y)
            if soft is not None:  # pseudo-labelled images: soft targets for every row
                target = soft(pos, spec.optim.label_smoothing).to(x.device, non_blocking=True)
            y = y[: len(x)]
            logits = model(x)
            loss = learner.loss_fn(logits, target)
            accelerator.backward(loss)
            if spec.optim.grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
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
                    f"lower lr (now {spec.optim.lr}), set grad_clip=1.0 or mixed_precision=no, then rerun with "
                    f"--force (or --resume from the last good epoch)")
            bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.3f}", lr=f"{_lr(optimizer):.2g}")
        bar.update(1)
    bar.close()
    state.step, state.partial = 0, {}
    seen_all = accelerator.reduce(torch.tensor(float(seen), device=accelerator.device), "sum").item()
    return {"train_loss": accelerator.reduce(loss_sum, "sum").item() / max(seen_all, 1),
            "train_acc": accelerator.reduce(correct.float(), "sum").item() / max(seen_all, 1),
            "images": seen_all, "seconds": time.time() - t0}


def loss_acc(model: nn.Module, loader, data_cfg: dict, accelerator) -> tuple[float, float]:
    if loader is None:
        return float("nan"), float("nan")
    logits, labels, _, _ = tta.evaluate(model, loader, data_cfg, accelerator)
    return metrics.log_loss(logits, labels), metrics.accuracy(logits, labels)


def end_of_epoch(run: RunDir, save_weights: Callable, data_cfg: dict, td: TrainData, learner: Learner,
                 state: LoopState, accelerator, stats: dict, epoch_start: float, writer: MetricsWriter, bs: int,
                 kind: str, size: int) -> str | None:
    """Evaluate, keep best.pt (save_weights: run_training's), write the metrics row and the checkpoint,
    print the epoch line. Returns why the loop stops after this epoch ("stop_after", "patience") or None."""
    epoch, eval_model, loop = state.epoch, learner.eval_model, learner.spec.loop
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
    acc = row["ood_acc"] if loop.select_on == "ood" else val_acc
    checked = td.val_loader is not None
    improved = not checked or acc >= state.best_acc
    strictly = checked and acc > state.best_acc
    state.bad_epochs = 0 if not checked or strictly else state.bad_epochs + 1
    if improved:
        state.best_acc, state.best_epoch = acc, epoch + 1
    if accelerator.is_main_process:
        if improved:
            save_weights("best", state_dict(eval_model), metrics=row)
        writer.write(state.history)
    save_checkpoint(run, learner, state, accelerator)
    if loop.log_with:
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
    eta = (loop.epochs - state.epoch) * (time.time() - epoch_start)
    accelerator.print(
        f"epoch {epoch + 1}/{loop.epochs}  loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  val_loss "
        f"{val_loss:.4f} val_acc {val_acc:.4f}  lr {row['lr']:.3g}  {row['epoch_time_s']:.1f}s "
        f"{row['images_per_s']:.0f} img/s  ETA {eta / 60:.1f} min" + (f"  ood_acc {row['ood_acc']:.4f}" if "ood_acc" in row
                                                                  else "") + ("  *" if strictly else ""))
    if loop.stop_after and state.epoch >= loop.stop_after and state.epoch < loop.epochs:
        return "stop_after"
    if loop.patience and state.bad_epochs >= loop.patience:
        accelerator.print(f"early stop: no better {'ood' if loop.select_on == 'ood' else 'val'}_acc for "
                          f"{loop.patience} epochs (best {state.best_acc:.4f} at epoch {state.best_epoch})")
        return "patience"
    return None


def write_oof(run: RunDir, save_weights: Callable, data_cfg: dict, td: TrainData, learner: Learner,
              state: LoopState, accelerator, writer: MetricsWriter) -> dict:
    """last.pt and the final curves, then the out-of-fold logits of the best weights over the
    whole held-out fold (and their accuracy under the spec's oof_tta). Returns summary figures."""
    summary = dict(epochs=state.epoch, updates=state.updates)
    accelerator.wait_for_everyone()
    eval_model = learner.eval_model
    if accelerator.is_main_process:
        save_weights("last", state_dict(eval_model), metrics=state.history[-1] if state.history else {})
        if state.history:
            writer.write(state.history, final=True)
    accelerator.wait_for_everyone()
    if not len(td.val_rows):
        return summary
    eval_model.load_state_dict(run.load_weights("best")["model"])
    oof_tta = learner.spec.loop.oof_tta
    views = tta.parse_tta(oof_tta)
    views = views if tta.tta_name(views) != "none" else None
    logits, labels, pos, tta_logits = tta.evaluate(eval_model, td.eval_loader(td.val_rows), data_cfg, accelerator, views)
    rows = td.val_rows[pos]
    if accelerator.is_main_process:
        order = np.argsort(rows)
        run.save_oof(rows[order], logits[order])
    if td.ood_loader is not None:
        ood_logits, ood_labels, ood_pos, _ = tta.evaluate(eval_model, td.ood_loader, data_cfg, accelerator)
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
        accelerator.print(f"out-of-fold with TTA {oof_tta} ({len(views)} views): accuracy {tta_acc:.4f}")
        summary.update(oof_tta=oof_tta, oof_tta_accuracy=tta_acc)
    return summary


# ---------------------------------------------------------------------------- the run


def train(cfg: dict, resume: bool = False, force: bool = False, command: str | None = None) -> Path:
    """Train the run `cfg` describes (cfg is not modified); returns its folder. `command` is how
    the user started it, for the resume hint after a stop request."""
    spec = check_config(cfg)
    run = RunDir.for_config(cfg)
    accelerator = runtime.training_accelerator(spec, run.path)
    for epoch in range(spec.loop.epochs):  # the batch schedule must split over these processes: say so now
        process_batch(spec, optim.batch_size_at(spec.optim, epoch), accelerator.num_processes)
    fresh = not run.path.exists()
    aside = prepare_run_folder(run, cfg, accelerator, resume, force)
    if aside is False:
        check_same_data(run, cfg)
        return run.path
    try:
        with runtime.StopRequest() as stop:
            return run_training(run, cfg, spec, accelerator, resume, stop, aside, command)
    except BaseException:
        if aside is not None and aside.exists() and accelerator.is_main_process:
            shutil.rmtree(run.path, ignore_errors=True)  # the new run did not finish an epoch: the old one is back
            aside.rename(run.path)
            print(f"the new run stopped before finishing an epoch; the previous {run} is restored", file=sys.stderr)
        elif fresh and accelerator.is_main_process and run.latest_checkpoint() is None and not run.metrics_csv.exists():
            shutil.rmtree(run.path, ignore_errors=True)  # never trained: the identical rerun starts afresh
        raise
    finally:
        if accelerator.is_main_process:
            run.release_lock()


def run_training(run: RunDir, cfg: dict, spec: TrainSpec, accelerator, resume: bool, stop: runtime.StopRequest,
                 aside: Path | None, command: str | None) -> Path:
    """The run, top to bottom, once its folder is claimed (see the module docstring). `spec` is
    cfg typed (check_config's) and every part reads it; cfg itself is the run folder's record
    (config.yaml, the weights' metadata, the tracker's config, summary.json's trained_on)."""
    from accelerate.utils import set_seed

    t_start = time.time()
    loop, opt = spec.loop, spec.optim
    set_seed(loop.seed)
    td = TrainData(spec, accelerator)
    if resume:
        check_same_data(run, cfg, td.data_sha1)
    data_cfg = resolve_data_config(spec, td)
    if accelerator.is_main_process:
        run.save_configs(cfg, data_cfg)
    # best.pt and last.pt carry the config and data config as the run folder stores them
    save_weights = functools.partial(run.save_weights, cfg=cfg, data_cfg=data_cfg)
    accelerator.print(
        f"run {run}: {spec.model.model} on {spec.data.dataset} fold {spec.data.fold}: {len(td.train_rows)} train / "
        f"{len(td.val_rows)} held-out images, {data_cfg['num_classes']} classes, {accelerator.num_processes} "
        f"process(es) on {accelerator.device}, {_precision(accelerator)}")
    learner = make_learner(spec, data_cfg, accelerator)
    state = restore(run, learner, accelerator, resume)
    runtime.start_trackers(accelerator, run.name, loop.log_with, cfg)  # the config as stored: its record
    accelerator.print(
        f"{spec.model.model}: {learner.n_params / 1e6:.2f} M parameters; {loop.epochs} epochs, {opt.optimizer} lr "
        f"{opt.lr}, {spec.schedule.sched} schedule; batch {opt.batch_size} per update (global) = "
        f"{accelerator.num_processes} process(es) x {process_batch(spec, opt.batch_size, accelerator.num_processes)} "
        f"images x {opt.grad_accum} accumulation step(s); the global batch is held constant on any number of "
        f"processes, so lr needs no scaling")

    writer, why = MetricsWriter(run), None
    while state.epoch < loop.epochs and why is None:
        epoch_start = time.time()
        if spec.schedule.unfreeze:
            prefixes = models.unfrozen_prefixes(spec.schedule.unfreeze, state.epoch)
            n_open = models.set_trainable(learner.net, prefixes)
            accelerator.print(f"epoch {state.epoch + 1}: training {'all' if prefixes is None else prefixes} "
                              f"({n_open} tensors)")
        loader, bs, kind, size = td.loader(state.epoch, data_cfg["image_size"])
        stats = train_one_epoch(learner, loader, data_cfg, size, state, accelerator, run, stop,
                                td.targets if td.soft is not None else None)
        if stats is None:  # a stop request mid-epoch: checkpoint where it is
            state.loop_s += time.time() - epoch_start
            # At an epoch's first step nothing has trained since the newest checkpoint (the end of the
            # last epoch), which stays the exact one; a new one would hold the RNG after the first
            # batch was drawn, and a resume would draw it again. Before any checkpoint: nothing to keep.
            if state.step:
                save_checkpoint(run, learner, state, accelerator)
            why = "signal"
            break
        why = end_of_epoch(run, save_weights, data_cfg, td, learner, state, accelerator, stats, epoch_start, writer,
                           bs, kind, size)
        if aside is not None and aside.exists() and accelerator.is_main_process:
            drop_asides(run, aside, cfg["models_dir"])  # --force: the new run has finished an epoch; the old goes
        why = why or ("signal" if stop.name else None)
    if why == "signal":
        raise files.Interrupted(stop_message(run, state, stop.name, command, forced=aside is not None))
    if why == "stop_after":
        accelerator.print(f"stop_after={loop.stop_after}: stopping after epoch {state.epoch}; continue with --resume")
        return run.path

    summary = write_oof(run, save_weights, data_cfg, td, learner, state, accelerator, writer)
    if loop.log_with:
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


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m competition.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
        from competition.batch_size import find_batch_size

        return find_batch_size(train_spec(cfg))
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--force", "--resume")]
    command = shlex.join(["python", "-m", "competition.train", *argv])
    return train(cfg, resume=args.resume, force=args.force, command=command)


if __name__ == "__main__":
    cli(main)()
