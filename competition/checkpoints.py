"""What lets a run stop and continue exactly: the loop's state (`LoopState`), the checkpoint
hooks that keep parameter names portable across process counts and torch.compile, resuming from
the newest checkpoint that loads completely (`restore`), mid-epoch batch skipping
(`epoch_batches`), and the plain state dict that best.pt / last.pt hold (`state_dict`).

Accelerate writes the checkpoints (run/checkpoints/checkpoint_K, see competition/train.py's
make_accelerator); timm schedulers and the EMA are registered here rather than prepared
(Accelerate would step a prepared scheduler once per process).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from competition.files import CompetitionError
from competition.runs import RunDir

if TYPE_CHECKING:
    from competition.learner import Learner


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
            run.broken_checkpoint_dir.mkdir(exist_ok=True)
            shutil.move(str(c), str(run.broken_checkpoint_dir / c.name))
    accelerator.wait_for_everyone()
    return good


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


def state_dict(model: nn.Module) -> dict:
    """The bare weights on the CPU, without torch.compile's `_orig_mod.` prefix (best.pt, last.pt)."""
    sd = model.state_dict()
    return {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in sd.items()}

