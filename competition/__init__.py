"""CIFAR-100 / OOD Kaggle competition pipeline: folds -> models -> submissions.

Stages (each reads only what the previous one wrote to disk; every one runs as
`python -m competition.<stage>`, and `--help` prints its commands):

    folds      python -m competition.folds --dataset digits --measure-n 200 -> folds/<dataset>.csv
    train      python -m competition.train --part 1 --preset demo       -> models/<run>/
    predict    python -m competition.predict models/<run> --ood-dir D   -> models/<run>/pred/<setting>/
    ensemble   python -m competition.ensemble 'models/*' --name N --ood-dir D -> submissions/N.csv, N.json
    score      python -m competition.score suite --out D ...; score models/<run> N.json --ood-dir D
    submit     python -m competition.submit --check N.csv; submit N.csv -m "message" --competition SLUG
    ablate     python -m competition.ablate weight_decay --budget       -> models/ablations/<study>/
    pipeline   python -m competition.pipeline (= ./run.sh): all of the above, in order -> submissions/<name>.csv

Modules, from the stages down to the leaves (each imports only modules below it):

    pipeline   the stages in order, as subprocesses; names runs with config + runs   (folds, config, runs, models)
    ablate     studies: variants of one setting, trained by train, a report       (train, runs, config, plots)
    train      the training loop, top to bottom                                   (train_data, learner, checkpoints, runs, ...)
    train_data a run's images, rows and per-epoch loaders; what the data decides (folds, loader, augment, optim, runs)
    learner    model, optimizer, schedule, EMA, batch augmentation, loss          (models, optim, augment, runs)
    checkpoints  loop state, portable checkpoints, exact resume                   (runs)
    batch_size throughput per batch size and the finder                           (models, optim, runtime, augment)
    predict    TTA logits of runs on test / OOF / OOD images                      (runs, loader, tta, adapt, runtime)
    score      local OOD suite and reports                                        (runs, metrics, corruptions, plots)
    ensemble   member weights and the submission CSV + JSON                       (runs, metrics, submit)
    runs       a run folder's files (RunDir), its claim/skip/resume rules, members (models, folds, config, data)
    submit     CSV format: write, check, send to Kaggle                           (data)
    folds      the k-fold split CSV; a run's train / held-out / check rows         (data)
    corruptions  the 19 x 5 CIFAR-C corruptions, in the OOD file format           (data, plots)
    models     architectures by name (+ mobilenets)       tta  TTA views and logits (augment)
    optim      optimizers and timm schedules             loader  uint8 arrays -> batches
    augment    to_input, batched flips, CPU pipelines    adapt  test-time BN adaptation
    metrics    accuracy, log-loss, ECE, OOD tables       runtime  Accelerator, precision
    config     YAML presets and overrides (specs)        plots  every figure
    specs      a training config typed: one frozen dataclass per part of the run (TrainSpec), what each key accepts
    data       data sources and OOD files                files  errors, atomic writes
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys
import time as _time


def _busy_cores(cpus: set[int], interval: float = 0.2) -> float:
    """How many of `cpus` (the ones this process may run on) are busy with other work right now,
    from two reads of their /proc/stat lines (this process has not started computing yet). Not
    the load average: it lags a minute, so a stage that starts right after another (run.sh)
    would see the last one's load and starve itself."""
    def read():
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(x) for x in fields]
                    total, idle = total + sum(values), idle + values[3] + values[4]  # idle + iowait
        return total, idle

    t0, i0 = read()
    _time.sleep(interval)
    t1, i1 = read()
    return len(cpus) * (1 - (i1 - i0) / max(t1 - t0, 1))


def _share_the_cores() -> None:
    """Before torch loads: when other jobs keep cores busy, use only the free ones (at least one)
    and let idle OpenMP threads sleep instead of spinning. torch's default, one thread per core,
    made the demo's training 2-35x slower beside one other job (bench/threads.py: epochs 1.90 s
    with 2 threads vs 0.87 s with 1, process wall 57 s vs 16 s); on idle cores nothing changes.
    OMP_NUM_THREADS set by the user always wins."""
    if "OMP_NUM_THREADS" in _os.environ or "torch" in _sys.modules or not _os.path.exists("/proc/stat"):
        return
    try:
        cpus = _os.sched_getaffinity(0)
        cores = len(cpus)
        free = max(1, min(cores, round(cores - _busy_cores(cpus))))
    except (OSError, ValueError, AttributeError):
        return
    if free < cores:
        _os.environ["OMP_NUM_THREADS"] = str(free)
        _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        print(f"note: {cores - free} of {cores} cores are busy with other work: computing on {free} thread(s) "
              f"(set OMP_NUM_THREADS to choose)", file=_sys.stderr)


_share_the_cores()
