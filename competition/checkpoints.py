"""What lets a run stop and continue exactly: the loop's state (`LoopState`), the checkpoint
folders (`save_checkpoint`, `load_checkpoint`), resuming from the newest checkpoint that loads
completely (`restore`), mid-epoch batch skipping (`epoch_batches`), and the plain state dict that
best / last weights hold (`state_dict`).

A checkpoint (run/checkpoints/checkpoint_K/, the newest two kept; competition/runs.py names the
files) holds no pickle: tensors are safetensors and everything else JSON, so resuming from a
folder someone sent runs no code:

    model.safetensors                  the weights, bare parameter names (no DDP `module.` or
                                       torch.compile `_orig_mod.`: loads with any process count)
    optimizer.safetensors              per-parameter state tensors ("<param index>.<name>")
    optimizer.json                     param_groups, and per-parameter state that is not a tensor
    ema.safetensors                    the EMA's weights (runs with ema)
    state.json                         LoopState, scheduler state_dict, Accelerate's step, grad scaler
    random_states_<rank>.safetensors   each process's torch and CUDA RNG states (uint8 tensors), its
                                       Python and numpy ones as JSON metadata

Why not Accelerate's save_state / load_state: only the model is safetensors there; the optimizer,
the registered objects (scheduler, LoopState, EMA) and the RNG states are pickles, and load_state
reads custom_checkpoint_*.pkl with weights_only=False (a planted file would run). What it saves
for this loop is all here: the model, the prepared optimizer's state_dict, the RNG states of every
process and `accelerator.step` (gradient accumulation's counter); the data loaders need nothing
(map-style, reshuffled from a per-epoch seed), nor does the scheduler (timm's, stepped by the loop).
A folder is written as checkpoint_K.tmp and renamed when complete, so a crash leaves no half
checkpoint under a checkpoint's name. Checkpoints Accelerate wrote (runs saved before) still
resume: each of their pickles is read with weights_only=True first (runs.RunDir.checkpoint_problem),
then Accelerate loads them as it did; the next save writes this format.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from competition.files import CompetitionError
from competition.runs import RunDir

if TYPE_CHECKING:
    from competition.learner import Learner

FORMAT = 1  # state.json's "format": bump when the layout changes, and read the old one too


class LoopState:
    """Everything of the loop that must survive a resume (state.json of a checkpoint: plain JSON values)."""

    def __init__(self):
        self.epoch, self.updates, self.best_acc, self.best_epoch, self.bad_epochs = 0, 0, -1.0, -1, 0
        self.history: list[dict] = []
        # A checkpoint taken mid-epoch (a stop request): batches done in `epoch` and their running sums.
        self.step, self.partial = 0, {}
        self.loop_s = 0.0  # seconds spent in epochs, summed over every session of a resumed run
        self.processes = None  # how many processes trained up to the checkpoint

    def state_dict(self):
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state):
        # Only the loop's own fields: a key of a sent state.json never replaces a method or adds one.
        vars(self).update({k: v for k, v in state.items() if k in self.state_dict()})


def restore(run: RunDir, learner: Learner, accelerator, resume: bool) -> LoopState:
    """The loop state: a fresh one, or, when resuming, the newest checkpoint that loads completely
    loaded into it and into the learner (model, optimizer, schedule, EMA) and the RNGs."""
    state = LoopState()
    if resume:
        ckpt = newest_complete_checkpoint(run, learner, accelerator)
        try:
            if RunDir.is_legacy_checkpoint(ckpt):
                load_legacy_checkpoint(ckpt, learner, state, accelerator)
            else:
                load_checkpoint(ckpt, learner, state, accelerator)
        except CompetitionError:
            raise
        except Exception as e:
            if not (isinstance(e, ValueError) and "parameter group" in str(e)):
                raise damaged(ckpt, f"{type(e).__name__}: {e}") from None
            raise CompetitionError(f"--resume: {ckpt} holds optimizer state for other parameter groups than this "
                                   f"code makes (saved before one-lr-per-stage layer_decay?): it cannot continue "
                                   f"exactly; retrain with --force") from None
        state._source = ckpt  # for epoch_batches' message; not saved (state_dict leaves out _names)
        where = f"epoch {state.epoch + 1} step {state.step}" if state.step else f"the end of epoch {state.epoch}"
        accelerator.print(f"resumed from {ckpt} at {where}")
        if state.processes not in (None, accelerator.num_processes):
            accelerator.print(f"the checkpoint was written by {state.processes} process(es), this run has "
                              f"{accelerator.num_processes}: weights, optimizer, schedule and global batch continue; "
                              f"the data order and augmentation draws from here on differ from an uninterrupted run")
    state.processes = accelerator.num_processes
    return state


def save_checkpoint(run: RunDir, learner: Learner, state: LoopState, accelerator) -> Path:
    """Write the next checkpoint_K (see the module docstring) and drop all but the newest two.
    Every process writes its RNG states; the main process writes the rest. A write that fails (a
    full disk) removes the half-written checkpoint_K.tmp and stops with one line."""
    from safetensors import SafetensorError

    final, tmp = run.next_checkpoint()  # every process names it before the main one renames anything
    run.own(tmp), run.own(final)  # a sent run's checkpoints/ may link outside it
    try:
        if accelerator.is_main_process:
            for stale in run.stale_checkpoint_tmps():  # a save a crash cut short
                shutil.rmtree(run.own(stale))
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _write_checkpoint(tmp, learner, state, accelerator)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) == 28 or "no space" in str(e).lower()
        raise CompetitionError(f"{'no space left on the device' if full else 'could not write'} while saving a "
                               f"checkpoint in {run.checkpoint_dir} ({type(e).__name__}: {str(e)[:160]}): "
                               f"{'free space' if full else 'fix the folder (space, permissions)'}, then --resume "
                               f"(the older checkpoints are intact; the partial one was removed)") from None
    accelerator.wait_for_everyone()  # every process's RNG states are in
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in run.checkpoints()[:-RunDir.KEEP_CHECKPOINTS]:
            shutil.rmtree(run.own(old))
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(tmp: Path, learner: Learner, state: LoopState, accelerator) -> None:
    """The files of one checkpoint into the folder `tmp` (save_checkpoint renames it when complete)."""
    from safetensors.torch import save_file

    _save_rng(RunDir.checkpoint_rng(tmp, accelerator.process_index))
    if accelerator.is_main_process:
        save_file(_tensors(learner.net.state_dict(), bare=True), str(tmp / RunDir.CKPT_MODEL))
        # The prepared optimizer's state_dict is the wrapped optimizer's (what save_state wrote).
        tensors, rest = _split_optimizer(learner.optimizer.state_dict())
        save_file(tensors, str(tmp / RunDir.CKPT_OPTIMIZER))
        _write_json(tmp / RunDir.CKPT_OPTIMIZER_JSON, rest)
        if learner.ema is not None:
            save_file(_tensors(learner.ema.state_dict()), str(tmp / RunDir.CKPT_EMA))
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None  # fp16 only
        _write_json(tmp / RunDir.CKPT_STATE, {"format": FORMAT, "loop": state.state_dict(),
                                              "scheduler": learner.scheduler.state_dict(),
                                              "accelerator_step": accelerator.step, "scaler": scaler})


def stop_message(run: RunDir, state: LoopState, signal: str, command: str | None, forced: bool) -> str:
    """The one line a stop request ends with: where the exact checkpoint is and how to continue,
    or, before any checkpoint, that nothing was kept and the run starts again."""
    if run.latest_checkpoint() is None:
        again = f"`{command}{' --force' if forced else ''}`" if command else "the same command"
        return f"{signal} before the first training step: nothing was trained and no checkpoint saved; start the " \
               f"run again with {again}"
    resume_hint = f"`{command} --resume`" if command else "the same command with --resume (without --force)"
    return (f"{signal} in epoch {state.epoch + (1 if state.step else 0)}"
            f"{f' at step {state.step}' if state.step else ''}; checkpoint saved in "
            f"{run.latest_checkpoint()}; continue exactly with {resume_hint}")


def damaged(ckpt: Path, why: str) -> CompetitionError:
    """The one line for a checkpoint that passed every check and still failed to load (or to
    continue), with the way back to the one before it, if any."""
    number = int(ckpt.name.split("_")[-1])
    run = RunDir(ckpt.parent.parent)
    older = [c for c in run.checkpoints() if int(c.name.split("_")[-1]) < number]
    back = f"move {ckpt.name} into {run.broken_checkpoint_dir} to resume from {older[-1].name}, or " if older else ""
    return CompetitionError(f"--resume: checkpoint {ckpt} is damaged or from another run: {' '.join(why.split())[:300]}"
                            f"; {back}start again with --force")


def load_checkpoint(ckpt: Path, learner: Learner, state: LoopState, accelerator) -> None:
    """A checkpoint save_checkpoint wrote, into the learner, the loop state, Accelerate's step and
    this process's RNGs (a process that did not write one, in a run with more processes than the
    checkpoint's, keeps its seeded RNGs, as Accelerate's load_state did)."""
    from safetensors.torch import load_file

    saved = _read_json(ckpt / RunDir.CKPT_STATE)
    if saved.get("format") != FORMAT:
        raise CompetitionError(f"--resume: {ckpt / RunDir.CKPT_STATE} is format {saved.get('format')!r}, this code "
                               f"reads format {FORMAT}: resume with the code that wrote it, or retrain with --force")
    learner.net.load_state_dict({bare_name(k): v for k, v in load_file(ckpt / RunDir.CKPT_MODEL).items()})
    learner.optimizer.load_state_dict(_join_optimizer(load_file(ckpt / RunDir.CKPT_OPTIMIZER),
                                                      _read_json(ckpt / RunDir.CKPT_OPTIMIZER_JSON)))
    learner.scheduler.load_state_dict(saved["scheduler"])
    if learner.ema is not None:
        learner.ema.load_state_dict(load_file(ckpt / RunDir.CKPT_EMA))
    state.load_state_dict(saved["loop"])
    accelerator.step = saved["accelerator_step"]
    if accelerator.scaler is not None and saved.get("scaler"):
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng = RunDir.checkpoint_rng(ckpt, accelerator.process_index)
    if rng.exists():
        _load_rng(rng)


def load_legacy_checkpoint(ckpt: Path, learner: Learner, state: LoopState, accelerator) -> None:
    """A checkpoint Accelerate's save_state wrote (runs saved before this format), loaded by its
    load_state as it always was, once newest_complete_checkpoint has read every pickle in it with
    weights_only=True (load_state itself reads custom_checkpoint_*.pkl with weights_only=False).
    The model is loaded here under bare names, so a checkpoint written by N processes (DDP's
    `module.`) or with compile (`_orig_mod.`) loads into this run's bare module."""
    def load_model(models_, input_dir):
        learner.net.load_state_dict({bare_name(k): v for k, v in RunDir.checkpoint_weights(Path(input_dir)).items()})
        models_.clear()  # loaded: Accelerate must not load them again into the wrapped model

    accelerator.register_load_state_pre_hook(load_model)
    # The registration order of the runs that wrote them: custom_checkpoint_0, 1, 2.
    accelerator.register_for_checkpointing(learner.scheduler, state, *([learner.ema] if learner.ema is not None
                                                                        else []))
    accelerator.load_state(str(ckpt))


