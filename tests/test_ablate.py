"""Ablation studies: every study expands to its variants (names and overrides) on one shared
config; a grid YAML does the same; a one-epoch smoke version of every study (one representative
variant each) trains on tiny digits through the command line and competition.train (one process
for them all, started with the session); the batch-size schedule makes fewer updates than the LR
schedule over the same epochs; report.md holds the table and the overlay PNG; a variant identical
to another study's run is copied, not retrained."""
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from competition import ablate as A
from competition.config import load_config
from competition.files import CompetitionError

import background  # tests/background.py

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    "lr": {"lr0.01": {"lr": 0.01}, "lr0.05": {"lr": 0.05}, "lr0.2": {"lr": 0.2}, "lr0.5": {"lr": 0.5}},
    "schedule": {"constant": {"sched": "const"}, "cosine": {"sched": "cosine", "min_lr": 0.0}},
    "weight_decay": {"wd0": {"weight_decay": 0.0}, "wd1e-4": {"weight_decay": 1e-4}, "wd5e-4": {"weight_decay": 5e-4}},
    "mixup": {"none": {"mixup": 0.0}, "mixup0.2": {"mixup": 0.2, "label_smoothing": 0.0, "cutmix": 0.0}},
    "activation": {"relu": {"model_args": {"activation": "relu"}}, "sigmoid": {"model_args": {"activation": "sigmoid"}}},
    "optimizer": {"sgd": {"optimizer": "sgd"}, "adam_warmup": {"optimizer": "adam", "warmup_epochs": 15.0},
                  "radam": {"optimizer": "radam", "warmup_epochs": 0.0}},
    "batch_size_schedule": {
        "decay_lr": {"sched": "step", "step_milestones": [150, 225], "step_gamma": 0.2, "batch_size_milestones": []},
        "grow_batch": {"sched": "const", "batch_size_milestones": [150, 225], "batch_size_factor": 5}},
    "batchnorm": {"plain": {"model_args": {"bn": "batchnorm"}, "no_decay_norm_bias": False},
                  "ghost": {"model_args": {"bn": "ghost", "ghost_batch_size": 32}, "no_decay_norm_bias": False},
                  "no_decay_bn": {"model_args": {"bn": "batchnorm"}, "no_decay_norm_bias": True},
                  "iew": {"model_args": {"bn": "iew", "iew_weight": 0.007812}, "no_decay_norm_bias": False}},
    "architecture": {"mobilenet_v1": {"model": "mobilenet_v1"}, "mobilenet_v2": {"model": "mobilenet_v2"}},
}


def _contains(big: dict, small: dict) -> bool:
    return all(_contains(big[k], v) if isinstance(v, dict) else big.get(k) == v for k, v in small.items())


def test_the_reports_setting():
    cfg = load_config(["ablation"])
    assert (cfg["model"], cfg["optimizer"], cfg["momentum"], cfg["nesterov"], cfg["batch_size"], cfg["epochs"]) == \
        ("mobilenet_v1", "sgd", 0.9, False, 128, 300)
    assert (cfg["fold"], cfg["seed"], cfg["norm"], cfg["label_smoothing"], cfg["flip"], cfg["translate"]) == \
        (0, 0, "data", 0.0, False, 0)
    budget = load_config(["ablation_budget"])
    assert budget["epochs"] < 30 and budget["train_subset"] and budget["eval_train"] and budget["model_args"]["width"] < 1
    assert budget["model_args"]["activation"] == "relu"  # nested keys merge with ablation.yaml's


@pytest.mark.parametrize("study", EXPECTED)
def test_every_study_expands_to_its_variants(study):
    assert set(A.STUDIES) == set(EXPECTED)
    name, configs = A.plan(study)  # the full setting: 300 epochs, batch 128
    assert name == study and list(configs) == list(EXPECTED[study])
    shared = load_config(["ablation"])
    overrides = A.variant_overrides(study)  # once: each call reads the presets' YAML again
    for variant, cfg in configs.items():
        assert _contains(cfg, EXPECTED[study][variant]), (variant, EXPECTED[study][variant])
        assert cfg["name"] == f"ablations/{study}/{variant}"
        # everything a variant does not set is the shared setting (model_args merge key by key)
        assert all(cfg[k] == v for k, v in shared.items() if k not in overrides[variant] and k != "name")
        assert cfg["model_args"]["width"] == 1.0


