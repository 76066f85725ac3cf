"""Run folders and ensemble members: the one module that knows the files inside `models/<run>/`.

    models/<run>/                  written by
        config.yaml                train    the resolved config (what the user asked for)
        data_config.yaml           train    what the data decided: classes, mean/std, image size
        best.safetensors, last.safetensors  train  the weights; config, data_config, metrics as JSON metadata
                                   (best.pt / last.pt in runs saved before: read with weights_only=True)
        checkpoints/checkpoint_K/  train    state per epoch and at a stop request (for --resume), last two;
                                            no pickle (competition/checkpoints.py writes and reads it):
            model.safetensors               the weights, bare parameter names
            optimizer.safetensors, optimizer.json  per-parameter state tensors; param_groups and numbers
            ema.safetensors                 the EMA weights (runs with ema)
            state.json                      LoopState, scheduler state, Accelerate's step, grad scaler
            random_states_<rank>.safetensors  torch/CUDA RNG states (uint8); Python/numpy ones as JSON metadata
                                            (optimizer.bin, custom_checkpoint_*.pkl, random_states_*.pkl:
                                            Accelerate's save_state in runs saved before; still resumed)
        metrics.csv, curves.png    train    one row per epoch, and its plot
        oof_logits.npy             train    float32 (n_fold, C), best weights, no TTA
        oof_index.npy              train    int64 rows of the folds CSV, sorted
        summary.json               train    held-out accuracy, epochs, times; written last: the run is finished
        oof_ood_logits.npy, oof_ood_index.npy  train  corrupted copies of held-out images (ood_check):
                                            the choose images, (19 x 5, n) rows of the folds CSV
        .lock                      train    {pid, host} of the process training it (removed at exit)
        test_labels.npy            predict  labels of the dataset's clean test split
        pred/<setting>/            predict  one folder per setting (TTA, '+bn', '+tent', '+shot', '+eata'):
            predict.json                    per output: its source (file name, size, sha1) and settings
            oof.npy, oof_ood.npy            the held-out fold and its corrupted copies, under the setting
            test.npy                        the clean test split (plain settings only)
            ood/<folder>-<content hash>/distortionNN.npy   float16 (5N, C) per OOD file
            ood/<folder>-<content hash>/score.md/.png/.json  score: the local score report on a suite

Runs that differ only in their fold form one *member* of an ensemble: its out-of-fold logits
are the union of its runs' held-out folds, its test and OOD logits the mean of its fold models.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from competition import adapt, data, folds, metrics
from competition.copies import find as copies_find, log_mean
from competition.config import base_config, comparable, read_yaml, save_config
from competition.files import CompetitionError, atomic_path, check_inside, check_name, check_writable, read_json, save_json, save_npy

_FOLD_TAG = re.compile(r"-f\d+(?=-|$)")


def run_name(cfg: dict) -> str:
    """The run folder's name: cfg name, else <presets>-<dataset>-f<fold>-s<seed> (the dataset in
    the name, so the same preset on two data sets makes two runs, not a refusal)."""
    dataset = folds.dataset_name(cfg["dataset"], cfg.get("data"))
    return cfg.get("name") or f"{cfg['preset']}-{dataset}-f{cfg['fold']}-s{cfg['seed']}"


def project_paths(cfg: dict, run: "RunDir") -> dict:
    """A config read from a run's own files (config.yaml, the weights' metadata) with the folders
    that decide where things are written taken from this project, never from the file (a run
    folder someone sent may name any folder): data_dir (downloads, decoded and corrupted-copy
    caches) is base.yaml's, relative to where the command runs; models_dir is the folder the run
    lies in (the one its nested name hangs from). folds_dir stays: its CSV is only read."""
    name = Path(cfg["name"]).parts if isinstance(cfg.get("name"), str) and cfg["name"] else ()
    depth = len(name) if name and len(name) <= len(run.path.parts) and run.path.parts[-len(name):] == name else 1
    return {**cfg, "data_dir": base_config()["data_dir"], "models_dir": str(run.path.parents[depth - 1])}


def member_key(name: str) -> str:
    """A run name without its fold tag: part1-demo-digits-f3-s0 -> part1-demo-digits-s0 (the ensemble member)."""
    return _FOLD_TAG.sub("", Path(name).name)


def source_stamp(path) -> list:
    """What an output was made from, for predict.json: the input file's name, size and content
    hash. Content, not place: moving or copying data/ keeps every prediction valid, and a file
    changed in place (same size, new bytes) invalidates the outputs made from it."""
    path = Path(path)
    return [path.name, path.stat().st_size, content_hash(path)]


_CONTENT_HASHES: dict[tuple, str] = {}


def content_hash(path) -> str:
    """sha1 of a file's bytes (about 1 s per GB), computed once per process and file version."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_HASHES:
        _CONTENT_HASHES[key] = file_hash(path)
    return _CONTENT_HASHES[key]


def setting_name(tta_name: str, average: str = "logits", adapt: str = "none", blend: float = 1.0) -> str:
    """The name of a prediction setting, its folder under pred/: the TTA ('flip', 'shift1', or a
    view list made file-safe), '-prob' for probability averaging, '+bn' / '+bn0.5' / '+tent' for
    test-time adaptation."""
    name = re.sub(r"[^\w.]", "_", tta_name) + ("-prob" if average == "prob" else "")
    if adapt != "none":
        name += f"+{adapt}" + (f"{blend:g}" if adapt == "bn" and blend != 1.0 else "")
    return name


def base_setting(setting: str) -> str:
    """The same TTA without adaptation (where clean images' outputs live)."""
    return setting.split("+")[0]


def adaptation(setting: str) -> str:
    return setting.split("+")[1] if "+" in setting else "none"


def parse_adaptation(part: str) -> tuple[str, str, float | None, float]:
    """A setting's adaptation part (what follows its '+') as (adaptation, params, ensemble_alpha,
    BN blend): 'bn0.5' -> ('bn', 'bn', None, 0.5), 'tent-all' -> ('tent', 'all', None, 1.0). The
    blend is the suffix setting_name writes after bn; the rest is adapt.parse_variant's. One
    CompetitionError naming the valid forms for anything else (a flag's value or a folder's name)."""
    blend = part[2:] if part.startswith("bn") and part[2:3].isdigit() else None
    try:
        if blend is None:
            return (*adapt.parse_variant(part), 1.0)
        value = float(blend)
        if 0.0 <= value < 1.0 and f"{value:g}" == blend:  # blend 1 has no suffix: 'bn1' names no folder
            return "bn", "bn", None, value
        raise ValueError(f"{part!r} is not an adaptation a prediction setting carries")
    except ValueError as e:
        raise CompetitionError(f"{e}; or bn<blend below 1>, e.g. bn0.5 (predict --bn-blend)") from None


def is_adaptation(part: str) -> bool:
    """Whether `part` is an adaptation predict can write (parse_adaptation accepts it)."""
    try:
        parse_adaptation(part)
    except CompetitionError:
        return False
    return True