def bare_name(key: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _tensors(sd: dict, bare: bool = False) -> dict:
    """A state dict as safetensors takes it: CPU copies (no shared memory), contiguous (channels-last is not)."""
    return {(bare_name(k) if bare else k): v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def _split_optimizer(sd: dict) -> tuple[dict, dict]:
    """An optimizer state_dict as (tensors "<param index>.<name>", the JSON rest: param_groups and
    per-parameter values that are not tensors)."""
    tensors, rest = {}, {}
    for index, per_param in sd["state"].items():
        rest[str(index)] = {}
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                rest[str(index)][name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": rest}


def _join_optimizer(tensors: dict, saved: dict) -> dict:
    """_split_optimizer undone: the optimizer state_dict (its tensors on the CPU: load_state_dict
    moves them to each parameter's device)."""
    state = {int(index): dict(values) for index, values in saved["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": json.dumps(_jsonable(random.getstate())),
            "numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


def _load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    random.setstate(json.loads(meta["python"], object_hook=_untag))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
        torch.cuda.set_rng_state_all(cuda)


def _jsonable(obj):
    """obj as JSON takes it, exactly: tuples tagged (JSON has only lists, and a scheduler or
    optimizer given a list back where it saved a tuple, Adam's betas, would not be the state it
    saved), numpy scalars as Python numbers. Floats round-trip exactly (repr), NaN included."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state: a dict with keys {list(obj)[:5]} (JSON keys are strings)")
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: a {type(obj).__name__} cannot be written as JSON")


def _untag(d: dict):
    return tuple(d["__tuple__"]) if d.keys() == {"__tuple__"} else d


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_jsonable(obj)))


def _read_json(path: Path):
    return json.loads(path.read_text(), object_hook=_untag)


def newest_complete_checkpoint(run: RunDir, learner: Learner, accelerator) -> Path:
    """The newest checkpoint whose every file loads and fits this run (fit_problem); newer broken
    ones (a crash mid-save, a truncated copy, a sent one of another run) are moved to
    broken-checkpoints/ with a message, so the next save cannot collide with them and nothing is
    silently resumed inexactly."""
    found = [run.own(c) for c in run.checkpoints()]  # refused before anything is moved: none may link outside
    run.own(run.broken_checkpoint_dir)
    problems = {}
    for c in reversed(found):
        problems[c] = RunDir.checkpoint_problem(c, learner.ema is not None)
        if problems[c] is None and not RunDir.is_legacy_checkpoint(c):
            problems[c] = fit_problem(c, learner, accelerator)
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
            run.broken_checkpoint_dir.mkdir(exist_ok=True)
            shutil.move(str(c), str(run.broken_checkpoint_dir / c.name))
    accelerator.wait_for_everyone()
    return good


def fit_problem(ckpt: Path, learner: Learner, accelerator) -> str | None:
    """Why a checkpoint whose files all read (RunDir.checkpoint_problem) would still not continue
    this run, or None: state.json values of another type or out of range, tensors of other names
    or shapes than this run's network, EMA and optimizer, RNG states the generators refuse. A
    checkpoint may be a folder someone sent: checked before anything of it is loaded, so a bad
    one is passed over like a cut one, never half loaded, nor found out mid-training."""
    try:
        saved = _read_json(ckpt / RunDir.CKPT_STATE)
        _check_loop(saved["loop"], learner.spec.loop.epochs)
        groups = _read_json(ckpt / RunDir.CKPT_OPTIMIZER_JSON)["param_groups"]
        if _same_groups(groups, learner.optimizer):  # else load_state_dict says so, and restore explains it
            _check_like(learner.scheduler.state_dict(), saved["scheduler"], "state.json scheduler", exact=True)
            _check_optimizer(ckpt, learner.optimizer)
        _whole(saved.get("accelerator_step", 0), 0, 10 ** 12, "accelerator_step")
        if saved.get("scaler") is not None and accelerator.scaler is not None:
            _check_like(accelerator.scaler.state_dict(), saved["scaler"], "state.json scaler")
        _check_shapes(ckpt / RunDir.CKPT_MODEL, {bare_name(k): v.shape for k, v in learner.net.state_dict().items()},
                      bare=True)
        if learner.ema is not None:
            _check_shapes(ckpt / RunDir.CKPT_EMA, {k: v.shape for k, v in learner.ema.state_dict().items()})
        for rng in RunDir.checkpoint_rngs(ckpt):
            _check_rng(rng)
    except ValueError as e:
        return " ".join(str(e).split())[:300]
    except Exception as e:  # anything else a crafted file can provoke: the same verdict, with its kind
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


def _whole(value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{RunDir.CKPT_STATE}: {what} is {json.dumps(value)[:40]}, not a whole number in "
                         f"{low}..{high}")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_loop(loop, epochs: int) -> None:
    """LoopState's values: the epoch within the run's epochs (the epoch's step bound is
    epoch_batches', which knows its loader), one history row per finished epoch."""
    if not isinstance(loop, dict):
        raise ValueError(f"{RunDir.CKPT_STATE}: loop is a {type(loop).__name__}, not the loop's state")
    fresh = LoopState().state_dict()
    get = {**fresh, **{k: v for k, v in loop.items() if k in fresh}}.get
    epoch = _whole(get("epoch"), 0, epochs, "loop.epoch")
    _whole(get("step"), 0, 0 if epoch == epochs else 10 ** 9, "loop.step")
    _whole(get("updates"), 0, 10 ** 12, "loop.updates")
    _whole(get("bad_epochs"), 0, epoch, "loop.bad_epochs")
    _whole(get("best_epoch"), -1, epoch, "loop.best_epoch")
    if get("processes") is not None:
        _whole(get("processes"), 1, 10 ** 4, "loop.processes")
    for key in ("best_acc", "loop_s"):
        if not _number(get(key)):
            raise ValueError(f"{RunDir.CKPT_STATE}: loop.{key} is {json.dumps(get(key))[:40]}, not a number")
    history, partial = get("history"), get("partial")
    if not (isinstance(history, list) and len(history) == epoch and all(
            isinstance(row, dict) and all(v is None or isinstance(v, (int, float, str)) for v in row.values())
            for row in history)):
        raise ValueError(f"{RunDir.CKPT_STATE}: loop.history is not {epoch} metrics rows (one per finished epoch)")
    if not (isinstance(partial, dict) and set(partial) <= {"seen", "loss_sum", "correct"}
            and all(_number(v) for v in partial.values())):
        raise ValueError(f"{RunDir.CKPT_STATE}: loop.partial is {json.dumps(partial)[:60]}, not the running sums "
                         f"of a stopped epoch")


def _like(current, saved) -> bool:
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return _number(saved)
    if isinstance(current, str):
        return isinstance(saved, str)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(current)
    if isinstance(current, dict):
        return isinstance(saved, dict)
    return saved is None or isinstance(saved, (bool, int, float, str))  # e.g. `fused`: None or a device's choice


def _check_like(current, saved, where: str, exact: bool = False) -> None:
    """`saved` of the kind this code's own `current` value is (a number for a number, a list of
    the same length, a mapping; exact: with no keys `current` lacks, for objects that take every
    key as an attribute, timm's schedulers): a value that would only fail mid-training (an lr
    "fast") fails here, naming where."""
    if not _like(current, saved) or (exact and isinstance(current, dict) and not set(saved) <= set(current)):
        raise ValueError(f"{where} is {json.dumps(saved, default=str)[:60]}, where this run has "
                         f"{json.dumps(current, default=str)[:60]}")
    if isinstance(current, dict):
        for k in set(current) & set(saved):
            _check_like(current[k], saved[k], f"{where}.{k}")
    elif isinstance(current, (list, tuple)):
        for i, (a, b) in enumerate(zip(current, saved)):
            _check_like(a, b, f"{where}[{i}]")


def _same_groups(groups, optimizer) -> bool:
    """Whether optimizer.json's parameter groups have this optimizer's sizes."""
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ValueError(f"{RunDir.CKPT_OPTIMIZER_JSON}: param_groups is not a list of parameter groups")
    return [len(g["params"]) for g in groups] == [len(g["params"]) for g in optimizer.param_groups]


def _check_optimizer(ckpt: Path, optimizer) -> None:
    """optimizer.json and optimizer.safetensors against this optimizer: its groups' settings, and
    per-parameter state under the saved parameter indices, tensors of the parameter's shape (or
    one number, a step count)."""
    from safetensors import safe_open

    saved = _read_json(ckpt / RunDir.CKPT_OPTIMIZER_JSON)
    _check_like(optimizer.state_dict()["param_groups"], saved["param_groups"], "optimizer.json param_groups")
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    shapes = dict(zip(ids, (tuple(p.shape) for g in optimizer.param_groups for p in g["params"])))
    if len(shapes) != len(ids):
        raise ValueError(f"{RunDir.CKPT_OPTIMIZER_JSON}: param_groups name a parameter twice")

    def index(text: str, where: str) -> int:
        if not (text.isascii() and text.isdigit() and int(text) in shapes):
            raise ValueError(f"{where}: {text[:40]!r} is not a parameter index of its param_groups")
        return int(text)

    if not isinstance(saved["state"], dict):
        raise ValueError(f"{RunDir.CKPT_OPTIMIZER_JSON}: state is not a mapping of parameter indices")
    for key, values in saved["state"].items():
        index(key, RunDir.CKPT_OPTIMIZER_JSON)
        if not isinstance(values, dict) or not all(v is None or isinstance(v, (bool, int, float, str))
                                                   for v in values.values()):
            raise ValueError(f"{RunDir.CKPT_OPTIMIZER_JSON}: state {key!r} is not a mapping of plain values")
    with safe_open(str(ckpt / RunDir.CKPT_OPTIMIZER), framework="pt") as f:
        for key in f.keys():
            number, _, name = key.partition(".")
            if not name:
                raise ValueError(f"{RunDir.CKPT_OPTIMIZER}: {key[:40]!r} is not named <parameter index>.<state name>")
            want, shape = shapes[index(number, RunDir.CKPT_OPTIMIZER)], tuple(f.get_slice(key).get_shape())
            if shape != want and int(np.prod(shape)) != 1:  # one number: a step count
                raise ValueError(f"{RunDir.CKPT_OPTIMIZER}: {key[:40]!r} has shape {shape}, its parameter {want}")


def _check_shapes(path: Path, expected: dict, bare: bool = False) -> None:
    """A weights file's tensors: this run's names (bare: without wrapper prefixes) and shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {(bare_name(k) if bare else k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    odd = sorted(set(shapes) ^ set(expected))
    if odd:
        raise ValueError(f"{path.name}: {len(odd)} tensor name(s) differ from this run's network, e.g. {odd[0][:60]!r}")
    for k, shape in shapes.items():
        if shape != tuple(expected[k]):
            raise ValueError(f"{path.name}: {k} has shape {shape}, this run's network {tuple(expected[k])}")


def _check_rng(path: Path) -> None:
    """One process's RNG states, set into scratch generators (each refuses a state of the wrong
    size or kind); CUDA's are only checked when loaded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, names = f.metadata() or {}, set(f.keys())
        tensor = f.get_tensor("torch") if "torch" in names else None
    try:
        random.Random().setstate(json.loads(meta["python"], object_hook=_untag))
        name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.Generator().set_state(tensor)
    except Exception as e:
        raise ValueError(f"{path.name}: its RNG states do not load ({type(e).__name__}: {str(e)[:120]})") from None


def epoch_batches(loader, state: LoopState, accelerator):
    """The epoch's batches, from the step a mid-epoch checkpoint stopped at. Starting a
    DataLoader iterator (its first batch) draws its workers' base seed from the global RNG; the
    interrupted process had already drawn it for this epoch, so the draw is undone here to keep
    the RNG stream exact."""
    if not state.step:
        yield from loader
        return
    if state.step >= len(loader):  # skipping them all would call an epoch finished that never trained
        raise damaged(state._source, f"its {RunDir.CKPT_STATE} stopped at step {state.step} of epoch {state.epoch + 1}, which has "
                      f"{len(loader)} steps")
    batches = iter(accelerator.skip_first_batches(loader, state.step))
    rng = torch.get_rng_state()
    first = next(batches, None)
    torch.set_rng_state(rng)
    if first is not None:
        yield first
        yield from batches


def state_dict(model: nn.Module) -> dict:
    """The bare weights on the CPU, without torch.compile's `_orig_mod.` prefix (best.pt, last.pt)."""
    sd = model.state_dict()
    return {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in sd.items()}

