"""The device side of every stage: the Accelerator, mixed precision, and CPU allocator tuning.

One place decides bf16 vs fp32 and how several CPU processes talk, so training, prediction
and the benchmarks run with the same settings.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from competition.files import CompetitionError
from competition.specs import TrainSpec

PRECISIONS = ("auto", "no", "bf16", "fp16")


def mixed_precision(setting: str = "auto") -> str:
    """Accelerate's mixed_precision for a config value: auto = bf16 where the device computes it
    natively (a GPU that has it, or a CPU with AVX512-BF16 or AMX instructions), else fp32."""
    if setting not in PRECISIONS:
        raise CompetitionError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, not {setting!r}")
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_has_bf16() else "no"
    return setting


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively. There oneDNN's bf16 convolutions are faster
    than fp32 (part1_cpu on a 2-core AMD EPYC with AVX512-BF16: 7,300 vs 5,330 training images/s,
    bench/throughput.py) at the same accuracy (bench/NOTES.md); without the instructions bf16 is
    emulated and slower than fp32, so auto keeps fp32 there. COMPETITION_CPU_BF16=0 (or 1)
    overrides the detection for a whole process tree: the tests set 0, so every machine runs
    them in fp32 and their tolerances hold."""
    forced = os.environ.get("COMPETITION_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def make_accelerator(precision: str = "auto", **kwargs):
    """An Accelerator for this machine. Several processes without a GPU (torchrun on a CPU box)
    need Accelerate's gloo backend (`cpu=True`); on CPU, freed memory is kept (keep_freed_memory);
    on a GPU, cuDNN autotuning and non-blocking batch uploads."""
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        keep_freed_memory()
    else:
        from accelerate.utils import DataLoaderConfiguration

        # Batch shapes repeat every step: cuDNN times its algorithms once per shape and keeps the fastest.
        torch.backends.cudnn.benchmark = True
        # Pinned batches are copied while the previous step still runs, instead of the host waiting.
        kwargs.setdefault("dataloader_config", DataLoaderConfiguration(non_blocking=True))
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1
    precision = mixed_precision(precision)
    _forget_other_precision(precision)
    return Accelerator(cpu=multi_cpu, mixed_precision=precision, **kwargs)


def training_accelerator(spec: TrainSpec, project_dir):
    """A training run's Accelerator: precision, gradient accumulation, trackers (logging in
    project_dir). Checkpoints are competition/checkpoints.py's, not Accelerate's save_state."""
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    loop = spec.loop
    if loop.log_with == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # never block on a login prompt
    return make_accelerator(
        loop.mixed_precision, gradient_accumulation_steps=spec.optim.grad_accum, log_with=loop.log_with,
        project_config=ProjectConfiguration(project_dir=str(project_dir)),
        # Frozen stages get no gradient while progressive unfreezing holds them; DDP must know.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(spec.schedule.unfreeze))])


def start_trackers(accelerator, name: str, log_with: str | None, record: dict) -> None:
    """Start the log_with tracker (none: nothing) of the run `name`, with `record` (the config as
    stored in the run folder) as its config; values other than numbers, texts and booleans as text."""
    if not log_with:
        return
    try:
        accelerator.init_trackers(name.replace("/", "_"), config={
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in record.items()})
    except Exception as e:
        raise CompetitionError(f"log_with={log_with}: could not start the tracker ({e}); "
                               f"pip install {log_with}, or drop log_with") from None


def _forget_other_precision(precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses an Accelerator of another precision
    ("AcceleratorState has already been initialized and cannot be changed"). Stages that run
    in one process (a bf16 training, then its prediction; selftrain's rounds; a benchmark over
    variants) each want their own, so the precision part of that state is dropped before a new
    one is made. The process group (PartialState) is kept: it is the same for every stage.
    The state is shared, so an earlier Accelerator then reports the new precision: stages take
    turns, never interleave."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state(reset_partial_state=False)


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


def progress(total: int, desc: str, show: bool = True, **kwargs):
    """A tqdm bar with ETA on the terminal; where stderr is a file or a pipe (a log, `| tee`), the
    same bar refreshed at most every 30 s, so a long step is never silent (a bar hidden off a
    terminal left predict silent for 24 minutes) and a log does not fill with refreshes."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not show, dynamic_ncols=tty, mininterval=2 if tty else 30,
                **({} if tty else {"ncols": 100}), **kwargs)


def sync() -> None:
    """Wait for queued GPU work (timing); nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def provenance() -> dict:
    """What made an artifact: the code's git commit (and whether the tree had uncommitted
    changes) and the versions of the libraries that decide the numbers."""
    import importlib.metadata
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for pkg in ("competition", "torch", "torchvision", "timm", "accelerate", "albumentations", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"commit": commit, "dirty": dirty, "versions": versions}


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