def predict_flags(part: str) -> str:
    """predict's flags that write a setting with the adaptation part `part` (the inverse of how
    predict names it): 'tent-norm_head-ens0.99' -> '--adapt tent --learn-params norm+head
    --learn-ensemble 0.99', 'bn0.5' -> '--adapt bn --bn-blend 0.5'."""
    method, params, alpha, blend = parse_adaptation(part)
    return (f"--adapt {method}" + (f" --learn-params {params}" if params != "bn" else "")
            + (f" --learn-ensemble {alpha:g}" if alpha is not None else "")
            + (f" --bn-blend {blend:g}" if blend != 1.0 else ""))


class RunDir:
    """One run folder: its paths, and loading of what the stages wrote there."""

    CONFIG, DATA_CONFIG, SUMMARY, MANIFEST = "config.yaml", "data_config.yaml", "summary.json", "predict.json"
    OOF_LOGITS, OOF_INDEX = "oof_logits.npy", "oof_index.npy"
    TEST_LABELS = "test_labels.npy"

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: dict) -> "RunDir":
        return cls(Path(cfg["models_dir"]) / run_name(cfg))

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    def __str__(self):
        return str(self.path)

    def __eq__(self, other):
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self):
        return hash(self.path)

    def __truediv__(self, name) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def member(self) -> str:
        return member_key(self.name)

    # ---- training's files
    def weights(self, which: str = "best") -> Path:
        """best / last weights: `<which>.safetensors` (tensors, and the configs and metrics as JSON
        metadata: nothing in it can run code), or `<which>.pt` in a run saved before that format
        (read with weights_only=True)."""
        new = self.path / f"{which}.safetensors"
        old = self.path / f"{which}.pt"
        return old if old.exists() and not new.exists() else new

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def broken_checkpoint_dir(self) -> Path:
        """Where --resume moves checkpoints that do not load completely (kept for a look, never resumed)."""
        return self.path / "broken-checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (a `checkpoint_K.tmp` being written is not one)."""
        found = self.checkpoint_dir.glob("checkpoint_*")
        return sorted((p for p in found if p.name.split("_")[-1].isdigit()), key=lambda p: int(p.name.split("_")[-1]))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    KEEP_CHECKPOINTS = 2  # the newest two: a broken newest one (a crash mid-save) falls back to the other

    def next_checkpoint(self) -> tuple[Path, Path]:
        """(the folder the next save writes, the temporary folder it is written in first): numbered one
        past the newest checkpoint, so a resumed run continues the numbering."""
        latest = self.latest_checkpoint()
        path = self.checkpoint_dir / f"checkpoint_{0 if latest is None else int(latest.name.split('_')[-1]) + 1}"
        return path, path.with_name(path.name + ".tmp")

    def stale_checkpoint_tmps(self) -> list[Path]:
        """`checkpoint_K.tmp` folders a save cut short (a crash, a kill) left behind."""
        return sorted(self.checkpoint_dir.glob("checkpoint_*.tmp"))

    # The files of a checkpoint folder (competition/checkpoints.py writes and reads them): tensors
    # as safetensors, everything else as JSON, so nothing in it can run code when loaded.
    CKPT_MODEL = "model.safetensors"  # bare parameter names (any process count, with or without compile)
    CKPT_OPTIMIZER = "optimizer.safetensors"  # per-parameter state tensors, "<param index>.<name>"
    CKPT_OPTIMIZER_JSON = "optimizer.json"  # param_groups, and per-parameter state that is not a tensor
    CKPT_EMA = "ema.safetensors"
    CKPT_STATE = "state.json"  # LoopState, scheduler state_dict, Accelerate's step, grad scaler

    @staticmethod
    def checkpoint_rng(ckpt: Path, rank: int) -> Path:
        """One process's RNG states: torch and CUDA as uint8 tensors, Python's and numpy's as JSON metadata."""
        return ckpt / f"random_states_{rank}.safetensors"

    @staticmethod
    def checkpoint_rngs(ckpt: Path) -> list[Path]:
        """Every process's RNG states file a checkpoint folder holds."""
        return sorted(ckpt.glob("random_states_*.safetensors"))

    CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # Accelerate's names, newest first

    @staticmethod
    def is_legacy_checkpoint(ckpt: Path) -> bool:
        """Written by Accelerate's save_state (runs saved before the pickle-free format): no
        state.json, and its optimizer.bin or *.pkl files."""
        return not (ckpt / RunDir.CKPT_STATE).exists() and (
            (ckpt / "optimizer.bin").exists() or any(ckpt.glob("*.pkl")))

    @staticmethod
    def checkpoint_weights(ckpt: Path) -> dict:
        """The model state dict a legacy Accelerate checkpoint folder holds (safetensors, or torch
        read with weights_only=True)."""
        import torch
        from safetensors.torch import load_file

        name = next((n for n in RunDir.CHECKPOINT_WEIGHTS if (ckpt / n).exists()), RunDir.CHECKPOINT_WEIGHTS[0])
        return load_file(ckpt / name) if name.endswith(".safetensors") else torch.load(
            ckpt / name, map_location="cpu", weights_only=True)

    @staticmethod
    def checkpoint_problem(ckpt: Path, ema: bool) -> str | None:
        """Why a checkpoint folder would not resume exactly (a missing, empty, truncated or
        unparsable file), or None. `ema`: the run keeps an EMA. Every tensor file is read through
        and every JSON parsed, so a bad checkpoint is found before anything of it is loaded."""
        if RunDir.is_legacy_checkpoint(ckpt):
            return RunDir._legacy_checkpoint_problem(ckpt, 2 + ema)
        from safetensors.torch import load_file, safe_open

        needed = [RunDir.CKPT_STATE, RunDir.CKPT_MODEL, RunDir.CKPT_OPTIMIZER, RunDir.CKPT_OPTIMIZER_JSON] + \
            ([RunDir.CKPT_EMA] if ema else [])
        # Every process that wrote the checkpoint left its RNG states (Accelerate would go on without).
        # The count comes from a file that may have been sent: checked against the files there before
        # any name is built from it (ten million names filled the memory).
        loop = (read_json(ckpt / RunDir.CKPT_STATE, {}, kind=dict)).get("loop")
        processes = (loop.get("processes") if isinstance(loop, dict) else None) or 1  # state.json: reported below
        present = len(RunDir.checkpoint_rngs(ckpt))
        if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= max(present, 1):
            return (f"{RunDir.CKPT_STATE} says {processes!r} processes wrote it, but {present} "
                    f"random_states_<rank>.safetensors are there")
        needed += [RunDir.checkpoint_rng(ckpt, r).name for r in range(processes)]
        missing = [n for n in needed if not (ckpt / n).exists()]
        if missing:
            return f"{', '.join(missing)} missing"
        for name in needed:
            try:
                if name.endswith(".safetensors"):
                    load_file(ckpt / name)  # reads every tensor: a cut file fails here
                    if name.startswith("random_states_"):
                        with safe_open(str(ckpt / name), framework="pt") as f:
                            for value in (f.metadata() or {}).values():
                                json.loads(value)  # the Python and numpy RNG states
                else:
                    saved = json.loads((ckpt / name).read_text())
                    keys = {RunDir.CKPT_STATE: ("loop", "scheduler"),
                            RunDir.CKPT_OPTIMIZER_JSON: ("param_groups", "state")}[name]
                    if not isinstance(saved, dict) or not set(keys) <= set(saved):
                        raise ValueError(f"not a dict with {', '.join(keys)}")
            except Exception as e:
                return f"{name} does not load ({type(e).__name__}: {str(e)[:120]})"
        return None

    @staticmethod
    def _legacy_checkpoint_problem(ckpt: Path, custom: int) -> str | None:
        """checkpoint_problem for an Accelerate checkpoint. `custom` = objects it registered for
        checkpointing (scheduler, LoopState, EMA). Accelerate itself only logs "Could not load
        random states" and goes on, which is no longer exact."""
        from safetensors.torch import load_file

        needed = ["optimizer.bin"] + [f"custom_checkpoint_{i}.pkl" for i in range(custom)]
        model = next((n for n in RunDir.CHECKPOINT_WEIGHTS if (ckpt / n).exists()), None)
        rng = sorted(p.name for p in ckpt.glob("random_states_*.pkl"))
        missing = [n for n in needed if not (ckpt / n).exists()] + ([] if model else [RunDir.CHECKPOINT_WEIGHTS[0]]) + \
            ([] if rng else ["random_states_0.pkl"])
        if missing:
            return f"{', '.join(missing)} missing"
        from accelerate.utils import load as safe_load  # torch.load, weights_only, numpy RNG states allowed

        for name in [model] + needed + rng:
            try:
                if name.endswith(".safetensors"):
                    load_file(ckpt / name)
                else:
                    # weights_only: tensors, containers, numbers and numpy arrays, nothing that runs
                    # code. Accelerate itself reads custom_checkpoint_*.pkl with weights_only=False, so
                    # this check (before its load_state) is what keeps a planted file from running.
                    safe_load(ckpt / name, map_location="cpu", weights_only=True)
            except Exception as e:
                return f"{name} does not load as plain weights ({type(e).__name__}: {str(e)[:120]})"
        return None

    def own(self, path) -> Path:
        """`path`, a folder or file under the run folder, before it is written, moved or deleted:
        refused if it or a folder between it and the run folder is a symbolic link, or it resolves
        outside the run folder (a sent run whose pred/ or checkpoints/ links elsewhere would
        otherwise write, move or delete there)."""
        path, p = Path(path), self.path
        for part in path.relative_to(self.path).parts:
            p = p / part
            if p.is_symlink():
                raise CompetitionError(f"{p} is a symbolic link (to {os.readlink(p)}): a run's own files and folders "
                                       f"must lie inside {self.path}; remove the link (a copy of what it points to "
                                       f"may replace it), then rerun; nothing was written")
        check_inside(path, self.path, f"{path} (a file of the run {self.path})")
        return path

    def move_aside(self, what: str) -> Path:
        """Rename the folder to a new hidden sibling `.<name>.<what>-<random>` (for --force); returns it.
        The name is made here, new (mkdtemp) and hidden, and no run name starts with a dot
        (files.NAME_RULE): the folder the caller deletes later is only ever this copy, never a run.
        A copy an earlier, killed --force left stays until the next --force of this run (asides)."""
        import tempfile

        aside = Path(tempfile.mkdtemp(prefix=f".{self.name}.{what}-", dir=self.path.parent))
        try:
            os.rename(self.path, aside)  # onto the empty folder mkdtemp made: replaced in one step
        except OSError:
            aside.rmdir()
            raise
        return aside

    def asides(self, what: str = "replaced") -> list[Path]:
        """The copies of this run move_aside made beside it: folders (never links) named exactly
        `.<name>.<what>-` and mkdtemp's 8 characters; nothing else (a run, a file) is ever one."""
        rule = re.compile(re.escape(f".{self.name}.{what}-") + r"[a-z0-9_]{8}")
        return sorted(p for p in self.path.parent.glob(f".{glob.escape(self.name)}.{what}-*")
                      if rule.fullmatch(p.name) and p.is_dir() and not p.is_symlink())

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def curves_png(self) -> Path:
        return self.path / "curves.png"

    # Keys every config train.py saved holds, which every later stage indexes (its folds file); an
    # empty or cut file lacks them.
    CONFIG_KEYS = ("dataset", "folds_dir", "fold")

    def config(self) -> dict:
        """The resolved config the run was trained with, as this project reads it (project_paths:
        its data_dir is this project's, never the one the file names)."""
        path = self.path / self.CONFIG
        if not path.exists():
            raise CompetitionError(f"{path} is missing: {self.path} is not a run folder written by "
                                   f"competition/train.py")
        cfg = read_yaml(path)
        missing = [k for k in self.CONFIG_KEYS if k not in cfg]
        if missing:
            raise CompetitionError(f"{path} is {'empty' if not cfg else 'not a whole run config'} (no "
                                   f"{', '.join(missing)}): restore the run's own config.yaml, or retrain the run "
                                   f"with --force")
        return project_paths(cfg, self)

    def data_config(self, *need: str) -> dict:
        """classes, num_classes, mean, std, image_size, channels_last (older runs kept them in config.yaml);
        refused, naming the file and the key, when it lacks num_classes or a key of `need`."""
        path = self.path / self.DATA_CONFIG
        if path.exists():
            out = read_yaml(path)
            missing = [k for k in ("num_classes", *need) if k not in out]
            if missing:
                raise CompetitionError(f"{path} lacks {', '.join(missing)} (train writes it; edited or cut short?): "
                                       f"restore it from the run's copy, or retrain the run with --force")
            return out
        cfg = self.config()
        return {k: cfg.get(k) for k in ("num_classes", "classes", "mean", "std", "image_size", "channels_last")}

    def save_configs(self, cfg: dict, data_cfg: dict) -> None:
        save_config(cfg, self.path / self.CONFIG)
        save_config(data_cfg, self.path / self.DATA_CONFIG)

    def load_weights(self, which: str = "best") -> dict:
        """best.pt / last.pt as a dict (model, config, data_config, metrics), read without running code."""
        return load_weights(self.weights(which))

    def save_weights(self, which: str, state_dict: dict, cfg: dict, data_cfg: dict, metrics: dict) -> None:
        """`<which>.safetensors`: the state dict's tensors, and config, data config and metrics as
        JSON in its metadata. A legacy `<which>.pt` beside it is removed (it would be stale)."""
        from safetensors.torch import save_file

        path = self.path / f"{which}.safetensors"
        meta = {k: json.dumps(v, default=_plain) for k, v in
                (("config", cfg), ("data_config", data_cfg), ("metrics", metrics))}
        # safetensors refuses tensors that share memory or are not contiguous (channels-last).
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        with atomic_path(path, ".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        (self.path / f"{which}.pt").unlink(missing_ok=True)

    def load_model(self, which: str = "best", map_location="cpu"):
        """(model in eval mode, config, data config) of `best.pt` or `last.pt`. The architecture is
        rebuilt from the config without fetching ImageNet weights: the file holds every parameter,
        each a finite float where the network holds floats (check_weights, on the one read)."""
        from competition import models

        path = self.weights(which)
        if not path.exists():
            raise CompetitionError(f"{path} is missing: train this run first (python competition/train.py ...) "
                                   f"or check the run folder name")
        try:
            ckpt = load_weights(path, map_location)
            cfg = project_paths(ckpt["config"], self) if isinstance(ckpt.get("config"), dict) else self.config()
            data_cfg = ckpt.get("data_config") or {k: cfg.get(k) for k in ("num_classes", "classes", "mean", "std",
                                                                           "image_size", "channels_last")}
            model = models.model_from_config({**cfg, "pretrained": False, "weights": None}, data_cfg["num_classes"])
            state = ckpt["model"]
            check_weights(path, state, model.state_dict())
            model.load_state_dict(state)
        except CompetitionError:
            raise
        except Exception as e:
            raise CompetitionError(f"{path} could not be loaded ({type(e).__name__}: {str(e)[:300]}); "
                                   f"it may be truncated: retrain the run or restore the file") from None
        return model.eval(), cfg, data_cfg

    def save_oof(self, index: np.ndarray, logits: np.ndarray) -> None:
        save_npy(self.path / self.OOF_LOGITS, logits.astype(np.float32))
        save_npy(self.path / self.OOF_INDEX, index.astype(np.int64))

    def oof_index(self) -> np.ndarray | None:
        path = self.path / self.OOF_INDEX
        return load_array(path) if path.exists() else None

    def summary(self) -> dict:
        out = read_json(self.path / self.SUMMARY, {})
        if not isinstance(out, dict):
            raise CompetitionError(f"{self.path / self.SUMMARY} holds a JSON {type(out).__name__}, not the run's "
                                   f"summary: delete it and rerun train with --resume (it writes the summary again)")
        return out

    @property
    def finished(self) -> bool:
        """summary.json is written last (atomically), so only a run that wrote every output has it."""
        return (self.path / self.SUMMARY).exists()

    # ---- the lock: one process trains a run folder at a time
    LOCK = ".lock"

    def lock_holder(self, take_over: bool = True) -> dict | None:
        """{pid, host, since} of the live process holding the lock, or None. A lock left by a dead
        process on this host is stale: removed with a message (take_over), or just ignored; one that
        is not a lock this code wrote is refused with the fix (take_over), or just ignored."""
        path = self.path / self.LOCK
        if not path.exists():
            return None
        holder = read_json(path, kind=dict)
        if holder is None and not take_over:
            return None
        if holder is None:  # not one acquire_lock wrote: whose it is cannot be told, so it is not taken over
            raise CompetitionError(f"{path} is not a lock this code wrote (no JSON mapping of pid and host): if no "
                                   f"process is training {self.path}, delete {path}, then rerun")
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            if not take_over:
                return None
            print(f"{self.path}: taking over the lock of pid {holder.get('pid')}, which is no longer running")
            path.unlink(missing_ok=True)
            return None
        return holder

    def check_unlocked(self, doing: str) -> None:
        holder = self.lock_holder()
        if holder is not None and holder.get("pid") != os.getpid():
            raise CompetitionError(
                f"{self.path} is being trained by process {holder.get('pid')} on {holder.get('host')} (since "
                f"{holder.get('since')}): wait for it to finish before {doing}, or stop it; if that process is "
                f"gone, delete {self.path / self.LOCK}")

    def acquire_lock(self) -> None:
        """Hold the run folder's lock (created exclusively: of two racing processes, one wins)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.check_unlocked("starting another")
        try:
            fd = os.open(self.path / self.LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if read_json(self.path / self.LOCK, {}, kind=dict).get("pid") == os.getpid():
                return
            self.check_unlocked("starting another")
            return self.acquire_lock()
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)

    def release_lock(self) -> None:
        path = self.path / self.LOCK
        if read_json(path, {}, kind=dict).get("pid") == os.getpid():
            path.unlink(missing_ok=True)

    def weights_hash(self) -> str:
        """sha1 of the best weights file: what predict records, so logits of replaced weights are never reused."""
        path = self.weights("best")
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        if getattr(self, "_hash_key", None) != key:
            self._hash, self._hash_key = file_hash(path), key
        return self._hash

    def save_summary(self, summary: dict) -> None:
        save_json(self.path / self.SUMMARY, summary)

    # ---- prediction's files: pred/<setting>/, one folder per TTA and adaptation setting, so
    # predicting with another setting never changes what an earlier submission was made from.
    PRED = "pred"
    OOF_OOD, OOF_OOD_INDEX = "oof_ood_logits.npy", "oof_ood_index.npy"
    # Inside pred/<setting>/: the held-out fold, its corrupted copies, the clean test split; and a
    # local score's report inside pred/<setting>/ood/<suite>/.
    PRED_OOF, PRED_OOF_OOD, PRED_TEST, SCORE_JSON = "oof.npy", "oof_ood.npy", "test.npy", "score.json"

    def pred_dir(self, setting: str) -> Path:
        return self.path / self.PRED / setting

    def settings(self) -> list[str]:
        """The settings predict has written outputs for."""
        root = self.path / self.PRED
        return sorted(p.name for p in root.iterdir() if (p / self.MANIFEST).exists()) if root.is_dir() else []

    def manifest(self, setting: str) -> dict:
        """pred/<setting>/predict.json: {output path relative to it: {source, weights, ...}}; {} if
        absent or unreadable (everything is then redone), and entries that are not records left out."""
        found = read_json(self.pred_dir(setting) / self.MANIFEST, {}, kind=dict)
        return {rel: record for rel, record in found.items() if isinstance(record, dict)}

    def write_output(self, setting: str, rel: str, array: np.ndarray, record: dict) -> None:
        """Save one prediction output and record how it was made (the array first: a crash between
        the two leaves an output that is redone, never a record of one that is missing)."""
        save_npy(self.own(self.pred_dir(setting) / rel), array)
        manifest = self.manifest(setting)
        manifest[rel] = record
        save_json(self.pred_dir(setting) / self.MANIFEST, manifest)

    def is_current(self, setting: str, rel: str, record: dict) -> bool:
        """`rel` exists and was made with exactly `record` (which names the weights' hash)."""
        return (self.pred_dir(setting) / rel).exists() and self.manifest(setting).get(rel) == record

    @staticmethod
    def ood_rel(ood: data.OodSet, src: Path) -> str:
        """Where a setting keeps the logits of one OOD file: ood/<folder name>-<hash of its files'
        contents>/, so two OOD folders (the competition's, local suites) never share an output,
        and the same folder moved or copied elsewhere finds its outputs again."""
        key = hashlib.sha1("|".join(f"{p.name}:{content_hash(p)}" for p in ood.files).encode()).hexdigest()[:8]
        return f"ood/{ood.path.resolve().name}-{key}/{src.name}"

    def _checked(self, setting: str, rel: str, how: str, source=None) -> tuple[Path, dict]:
        path, entry = self.pred_dir(setting) / rel, self.manifest(setting).get(rel)
        if not path.exists() or entry is None:
            raise CompetitionError(f"{path} is missing: {how}")
        if source is not None and entry.get("source") != source:
            raise CompetitionError(f"{path} was predicted from other files than now (changed since?): {how} "
                                   f"(it redoes stale outputs)")
        if entry.get("weights") != self.weights_hash():
            raise CompetitionError(f"{path} was predicted with another {self.weights('best').name} than the one "
                                   f"in {self.path} now (retrained or replaced since): {how} (it redoes it)")
        return path, entry

    def how(self, setting: str, ood: data.OodSet | None = None) -> str:
        """The predict command that writes `setting`'s outputs."""
        tta_name, _, part = setting.partition("+")
        tta_name, _, average = tta_name.partition("-")
        try:
            flags = f" {predict_flags(part)}" if part else ""
        except CompetitionError as e:  # a hint, never the error: the caller's message still says what is wrong
            return f"no predict command writes {setting} ({e})"
        return (f"run `python -m competition.predict {self.path}{f' --ood-dir {ood.path}' if ood else ''} --tta "
                f"{tta_name}{' --average prob' if average else ''}{flags}` first")

    def ood_logits_paths(self, ood: data.OodSet, setting: str) -> list[Path]:
        """The run's logits for every file of `ood` under `setting`, checked: present, predicted
        from these very files and today's best.pt. A clear error says which predict command to run."""
        how, out = self.how(setting, ood), []
        for src in ood.files:
            path, entry = self._checked(setting, self.ood_rel(ood, src), how, source_stamp(src))
            if entry.get("ood_files", len(ood.files)) != len(ood.files):
                raise CompetitionError(f"{ood.path} held {entry['ood_files']} OOD files when {self.path} was "
                                       f"predicted, and holds {len(ood.files)} now: restore the folder, or {how}")
            out.append(path)
        return out

    def oof_tta(self, setting: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the folds CSV, float32 TTA logits) of the held-out fold, checked (clean images:
        an adapted setting uses its base setting's)."""
        index = self.oof_index()
        if index is None:
            raise CompetitionError(f"{self.path} has no {self.OOF_INDEX} (trained with fold=-1?): without "
                                   f"out-of-fold logits it cannot be weighted; leave it out of the ensemble")
        base = base_setting(setting)
        path, _ = self._checked(base, self.PRED_OOF, self.how(base))
        logits = load_array(path, logits=True)
        if len(index) != len(logits):
            raise CompetitionError(f"{path}: {len(logits)} rows but {self.OOF_INDEX} has {len(index)}; "
                                   f"rerun predict --force")
        return index, logits.astype(np.float32)

    def oof_ood_index(self) -> np.ndarray | None:
        """(corruptions * 5, n) held-out rows of train's ood_check, one row per corruption and severity."""
        path = self.path / self.OOF_OOD_INDEX
        if not path.exists():
            return None
        index = load_array(path)
        # runs trained before each cell had its own images saved one row set for all 19 x 5 cells
        return np.broadcast_to(index, (data.OOD_FILES * data.SEVERITIES, len(index))) if index.ndim == 1 else index

    def oof_ood(self, setting: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the folds CSV (corruptions * 5, n), float32 logits (corruptions * 5, n, C)) of
        the corrupted copies of held-out images (train's ood_check), under `setting`, checked."""
        index = self.oof_ood_index()
        if index is None:
            raise CompetitionError(f"{self.path} has no {self.OOF_OOD_INDEX}: it was trained with ood_check=0, so "
                                   f"there are no corrupted out-of-fold images to fit on; use --fit-on clean")
        path, _ = self._checked(setting, self.PRED_OOF_OOD, self.how(setting))
        logits = load_array(path, logits=True).astype(np.float32)
        return index, logits.reshape(index.shape + logits.shape[-1:])

    def has_oof_ood(self, setting: str) -> bool:
        """Whether predict wrote the corrupted out-of-fold logits under `setting` (the *choose*
        images ensemble --adapt auto decides on)."""
        if self.oof_ood_index() is None:
            return False
        try:
            self._checked(setting, self.PRED_OOF_OOD, self.how(setting))  # present, and from today's best.pt
        except CompetitionError:
            return False
        return True

    def test_logits(self, setting: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(clean test logits, labels) when predict wrote them from today's best.pt, else None."""
        base = base_setting(setting)
        path = self.pred_dir(base) / self.PRED_TEST
        if not path.exists() or self.manifest(base).get(self.PRED_TEST, {}).get("weights") != self.weights_hash():
            return None
        return load_array(path, logits=True), load_array(self.path / self.TEST_LABELS)

    def save_test(self, setting: str, logits: np.ndarray, labels: np.ndarray, record: dict) -> None:
        save_npy(self.path / self.TEST_LABELS, labels.astype(np.int64))
        self.write_output(setting, self.PRED_TEST, logits, record)

    def score_prefix(self, setting: str, ood: data.OodSet) -> Path:
        """Where score writes a run's report on a suite: pred/<setting>/ood/<suite>/score(.md/.png/.json)."""
        return self.pred_dir(setting) / Path(self.ood_rel(ood, ood.files[0])).parent / "score"

    def scores(self) -> list[dict]:
        """Every local score written for this run, newest first: score.json, and score-balanced.json /
        score-copies.json (`score RUN --balance / --copies`), whose "balance" / "copies" say so."""
        stem = Path(self.SCORE_JSON).stem
        found = [read_json(p, kind=dict) for p in (self.path / self.PRED).glob(f"*/ood/*/{stem}*.json")]
        return sorted((f for f in found if f), key=lambda r: r.get("scored", ""), reverse=True)

    def save_oof_ood(self, index: np.ndarray, logits: np.ndarray) -> None:
        """train's plain OOF-OOD logits (best weights, no TTA) and their held-out rows."""
        save_npy(self.path / self.OOF_OOD, logits.astype(np.float32))
        save_npy(self.path / self.OOF_OOD_INDEX, index.astype(np.int64))

    def folds_labels(self) -> tuple[Path, np.ndarray]:
        """The folds CSV the run was trained with, and its labels."""
        cfg = self.config()
        path = folds.folds_path(folds.dataset_name(cfg["dataset"], cfg.get("data")), cfg["folds_dir"])
        return path, folds.read_folds(path)["label"].to_numpy()


def _plain(value):
    """JSON for the few non-JSON values a config or metrics row holds (numpy scalars, paths)."""
    return value.item() if hasattr(value, "item") else str(value)


def load_weights(path, map_location="cpu") -> dict:
    """Run weights as {"model": state dict, "config", "data_config", "metrics"}, read without
    running code: a .safetensors file (tensors and JSON), or a legacy .pt read with
    weights_only=True (tensors, dicts, lists, strings and numbers only), so a weights file planted
    in a run folder (a teammate's, a download) cannot run code. A file that needs more, or is
    cut or damaged, is refused with the reason."""
    import pickle

    import torch

    if Path(path).suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            model = load_file(str(path), device=str(map_location) if map_location else "cpu")
            return {"model": model, **{k: json.loads(v) for k, v in meta.items()
                                       if k in ("config", "data_config", "metrics")}}
        except FileNotFoundError:
            raise CompetitionError(f"{path} is missing: train the run first (or check the run folder)") from None
        except (SafetensorError, OSError, ValueError) as e:  # a cut or damaged file, bad JSON metadata
            raise CompetitionError(f"{path} could not be read ({type(e).__name__}: {str(e)[:150]}); it may be "
                                   f"truncated: restore it or retrain the run") from None
    try:
        return _run_weights(torch.load(path, map_location=map_location, weights_only=True), Path(path))
    except pickle.UnpicklingError as e:
        raise CompetitionError(f"{path} holds more than weights (refused unrun: {str(e).splitlines()[0][:200]}); "
                               f"load only weights files you trust, or retrain the run") from None
    except FileNotFoundError:
        raise CompetitionError(f"{path} is missing: train the run first (or check the run folder)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a cut or damaged file
        raise CompetitionError(f"{path} could not be read ({type(e).__name__}: {str(e)[:150]}); it may be "
                               f"truncated: restore it or retrain the run") from None


def check_weights(path, state: dict, own: dict) -> None:
    """Refuse, in one line naming the file, a state dict that does not fit the network (`own`, its
    state dict), or one that would predict garbage with exit status 0: a tensor that is not floating
    point where the network holds floats (load_state_dict casts an int64 copy without a word), one
    holding NaN or inf, or a negative batch-norm variance (every logit NaN: class 0)."""
    import torch

    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    missing, extra = [k for k in own if k not in state], [k for k in state if k not in own]
    if shapes or missing or extra:  # torch's own message is many lines, cut mid-sentence by the caller
        parts = ([f"{len(shapes)} tensor(s) of another shape ({shapes[0]!r}: {tuple(state[shapes[0]].shape)} in the file, "
                  f"{tuple(own[shapes[0]].shape)} in the network)"] if shapes else []) + \
                ([f"{len(missing)} tensor(s) missing (e.g. {missing[0]!r})"] if missing else []) + \
                ([f"{len(extra)} tensor(s) the network does not have (e.g. {extra[0]!r})"] if extra else [])
        raise CompetitionError(f"{path} does not fit the network its config describes: {'; '.join(parts)}: "
                               f"the file belongs to another model or config, or was edited; restore the run's own "
                               f"files, or retrain the run")
    ints = [k for k, v in state.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if ints:
        raise CompetitionError(f"{path}: {len(ints)} of {len(state)} tensors are not floating point ({ints[0]!r} "
                               f"is {state[ints[0]].dtype}): a network's weights are floats, so the file was "
                               f"converted or edited; restore the run's own file, or retrain the run")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CompetitionError(f"{path}: {len(bad)} of {len(state)} tensors hold NaN or infinite values (e.g. "
                               f"{bad[0]!r}): training diverged or the file was edited; retrain the run (a "
                               f"lower lr), or restore its file")
    negative = [k for k, v in state.items() if k.endswith("running_var") and v.is_floating_point() and (v < 0).any()]
    if negative:  # a variance below 0 makes every normalised activation NaN: a submission of class 0
        raise CompetitionError(f"{path}: {negative[0]!r} holds negative values, and a batch-norm variance cannot be "
                               f"negative: the file was edited or damaged; restore the run's own file, or retrain")


def _run_weights(obj, path: Path) -> dict:
    """A legacy .pt's content, when it is what train.py saved ({"model": state dict, "config", ...});
    else one error saying what it is. A bare state dict (torch.save(model.state_dict())) loads, but
    without the config the architecture is rebuilt from nothing, and the failure blamed model_args."""
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        fix = (f"python -c \"import torch; from competition.runs import RunDir; r = RunDir({str(path.parent)!r}); "
               f"r.save_weights({path.stem!r}, torch.load({str(path)!r}, weights_only=True), r.config(), "
               f"r.data_config(), {{}})\"")
        raise CompetitionError(f"{path} is a bare state dict ({len(obj)} tensors, e.g. {next(iter(obj))!r}), not a "
                               f"run's weights file (model, config, data_config, metrics); if {path.parent}'s "
                               f"config.yaml and data_config.yaml describe its network, convert it once: {fix}")
    what = f"a dict of {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise CompetitionError(f"{path} holds {what}, not a run's weights (a dict of model, config, data_config, "
                           f"metrics, as train.py saves): restore the run's own file, or retrain the run")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def expand_runs(patterns: list[str]) -> list[RunDir]:
    """Trained run folders from paths or glob patterns (quoted, so the shell leaves them alone)."""
    runs: list[RunDir] = []
    for p in patterns:
        hits = sorted(glob.glob(str(p))) if any(c in str(p) for c in "*?[") else [p]
        if not hits:
            raise CompetitionError(f"{p} matches no run folder")
        for h in hits:
            run = RunDir(h)
            if not run.weights("best").exists():
                raise CompetitionError(f"{h} is not a trained run folder (no best.pt): train it first with "
                                       f"python competition/train.py, or check the path")
            if not run.finished:
                raise CompetitionError(f"{h} is not finished (no {RunDir.SUMMARY}: still training, or stopped): "
                                       f"continue it with `python competition/train.py ... --resume` first")
            if run not in runs:
                runs.append(run)
    return runs


# ---------------------------------------------------------------------------- members


@dataclass
class Member:
    """Runs that differ only by fold, the prediction setting used for them, and their
    out-of-fold TTA logits (rows sorted)."""
    name: str
    runs: list[RunDir]
    setting: str = "flip"
    oof_index: np.ndarray | None = None
    oof_logits: np.ndarray | None = None
    cfgs: list[dict] = field(default_factory=list)


def default_setting(cfg: dict) -> str:
    """predict's default for a run: the TTA its training validated (oof_tta), else flip."""
    tta_name = cfg.get("oof_tta") or "none"
    return setting_name("flip" if tta_name == "none" else tta_name)


def group_members(runs: list[RunDir], setting: str | None = None) -> list[Member]:
    """Group runs into members (fold runs of one config) without loading any logits; `setting`
    None: each member's default (default_setting of its config)."""
    members: dict[str, Member] = {}
    for run in runs:
        run = RunDir(run) if not isinstance(run, RunDir) else run
        cfg = run.config()
        m = members.setdefault(run.member, Member(run.member, [], setting or default_setting(cfg)))
        m.runs.append(run)
        m.cfgs.append(cfg)
    return list(members.values())


def load_oof(members: list[Member]) -> list[Member]:
    """Each member's out-of-fold TTA logits under its setting: the union of its runs' folds."""
    for mem in members:
        idx, logits = zip(*(run.oof_tta(mem.setting) for run in mem.runs))
        idx_all = np.concatenate(idx)
        if len(np.unique(idx_all)) != len(idx_all):
            raise CompetitionError(f"member {mem.name}: runs {', '.join(r.name for r in mem.runs)} hold out "
                                   f"overlapping rows (the same fold twice?); name the runs to combine explicitly")
        order = np.argsort(idx_all)
        mem.oof_index, mem.oof_logits = idx_all[order], np.concatenate(logits)[order]
    return members


def load_members(runs: list[RunDir], setting: str | None = None) -> list[Member]:
    return load_oof(group_members(runs, setting))


def member_oof_ood(mem: Member) -> tuple[np.ndarray, np.ndarray]:
    """(rows (corruptions * 5, n), logits (corruptions * 5, n, C)) of a member's corrupted
    out-of-fold images: the union over its runs' folds, rows sorted within each cell."""
    idx, logits = zip(*(run.oof_ood(mem.setting) for run in mem.runs))
    idx_all, z = np.concatenate(idx, axis=1), np.concatenate(logits, axis=1)
    order = np.argsort(idx_all, axis=1, kind="stable")
    return np.take_along_axis(idx_all, order, 1), np.take_along_axis(z, order[..., None], 1)


def members_from_json(path) -> tuple[list[Member], np.ndarray, dict]:
    """The members, settings and weights a submission's JSON sidecar recorded (for score, board)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
        members = []
        for m in spec["members"]:
            runs = [RunDir(r) for r in m["runs"]]
            members.append(Member(m["name"], runs, m["setting"], cfgs=[r.config() for r in runs]))
        weights = metrics.member_weights([m["weight"] for m in spec["members"]], path)
        # selftrain writes <out-dir>/selftrain/<name>-st<r>/: a name like ../../x would write outside it
        if "name" in spec:
            check_name(spec["name"], f"the \"name\" in {path} (a submission name)")
    except FileNotFoundError:
        raise CompetitionError(f"{path} does not exist: make it with python -m competition.ensemble") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CompetitionError(f"{path} is not an ensemble JSON written by competition.ensemble ({e})") from None
    return members, weights, spec


def recorded_balance(spec: dict) -> bool:
    """Whether a submission JSON says its classes were balanced (ensemble --balance); a JSON from
    before the flag, or one whose value is not true, was not."""
    return spec.get("balance") is True


def recorded_copies(spec: dict) -> bool:
    """Whether a submission JSON says each picture was predicted from all its copies (ensemble
    --copies); the same rule as recorded_balance."""
    return spec.get("copies") is True


def recorded_post(spec: dict) -> dict:
    """ood_logits' keyword arguments for the post-processing a submission JSON records."""
    return {"balance": recorded_balance(spec), "copies": recorded_copies(spec)}


def honest_post(spec: dict, target: Path, ood: data.OodSet, say=print) -> dict:
    """The post-processing to score a submission with on a local suite. Copies: a suite holds its
    pictures in one order by construction, but the submission's own files may not have (its JSON
    records what ensemble found there); where they held none, the suite's figure is made without
    copies, as the submission was, and where only some of their cells were linked the figure is
    flagged as optimistic."""
    post = recorded_post(spec)
    found = spec.get("copies_found")
    if not post["copies"] or not isinstance(found, dict) or Path(spec.get("ood_dir", "")) == ood.path:
        return post
    linked, cells = found.get("linked_cells"), found.get("cells")
    if linked == 0:
        say(f"note: {target} found no copies in its own files ({spec.get('ood_dir')}), so its predictions there are "
            f"each cell's own: scored on {ood.path} without copies too")
        return {**post, "copies": False}
    if isinstance(linked, int) and isinstance(cells, int) and linked < cells:
        say(f"note: {target} linked only {linked} of {cells} cells of its own files ({spec.get('ood_dir')}), the "
            f"suite links all of its: this estimate is optimistic for --copies")
    return post


def oof_labels(members: list[Member]) -> np.ndarray:
    """Labels of the folds CSV every run was trained with (they must all share it)."""
    # resolved: one file spelled relative by one run and absolute by another is one split
    found = {run.folds_labels()[0].resolve(): run for m in members for run in m.runs}
    if len(found) != 1:
        raise CompetitionError(f"the runs were trained on different folds files ({', '.join(map(str, found))}): "
                               f"an ensemble needs one dataset and one split")
    return next(iter(found.values())).folds_labels()[1]


def num_classes(members: list[Member]) -> int:
    ks = {int(run.data_config()["num_classes"]) for m in members for run in m.runs}
    if len(ks) != 1:
        raise CompetitionError(f"the runs predict different numbers of classes {sorted(ks)}")
    return ks.pop()


def load_array(path, logits: bool = False) -> np.ndarray:
    """A run's .npy file (logits or row indices) as plain numbers, or one error naming it: an object
    array (a pickle) is never loaded, and logits must be finite (a NaN row would argmax to class 0
    and pass as a valid submission)."""
    try:
        data.check_npy(path)  # a regular file holding exactly the array its header declares
        array = np.load(path, allow_pickle=False)
    except CompetitionError as e:
        why = str(e).removeprefix(f"{path} ").split(":")[0]
        raise CompetitionError(f"{path} is not a plain numeric .npy file ({why}): delete it and rerun the step "
                               f"that wrote it (train or predict)") from None
    except (ValueError, OSError, EOFError) as e:
        raise CompetitionError(f"{path} is not a plain numeric .npy file ({str(e)[:120]}): delete it and rerun "
                               f"the step that wrote it (train or predict)") from None
    if array.dtype.kind not in "biuf":
        raise CompetitionError(f"{path} holds {array.dtype} values, not numbers: delete it and rerun the step that "
                               f"wrote it (train or predict)")
    if logits and not np.isfinite(array).all():
        raise CompetitionError(f"{path} holds NaN or infinite logits ({int((~np.isfinite(array)).sum())} values): "
                               f"rerun predict --force for this run (or retrain it if its weights are not finite)")
    return array


def member_mean(paths: list[Path]) -> np.ndarray:
    """Mean over a member's fold models of one logits file each (float32)."""
    total = None
    for p in paths:
        z = load_array(p, logits=True).astype(np.float32)
        if total is not None and z.shape != total.shape:
            raise CompetitionError(f"{p}: shape {z.shape} differs from {paths[0]}'s {total.shape}; rerun predict")
        total = z if total is None else total + z
    return total / len(paths)


def combine(member_logits: list[np.ndarray], weights) -> np.ndarray:
    """The ensemble's logits: the weighted sum of its members'."""
    return sum(float(w) * z for w, z in zip(weights, member_logits) if w > 0)


def member_test(mem: Member) -> tuple[np.ndarray, np.ndarray] | None:
    """A member's fold-averaged clean test logits and labels, when every run has current ones."""
    tests = [run.test_logits(mem.setting) for run in mem.runs]
    if any(t is None for t in tests):
        return None
    return sum(t[0].astype(np.float32) for t in tests) / len(tests), tests[0][1]


def test_logits(members: list[Member], weights) -> tuple[np.ndarray, np.ndarray] | None:
    """Ensembled clean-test logits and labels, when every run has current ones."""
    tests = [member_test(m) for m in members]
    if any(t is None for t in tests):
        return None
    return combine([t[0] for t in tests], weights), tests[0][1]


# Sinkhorn's scaling: at most this many sweeps, stopping once every class's mass is within this
# share of its equal share (a 10,000 x 100 slice converges in 10-30 sweeps).
BALANCE_SWEEPS, BALANCE_TOL = 200, 1e-4


def balance_classes(logits: np.ndarray, slices: int = data.SEVERITIES) -> np.ndarray:
    """Log-probabilities (float32, the shape of `logits`) whose predicted classes are balanced
    within each of `slices` equal blocks of rows, for OOD files whose every block holds every
    class equally (the competition's: each severity of a file is CIFAR-100's whole test split,
    100 images per class). A corruption pushes a model's predictions towards a few classes; the
    fix is the class prior that makes the block's soft counts equal. Sinkhorn-Knopp scaling of
    the softmax (rows sum to 1, columns to rows/C) finds it; it is a bias per class, so it moves
    only images near a boundary and keeps every row's ranking of the other classes.
    Written here: scipy/sklearn have no Sinkhorn, and POT (ot.sinkhorn) would be a dependency for
    twenty lines."""
    z = np.asarray(logits, dtype=np.float64)
    rows, n_classes = z.shape
    if rows % slices:
        raise CompetitionError(f"{rows} rows are not {slices} equal blocks (severities)")
    out = np.empty(z.shape, dtype=np.float32)
    for block in range(slices):
        lo, hi = block * rows // slices, (block + 1) * rows // slices
        logp = metrics.log_softmax(z[lo:hi])
        target = np.log((hi - lo) / n_classes)
        bias = np.zeros(n_classes)  # log of the per-class scale; in logs, so no class's mass can underflow
        for _ in range(BALANCE_SWEEPS):
            q = metrics.log_softmax(logp + bias)
            mass = logsumexp(q, axis=0)  # each class's soft count, in logs
            if np.abs(np.expm1(mass - target)).max() < BALANCE_TOL:
                break
            bias += target - mass
        out[lo:hi] = metrics.log_softmax(logp + bias)
    return out


def _file_logits(members: list[Member], weights, ood: data.OodSet, balance: bool):
    """ood_logits without copies: each file's ensembled (and balanced) logits."""
    per_run = {r: r.ood_logits_paths(ood, m.setting) for m in members for r in m.runs}
    for k, (src, rows) in enumerate(zip(ood.files, ood.rows)):
        zs = []
        for m in members:
            z = member_mean([per_run[r][k] for r in m.runs])
            if len(z) != rows:
                raise CompetitionError(f"{per_run[m.runs[0]][k]} has {len(z)} rows but {src} has {rows}; "
                                       f"rerun predict with --force")
            zs.append(z)
        z = combine(zs, weights)
        yield src, balance_classes(z) if balance else z


def ood_logits(members: list[Member], weights, ood: data.OodSet, balance: bool = False, copies: bool = False):
    """Yield (OOD file, ensembled logits float32 (rows, C)) file by file: never all in memory.
    `balance`: log-probabilities balanced per severity (balance_classes) instead. `copies`: where
    cells of the files hold the same pictures in one order (copies.find, read from the images),
    every copy's row is the log of the mean of its copies' probabilities (after balancing): two
    passes over the logits, one to sum each group's probabilities, one to yield."""
    if not copies:
        yield from _file_logits(members, weights, ood, balance)
        return
    found = find_copies(ood)
    n = ood.rows[0] // data.SEVERITIES
    group_of = {cell: g for g, cells in enumerate(found.groups) for cell in cells}
    sums = {}
    for k, (_, z) in enumerate(_file_logits(members, weights, ood, balance)):
        p = metrics.softmax(z)
        for s in range(data.SEVERITIES):
            g = group_of.get(k * data.SEVERITIES + s)
            if g is not None:
                sums[g] = sums.get(g, 0.0) + p[s * n:(s + 1) * n]
    shared = {g: log_mean(total, len(found.groups[g])) for g, total in sums.items()}
    for k, (src, z) in enumerate(_file_logits(members, weights, ood, balance)):
        z = np.array(z, dtype=np.float32)
        for s in range(data.SEVERITIES):
            g = group_of.get(k * data.SEVERITIES + s)
            if g is not None:
                z[s * n:(s + 1) * n] = shared[g]
        yield src, z


_FOUND: dict = {}


def find_copies(ood: data.OodSet):
    """copies.find(ood), once per folder and file contents (ensemble, score and board ask again)."""
    key = (str(ood.path.resolve()), tuple(tuple(source_stamp(f)) for f in ood.files))
    if key not in _FOUND:
        _FOUND[key] = copies_find(ood)
    return _FOUND[key]


def file_hash(path) -> str:
    """sha1 of a file's bytes: what a submission JSON pins for every logits file it used."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- a training run's folder, start to end


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
    check_place(run, cfg)
    if main:
        check_writable(run.path.parent, "models_dir")
        if run.path.exists():
            run.check_unlocked("training it again")
    exists, aside = (run / RunDir.CONFIG).exists(), None
    stale = run.asides() if main else []  # copies a killed --force left: deleted with the next --force's own
    replacing = force and not resume and main and run.path.exists()
    if stale and not replacing:
        accelerator.print(f"{run}: {len(stale)} copy(ies) of it an interrupted --force set aside remain in "
                          f"{run.path.parent} ({stale[0].name}{', ...' if len(stale) > 1 else ''}): the next --force "
                          f"of the run deletes them once it has trained an epoch, or delete them yourself")
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
    if replacing:
        check_inside(run.path, cfg["models_dir"], "--force (the run folder to replace)")
        aside = run.move_aside("replaced")
        older = f" (with {len(stale)} older copy(ies) an interrupted --force left)" if stale else ""
        accelerator.print(f"--force: {run} moved to {aside}; it is deleted{older} once the new run has finished an "
                          f"epoch")
    if main:
        run.acquire_lock()
    accelerator.wait_for_everyone()
    return aside


def drop_asides(run: RunDir, aside: Path, models_dir) -> None:
    """--force: the new run has finished an epoch; the copy it set aside goes now, and with it any
    copy an earlier, killed --force left (RunDir.asides), each checked to lie strictly inside models_dir."""
    import shutil

    for old in [aside] + [p for p in run.asides() if p != aside]:
        shutil.rmtree(check_inside(old, models_dir, "--force (a copy of the replaced run)"))


def check_place(run: RunDir, cfg: dict) -> None:
    """Refuse a run folder inside another run's folder (name=<run>/pred would train over, and with
    --force delete, that run's predictions) and a folder that is not a run but holds files (a
    study's folder, anything else): a run trains into, and --force replaces, run folders only.
    Before anything is created (check_writable makes the parent folders)."""
    parts = Path(run_name(cfg)).parts
    for i in range(1, len(parts)):
        outer = Path(cfg["models_dir"]).joinpath(*parts[:i])
        if (outer / RunDir.CONFIG).exists():
            raise CompetitionError(f"config name {run_name(cfg)!r}: {outer} is a run folder, and a run never lies "
                                   f"inside another run's folder; choose a name outside it (nothing was written)")
    if run.path.is_dir() and not (run / RunDir.CONFIG).exists():
        held = sorted(p.name for p in run.path.iterdir() if p.name != RunDir.LOCK)
        if held:
            raise CompetitionError(f"{run.path} is not a run folder (no {RunDir.CONFIG}) but holds "
                                   f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}: a run never trains into, "
                                   f"nor --force replaces, another folder; choose another name=, or move it away")


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
        current = data.data_id(ds)
    if current != recorded:
        raise CompetitionError(f"{run} was trained on other images than {cfg.get('data') or cfg['dataset']} holds now "
                               f"(data fingerprint {recorded} then, {current} now): --force retrains it on these, "
                               f"name=NEW trains a new run")


class MetricsWriter:
    """metrics.csv every epoch; curves.png at most once a minute and at the end (a matplotlib
    figure costs ~1 s on a CPU)."""

    def __init__(self, run: RunDir):
        self.run, self.last_plot = run, time.time()

    def write(self, history: list[dict], final: bool = False) -> None:
        from competition import plots

        import pandas as pd

        frame = pd.DataFrame(history)
        with atomic_path(self.run.metrics_csv, ".csv") as tmp:
            frame.to_csv(tmp, index=False)
        if final or time.time() - self.last_plot >= 60:
            plots.plot_run(frame, self.run.curves_png, title=self.run.name,
                           **plots.curve_options(self.run.config(), self.run.data_config()))
            self.last_plot = time.time()

