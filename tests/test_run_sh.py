"""run.sh = python -m competition.pipeline: parses, documents itself, refuses bad arguments before
doing any work, and plans the stage commands with the package's own run names (--dry-run). (The
whole pipeline takes minutes; it is run by hand: `./run.sh`, last line = the submission CSV.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import background  # tests/background.py

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "run.sh"


def sh(*args):
    """A launcher (conftest.py: start_early) of `run.sh ARGS`, with PYTHON, the interpreter run.sh
    execs (default: `python` from PATH), the one running the tests. (The timeout counts from the
    session's start, when the other early processes start too.)"""
    def launch(folder: Path) -> background.Started:
        return background.Started([str(RUN), *args], folder, timeout=120, env={**os.environ, "PYTHON": sys.executable},
                                  beside=True)
    return launch


def test_is_executable_strict_bash():
    assert os.access(RUN, os.X_OK)
    text = RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(RUN)]).returncode == 0


def test_help(monkeypatch, capsys):
    # run.sh execs `python -m competition.pipeline "$@"` (its exit status and output pass through:
    # test_bad_arguments and test_safety's --dry-run run the script; test_layout runs the module's
    # --help as `python -m`): the help itself is the parser's, asked in this process.
    from competition import pipeline
    from competition.files import cli

    monkeypatch.setattr(pipeline.subprocess, "run", lambda *a, **k: pytest.fail(f"a stage ran: {a}"))
    with pytest.raises(SystemExit) as e:
        cli(pipeline.main)(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--dataset" in out and "--ood-dir" in out


@pytest.mark.start_early.with_args(sh("--bogus"))
def test_bad_arguments(early, monkeypatch, capsys):
    r = early.result()  # through the script: its exit status and message are the parser's
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr, r.stderr
    # The other refusals are the same parser's, which run.sh execs with its arguments unchanged:
    # asked in this process (one interpreter start, not one each); a stage started fails the test.
    from competition import pipeline
    from competition.files import cli

    monkeypatch.setattr(pipeline.subprocess, "run", lambda *a, **k: pytest.fail(f"a stage ran: {a}"))
    for args, msg in [(("--parts", "4"), "--parts"), (("--dataset", "imagefolder"), "needs --data"),
                      (("--folds", "9"), "--folds"), (("--dataset",), "expected one argument"),
                      (("epochs",), "unknown argument epochs"), (("name=x",), "use --name NAME")]:
        with pytest.raises(SystemExit) as e:
            cli(pipeline.main)(list(args))
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err, (args, err)


def test_selftrain_on_the_measured_images_is_refused_before_any_stage(tmp_path, monkeypatch):
    # selftrain itself refuses to pseudo-label the measure; the pipeline says so before training
    from competition import pipeline
    from competition.files import CompetitionError

    monkeypatch.setattr(pipeline.subprocess, "run", lambda *a, **k: pytest.fail(f"a stage ran: {a}"))
    measure = tmp_path / "measure-suite"
    measure.mkdir()
    (measure / "suite.json").write_text('{"split": "measure", "source_rows": [1, 2]}')
    for ood in (str(pipeline.ROOT / "data" / "ood-local" / "digits-n40"), str(measure)):
        with pytest.raises(CompetitionError, match="the local estimate is measured on those images"):
            pipeline.parse(["--selftrain", "1", "--ood-dir", ood, "--dry-run"])
    (measure / "suite.json").write_text('{"split": "train", "fold": 1, "source_rows": [1, 2]}')  # a pool
    plan, _ = pipeline.parse(["--selftrain", "1", "--ood-dir", str(measure), "--dry-run"])
    assert plan.selftrain == 1 and plan.suite == "data/ood-local/digits-n40"


def test_a_submission_for_other_files_is_refused_before_any_stage(tmp_path, monkeypatch):
    # ensemble refuses to replace a submission made for other OOD files; the pipeline says so first
    from competition import pipeline
    from competition.files import CompetitionError

    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "digits-demo-p12.json").write_text('{"ood_dir": "/elsewhere/ood"}')
    assert pipeline.parse(["--dry-run"])[0]  # a JSON without its CSV: an interrupted write, which ensemble redoes
    (tmp_path / "submissions" / "digits-demo-p12.csv").write_text("id,label\n")
    with pytest.raises(CompetitionError, match="submission for /elsewhere/ood.*--overwrite"):
        pipeline.parse(["--dry-run"])
    assert pipeline.parse(["--dry-run", "--overwrite"])[0].overwrite
    (tmp_path / "submissions" / "digits-demo-p12.json").write_text('{"ood_dir": "data/ood-local/digits-n40"}')
    assert pipeline.parse(["--dry-run"])[0].suite == "data/ood-local/digits-n40"  # the same files: a rerun


