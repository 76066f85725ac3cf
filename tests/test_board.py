"""The competitor's cockpit: the board lists runs with and without predictions and submissions
with their Kaggle scores, and adapted figures beside plain ones on the same suite; its chart draws
only the figures that exist, on an honest axis; an old submission re-scores to the same number
after another TTA is predicted; provenance is recorded; trackers write real event files."""
from __future__ import annotations

import json
import re
import shlex
import shutil

import numpy as np
import pandas as pd
import pytest

from competition import board, corruptions, data, ensemble, plots, predict, score, submit, train
from competition.files import CompetitionError
from competition.runs import RunDir
from competition.specs import EnsembleSpec, PredictSpec

TINY = ["--part", "1", "--preset", "demo", "epochs=2", "train_subset=128", "model_args.widths=[8,16,16]",
        "model_args.hidden=16"]  # conftest.py's TINY_RUN


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run):
    """Two finished runs (one predicted and scored on a labelled suite, one not predicted) and a
    partial run (stopped after one epoch), in one project-like folder. The finished ones are
    copies of the session's tiny run (conftest.py), moved in as a and b, as a teammate's runs
    would be; the partial one is trained here."""
    tmp = tmp_path_factory.mktemp("board")
    dirs = [f"folds_dir={tmp / 'folds'}", f"models_dir={tmp / 'models'}"]
    src, _ = tiny_run
    shutil.copytree(src.parent.parent / "folds", tmp / "folds")
    a, b = (shutil.copytree(src, tmp / "models" / name) for name in ("a", "b"))
    train.main(TINY + dirs + ["name=c", "stop_after=1"])
    suite = tmp / "suite"
    images = data.load_digits("test")
    corruptions.make_suite(images.images[:10], suite, names=["brightness", "fog"], labels=images.labels[:10],
                           workers=1)
    predict.predict_run(a, [suite], PredictSpec("flip"), test=True)
    score.score_target(a, suite, "flip")
    return tmp, a, b, suite


def test_board_lists_runs_with_and_without_predictions(world, capsys):
    tmp, a, b, suite = world
    runs, subs = board.main(["--models-dir", str(tmp / "models"), "--submissions-dir", str(tmp / "subs"),
                             "--out", str(tmp / "board")])
    by_name = {r["run"]: r for r in runs.to_dict("records")}
    assert set(by_name) == {"a", "b", "c"}
    assert by_name["a"]["local OOD"] == pytest.approx(json.loads(next(a.rglob("score.json")).read_text())["ood_accuracy"])
    assert np.isnan(by_name["b"]["local OOD"]) and by_name["b"]["state"] == "finished"  # not predicted: shown as -
    assert by_name["c"]["state"] == "partial"
    assert runs["run"].iloc[0] == "a"  # sorted by the local OOD estimate, unscored runs last
    assert len(by_name["a"]["commit"]) >= 8 or by_name["a"]["commit"] == ""
    out = capsys.readouterr().out
    assert "| a |" in out and "## Submissions (0)" in out
    assert (tmp / "board.png").read_bytes()[:4] == b"\x89PNG" and (tmp / "board_runs.csv").exists()


def test_old_submission_rescores_the_same_after_another_tta(world):
    tmp, a, b, suite = world
    csv = ensemble.build([a], "s1", suite, tmp / "subs", EnsembleSpec(tta="flip"))
    first = score.score_target(tmp / "subs" / "s1.json", suite)["ood_accuracy"]
    predict.predict_run(a, [suite], PredictSpec("shift1"))  # another TTA: its own pred/ folder
    again = score.score_target(tmp / "subs" / "s1.json", suite)["ood_accuracy"]
    assert again == first
    spec = json.loads(csv.with_suffix(".json").read_text())
    assert spec["members"][0]["setting"] == "flip" and spec["logits_sha1"][str(a)]
    assert spec["commit"] is None or len(spec["commit"]) == 40
    assert set(spec["versions"]) >= {"torch", "timm", "accelerate", "albumentations"}
    # the logits it pinned change (predicting the same setting again with other weights): said, not re-scored
    logits = next((a / "pred" / "flip" / "ood").rglob("distortion00.npy"))
    saved = logits.read_bytes()
    z = np.load(logits)
    np.save(logits, z[:, ::-1].copy())
    with pytest.raises(CompetitionError, match="changed since .*s1.json was made"):
        score.score_target(tmp / "subs" / "s1.json", suite)
    logits.write_bytes(saved)