def test_overrides_are_shared_and_variants_win():
    _, configs = A.plan("lr", budget=True, overrides=["lr=0.3", "epochs=2", "model_args.width=0.5"])
    assert [c["lr"] for c in configs.values()] == [0.01, 0.05, 0.2, 0.5]
    assert all(c["epochs"] == 2 and c["model_args"] == {**load_config(["ablation_budget"])["model_args"], "width": 0.5}
               for c in configs.values())
    _, bs = A.plan("batch_size_schedule", overrides=["epochs=8"])
    assert bs["grow_batch"]["batch_size_milestones"] == [4, 6] == bs["decay_lr"]["step_milestones"]
    with pytest.raises(CompetitionError, match="unknown study"):
        A.plan("dropout")


def test_grid_yaml(tmp_path):
    grid = tmp_path / "widths.yaml"
    grid.write_text("base: {epochs: 3, optimizer: adamw, lr: 1.0e-3}\n"
                    "variants:\n  narrow: {model_args: {width: 0.25}}\n  wide: {model_args: {width: 0.5}, lr: 2e-3}\n")
    name, configs = A.plan(str(grid), budget=True, overrides=["epochs=2"])
    assert name == "widths" and list(configs) == ["narrow", "wide"]
    assert configs["narrow"]["epochs"] == 2 and configs["narrow"]["optimizer"] == "adamw"  # CLI beats grid base
    assert configs["wide"]["lr"] == 2e-3 and configs["wide"]["model_args"]["width"] == 0.5
    assert configs["wide"]["model_args"]["activation"] == "relu"
    (tmp_path / "bad.yaml").write_text("variants: {a: {not_a_key: 1}}\n")
    with pytest.raises(CompetitionError, match="not_a_key"):
        A.plan(str(tmp_path / "bad.yaml"))


# channels_last off: on a CPU its first steps at each new batch shape cost seconds
TINY = ["dataset=digits", "channels_last=false", "epochs=1", "train_subset=64", "val_subset=32", "eval_train=32",
        "batch_size=32"]
# weight_decay's is wd5e-4, mixup/none's twin: test_identical_variant_of_another_study_is_copied reuses it
ONE_EACH = {"lr": "lr0.2", "schedule": "constant", "weight_decay": "wd5e-4", "mixup": "mixup0.2", "activation": "sigmoid",
            "optimizer": "adam_warmup", "batchnorm": "ghost", "architecture": "mobilenet_v2"}
BATCH_SIZE_SCHEDULE = [*TINY, "epochs=3", "train_subset=128", "batch_size=16"]


def dirs(root: Path) -> list[str]:
    return [f"models_dir={root / 'models'}", f"folds_dir={root / 'folds'}"]


# The studies the tests below check, trained one after another in one process through the command
# line's entry point (ablate.main = run_study); the last stdout line maps each to its report.md,
# or to the traceback that stopped it (the other studies go on).
STUDIES = """
import json, sys, traceback
from competition import ablate
reports = {}
for key, argv in json.loads(sys.argv[1]).items():
    try:
        reports[key] = str(ablate.main(argv))
    except Exception:
        reports[key] = "FAILED " + traceback.format_exc()
print(json.dumps(reports))
"""