def test_the_plan_names_runs_as_train_does():
    # The pipeline asks the package for run folders (config.resolve + runs.run_name): the folder
    # it predicts from is the one train makes, whatever the preset and overrides.
    from competition import pipeline
    from competition.config import resolve
    from competition.runs import RunDir

    plan, dry = pipeline.parse(["--dataset", "cifar10", "--preset", "part1_cpu", "--parts", "1,2", "--folds", "2",
                                "--dry-run", "epochs=3"])
    todo, sub = pipeline.steps(plan)
    assert dry and sub == "cifar10-part1_cpu-p12"
    trains = [cmd for _, cmd in todo if cmd[0] == "competition.train"]
    assert len(trains) == 4 and all("epochs=3" in cmd and "dataset=cifar10" in cmd for cmd in trains)
    predict = next(cmd for _, cmd in todo if cmd[0] == "competition.predict")
    for part in (1, 2):
        for fold in (0, 1):
            run = RunDir.for_config(resolve(part, ["part1_cpu"], ["dataset=cifar10", "epochs=3"], fold=fold, seed=0))
            assert str(run.path) in predict
    named, _ = pipeline.parse(["--name", "mine", "--parts", "1"])
    assert str(named.run_dir(1, 0)) == "models/mine-part1-f0-s0"



def test_a_preset_per_part():
    # `--preset cpu` trains each part with its own CPU preset (part1_cpu, part2_cpu): the folders the
    # pipeline predicts from are those train makes from them; a preset without per-part versions
    # (demo) applies to every part.
    from competition import pipeline
    from competition.config import resolve
    from competition.runs import RunDir

    plan, _ = pipeline.parse(["--dataset", "cifar10", "--preset", "cpu", "--parts", "1,2", "--dry-run"])
    assert plan.presets(1) == ["part1_cpu"] and plan.presets(2) == ["part2_cpu"]
    todo, _ = pipeline.steps(plan)
    trains = [cmd for _, cmd in todo if cmd[0] == "competition.train"]
    assert [c[c.index("--part") + 1:c.index("--part") + 3] for c in trains] == [["1", "--preset=part1_cpu"],
                                                                                 ["2", "--preset=part2_cpu"]]
    predict = next(cmd for _, cmd in todo if cmd[0] == "competition.predict")
    assert str(RunDir.for_config(resolve(2, ["part2_cpu"], ["dataset=cifar10"], fold=0, seed=0)).path) in predict
    demo, _ = pipeline.parse(["--preset", "demo", "--parts", "1,2"])
    assert demo.presets(1) == demo.presets(2) == ["demo"]


def test_every_stage_gets_one_thread_count(monkeypatch, capsys):
    # The count is part of the rounding: the pipeline decides it once and every stage computes on
    # it (before, each stage read the free cores at its own start and one run mixed counts).
    from competition import pipeline

    seen = []

    class Done:
        returncode = 0

    monkeypatch.setattr(pipeline.subprocess, "run", lambda cmd, **k: seen.append(k["env"]["OMP_NUM_THREADS"]) or Done)
    monkeypatch.setattr(pipeline, "steps", lambda plan: ([("a", ["x"]), ("b", ["y"])], "sub"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert pipeline.main(["--threads", "3"]) == 0 and seen == ["3", "3"]
    assert "every stage computes on 3 thread(s)" in capsys.readouterr().err
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's (or the package's, on busy cores) wins by default
    assert pipeline.main([]) == 0 and seen == ["1", "1"]
    with pytest.raises(Exception, match="--threads"):
        pipeline.main(["--threads", "-1"])