def test_uploads_and_kaggle_scores_reach_the_board(world, monkeypatch):
    tmp, a, b, suite = world
    csv = ensemble.build([a], "s2", suite, tmp / "subs", EnsembleSpec(method="equal", tta="flip"))

    class Reply:
        message = "Successfully submitted"

    class FakeApi:
        def competition_submit(self, path, message, competition):
            return Reply()

        def competition_submissions(self, competition):
            return [{"fileName": "s2.csv", "description": "first try", "publicScore": "0.6125", "privateScore": "",
                     "status": "complete"}]

    monkeypatch.setattr(submit, "_kaggle_api", lambda: FakeApi())
    submit.kaggle_submit(csv, "first try", "ds542")
    spec = json.loads(csv.with_suffix(".json").read_text())
    assert spec["kaggle"][0]["message"] == "first try" and spec["kaggle"][0]["public_score"] is None
    assert "1 sidecar" in submit.fetch_scores(tmp / "subs", "ds542")
    _, subs = board.main(["--models-dir", str(tmp / "models"), "--submissions-dir", str(tmp / "subs"),
                          "--sort", "kaggle"])
    row = subs[subs["submission"] == "s2"].iloc[0]
    assert row["Kaggle public"] == pytest.approx(0.6125) and row["uploads"] == 1
    assert subs["submission"].iloc[0] == "s2"  # sorted by Kaggle score, unscored last


def test_finished_run_records_provenance_and_what_training_saw(world):
    tmp, a, b, suite = world
    summary = RunDir(a).summary()
    assert set(summary["versions"]) >= {"torch", "timm", "accelerate", "albumentations", "competition"}
    assert "commit" in summary and "dirty" in summary
    # the demo preset trains with noise_blur: the noise and blur families count as seen
    assert summary["trained_on"] == sorted(corruptions.FAMILIES["noise"] + corruptions.FAMILIES["blur"])


def test_tensorboard_writes_event_files_and_a_missing_tracker_is_one_error(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    dirs = [f"folds_dir={tmp_path / 'folds'}", f"models_dir={tmp_path / 'models'}"]
    run = train.main(TINY + dirs + ["log_with=tensorboard", "epochs=1"])
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(CompetitionError, match=r"wandb package is not installed: pip install -e '.\[wandb\]'"):
        train.main(TINY + dirs + ["log_with=wandb", "name=w"])
    assert not (tmp_path / "models" / "w").exists()
    shutil.rmtree(run)


def test_a_broken_run_or_sidecar_is_flagged_in_its_row(world, tmp_path):
    tmp, a, b, suite = world
    shutil.copytree(tmp / "models", tmp_path / "models")
    (tmp_path / "models" / "b" / "config.yaml").write_text("lr: [unclosed\n")
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "cut.json").write_text('{"members": [{"name": ')
    (tmp_path / "subs" / "edited.json").write_text('{"members": [{"name": "a"}]}')
    runs, subs = board.main(["--models-dir", str(tmp_path / "models"), "--submissions-dir", str(tmp_path / "subs"),
                             "--out", str(tmp_path / "board")])
    state = dict(zip(runs["run"], runs["state"]))
    assert state["b"].startswith("broken:") and state["a"] == "finished"  # the others go on
    members = dict(zip(subs["submission"], subs["members"]))
    assert members["cut"].startswith("broken sidecar") and members["edited"].startswith("broken sidecar")


def test_adapted_predictions_reach_the_board_once_scored(world, tmp_path):
    """BN-adapted logits alone give no figure (score writes them): the board says which command
    scores them, then shows the adapted estimate beside the plain one, on the same suite."""
    tmp, a, b, suite = world
    shutil.copytree(tmp / "models", tmp_path / "models")
    run = tmp_path / "models" / "a"
    predict.predict_run(run, [suite], PredictSpec("flip", adapts=["bn"]), test=False, oof=False)
    args = ["--models-dir", str(tmp_path / "models"), "--submissions-dir", str(tmp_path / "subs")]
    board.main(args)
    notes = board.unscored(tmp_path / "models")
    assert len(notes) == 1 and "flip+bn was predicted on suite but not scored" in notes[0]
    assert f"competition.score {run} --ood-dir {suite} --tta flip --adapt bn" in notes[0]
    adapted = score.score_target(run, suite, "flip", adapt="bn")
    runs, _ = board.main(args + ["--sort", "ood_adapted"])
    row = runs[runs["run"] == "a"].iloc[0]
    assert row["local OOD adapted"] == pytest.approx(adapted["ood_accuracy"])
    assert row["adapted setting"] == "flip+bn" and row["local OOD adapted s.e."] == pytest.approx(adapted["ood_se"])
    assert row["local OOD s.e."] > 0 and not board.unscored(tmp_path / "models")


def test_balanced_scores_reach_the_board_beside_the_plain_one(world, tmp_path):
    """`score RUN --balance` (or --copies) writes score-balanced.json: the board shows it as the
    run's test-time figure and says which post-processing made it; the plain figure stays plain."""
    tmp, a, b, suite = world
    shutil.copytree(tmp / "models", tmp_path / "models")
    run = tmp_path / "models" / "a"
    args = ["--models-dir", str(tmp_path / "models"), "--submissions-dir", str(tmp_path / "subs")]
    plain = json.loads(next(run.rglob("score.json")).read_text())
    balanced = score.score_target(run, suite, "flip", balance=True, say=lambda *x: None)
    assert next(run.rglob("score-balanced.json"))
    runs, _ = board.main(args)
    row = runs[runs["run"] == "a"].iloc[0]
    assert row["local OOD"] == pytest.approx(plain["ood_accuracy"])
    assert row["local OOD adapted"] == pytest.approx(balanced["ood_accuracy"])
    assert row["adapted post"] == "balance" and row["adapted setting"] == "flip"