def launch_studies(folder: Path, items) -> background.Started:
    """The smoke variant of each selected study and the batch-size schedule study, in one process
    started with the session (conftest.py: start_early, shared): its imports (torch, timm,
    matplotlib) are paid once, and a dozen trainings run beside the in-process tests."""
    jobs = {}
    for item in items:
        if item.originalname == "test_smoke_every_study":
            study = item.callspec.params["study"]
            jobs[study] = [study, "--budget", "--variant", ONE_EACH[study], *TINY, *dirs(folder)]
        elif item.originalname == "test_identical_variant_of_another_study_is_copied":
            jobs["weight_decay"] = ["weight_decay", "--budget", "--variant", "wd5e-4", *TINY, *dirs(folder)]
        else:
            jobs["batch_size_schedule"] = ["batch_size_schedule", "--budget", *BATCH_SIZE_SCHEDULE, *dirs(folder)]
    return background.Started([sys.executable, "-c", STUDIES, json.dumps(jobs)], folder, timeout=600, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, beside=True)


def report_of(early, key: str) -> Path:
    proc = early.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])[key]
    assert not report.startswith("FAILED"), report
    return Path(report)


@pytest.mark.parametrize("study", ONE_EACH)
@pytest.mark.start_early.with_args(launch_studies, shared=True)
def test_smoke_every_study(study, early):
    report = report_of(early, study)
    run = report.parent / ONE_EACH[study]
    frame = pd.read_csv(run / "metrics.csv")
    assert len(frame) == 1 and frame["updates"].iloc[0] == 2 and frame["train_eval_acc"].notna().all()
    assert (report.parent / "curves.png").stat().st_size > 1000


@pytest.mark.start_early.with_args(launch_studies, shared=True)
def test_batch_size_schedule_fewer_updates_and_report(early):
    report = report_of(early, "batch_size_schedule")
    runs = {v: pd.read_csv(report.parent / v / "metrics.csv") for v in ("decay_lr", "grow_batch")}
    assert runs["decay_lr"]["updates"].tolist() == [8, 16, 24]  # 128 / 16 per epoch
    assert runs["grow_batch"]["batch_size"].tolist() == [16, 16, 80]  # x5 at epoch 2 (= round(3 * 0.5))
    assert runs["grow_batch"]["updates"].iloc[-1] < runs["decay_lr"]["updates"].iloc[-1]
    # the same milestone: the LR drops by 5 for epoch 3 (logged at the end of epoch 2) where the batch grows by 5
    assert runs["decay_lr"]["lr"].round(6).tolist() == [0.05, 0.01, 0.01] and runs["grow_batch"]["lr"].nunique() == 1
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    for col in ("train loss", "val acc", "best val acc", "gap (train-val acc)", "epochs to best", "wall s", "updates"):
        assert col in header
    rows = [line for line in text.splitlines() if line.startswith("| decay_lr") or line.startswith("| grow_batch")]
    assert len(rows) == 2 and "| 24 |" in rows[0] and "![curves](curves.png)" in text
    again = A.run_study("batch_size_schedule", budget=True, overrides=BATCH_SIZE_SCHEDULE + dirs(early.folder),
                        echo=False)  # finished: skipped
    assert pd.read_csv(again.parent / "decay_lr" / "metrics.csv").equals(runs["decay_lr"])


@pytest.mark.start_early.with_args(launch_studies, shared=True)
def test_identical_variant_of_another_study_is_copied(early, tmp_path, capsys):
    """weight_decay/wd5e-4, trained by the shared study process (the command line), then mixup/none,
    the same run, in this process beside a copy of it: copied, not retrained."""
    report_of(early, "weight_decay")
    for sub in ("folds", "models/ablations/weight_decay"):
        shutil.copytree(early.folder / sub, tmp_path / sub)
    report = A.run_study("mixup", budget=True, overrides=TINY + dirs(tmp_path), variants=["none"], echo=False)
    assert "copied, not retrained" in capsys.readouterr().out
    assert load_config()["name"] is None and "ablations/mixup/none" in (report.parent / "none" / "config.yaml").read_text()


def test_cli_list(capsys):
    A.main(["--list", "--budget"])
    text = capsys.readouterr().out
    assert all(s in text for s in EXPECTED) and "grow_batch" in text