def test_a_learned_variant_folder_is_hinted_listed_scored_and_drawn(world, tmp_path):
    """pred/flip+tent-all (predict --learn-params all) breaks nothing: the hint for the missing
    setting is a predict command that, run as written, writes it; the board then says how to
    score it, and shows it beside the plain figure once scored."""
    tmp, a, b, suite = world
    shutil.copytree(tmp / "models", tmp_path / "models")
    run = tmp_path / "models" / "a"
    with pytest.raises(CompetitionError, match="flip\\+tent-all/.* is missing") as missing:
        RunDir(run).ood_logits_paths(data.OodSet(suite), "flip+tent-all")
    command = shlex.split(re.search(r"`python -m competition.predict (.*)`", str(missing.value)).group(1))
    predict.main(command + ["--no-test", "--no-oof"])  # only which outputs: the setting is the hint's
    assert RunDir(run).ood_logits_paths(data.OodSet(suite), "flip+tent-all")
    args = ["--models-dir", str(tmp_path / "models"), "--submissions-dir", str(tmp_path / "subs")]
    board.main(args)
    notes = board.unscored(tmp_path / "models")
    assert len(notes) == 1 and "flip+tent-all was predicted on suite but not scored" in notes[0]
    hint = f"competition.score {run} --ood-dir {suite} --tta flip --adapt tent-all"
    assert notes[0].endswith(hint)
    adapted = score.main(shlex.split(hint)[1:])[0]
    runs, _ = board.main(args + ["--sort", "ood_adapted", "--out", str(tmp_path / "board")])
    row = runs[runs["run"] == "a"].iloc[0]
    assert row["adapted setting"] == "flip+tent-all"
    assert row["local OOD adapted"] == pytest.approx(adapted["ood_accuracy"])
    assert not board.unscored(tmp_path / "models") and (tmp_path / "board.png").exists()


def _frames(kaggle=None):
    runs = pd.DataFrame([{"run": "a", "local OOD": 0.612, "local OOD s.e.": 0.012, "local OOD adapted": 0.641,
                          "local OOD adapted s.e.": 0.011, "adapted setting": "flip+bn"},
                         {"run": "b", "local OOD": None, "local OOD s.e.": None, "local OOD adapted": None,
                          "local OOD adapted s.e.": None, "adapted setting": None}])
    subs = pd.DataFrame([{"submission": "s1", "settings": "shift1+bn", "local OOD": 0.652, "local OOD s.e.": 0.01,
                          "Kaggle public": kaggle}])
    return runs, subs


@pytest.fixture
def figures(monkeypatch):
    kept = []
    monkeypatch.setattr(plots, "save", lambda fig, path, title=None, **kw: kept.append(fig) or path)
    yield kept
    for fig in kept:
        plots.pyplot().close(fig)


def test_chart_draws_no_legend_entry_for_absent_kaggle_scores(figures, tmp_path):
    board.chart(*_frames(kaggle=None), tmp_path / "b.png")
    board.chart(*_frames(kaggle=0.6125), tmp_path / "b.png")
    without, with_kaggle = ([t.get_text() for t in f.axes[0].get_legend().get_texts()] for f in figures)
    assert not any("Kaggle" in t for t in without) and len(without) == 2  # plain and adapted local estimates
    assert any("Kaggle" in t for t in with_kaggle)
    ax = figures[0].axes[0]
    # the unscored run b has no row; the submission's label speaks in words
    assert [t.get_text() for t in ax.get_yticklabels()] == ["s1\n6-view TTA (mirror x shifts) + BN adaptation",
                                                            "a\n+ BN adaptation"]
    # figures within a few points: the axis is zoomed, and its label says so
    assert ax.get_xlim()[0] > 0 and "zoomed: the axis starts at" in ax.get_xlabel() and "%" in ax.get_xlabel()


def test_chart_axis_starts_at_zero_when_figures_are_far_apart(figures, tmp_path):
    runs, subs = _frames()
    runs.loc[1, "local OOD"] = 0.05
    board.chart(runs, subs, tmp_path / "b.png")
    ax = figures[0].axes[0]
    assert ax.get_xlim() == (0.0, 100.0) and "zoomed" not in ax.get_xlabel()


def test_markdown_prints_standard_errors_in_the_figures_cells():
    runs, _ = _frames()
    text = board.markdown(runs)
    assert "| a | 61.20 +- 1.20 | 64.10 +- 1.10 | flip+bn |" in text and "s.e." not in text
