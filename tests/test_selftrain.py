"""Self-training end to end on digits: a stand-in unlabelled test set from a fold the runs
exclude, one round through the training loop, a new run folder and submission; it refuses a
pseudo-label set made of held-out images, and the adaptation choice lands in the JSON."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from competition import data, ensemble, folds, predict, score, selftrain, train
from competition.files import CompetitionError
from competition.runs import RunDir
from competition.specs import EnsembleSpec, PredictSpec

TINY = ["--part", "1", "--preset", "demo", "epochs=2", "model_args.widths=[8,16,16]", "model_args.hidden=16",
        "exclude_folds=[1]", "ood_check=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The three roles on digits: a measure reserve of 100 images (fold -1), fold 0 held out (the
    choose images), fold 1 excluded (the unlabelled "test files"), the rest trained on."""
    tmp = tmp_path_factory.mktemp("st")
    folds.main(["--dataset", "digits", "--k", "5", "--measure-n", "100", "--folds-dir", str(tmp / "folds")])
    dirs = [f"folds_dir={tmp / 'folds'}", f"models_dir={tmp / 'models'}"]
    run = train.main(TINY + dirs)
    common = ["--dataset", "digits", "--folds-dir", str(tmp / "folds"), "--names", "brightness,gaussian_noise",
              "--workers", "1", "--n", "12"]
    pool = score.main(["suite", "--out", str(tmp / "pool"), "--fold", "1", *common])  # the "test files"
    measure = score.main(["suite", "--out", str(tmp / "measure"), *common])  # the measure reserve
    predict.predict_run(run, [pool, measure], PredictSpec("flip", adapts=["bn"]), test=False)
    return tmp, run, pool, measure


def test_measure_rows_are_in_no_training_row_choose_image_or_pool(world):
    tmp, run, pool, measure = world
    frame = folds.read_folds(tmp / "folds" / "digits.csv")
    reserve = set(folds.measure_rows(frame).tolist())
    info = data.OodSet(measure).info()
    assert len(reserve) == 100 and info["split"] == "measure" and set(info["source_rows"]) <= reserve
    cfg = RunDir(run).config()
    trained, held = folds.fold_rows(frame["fold"].to_numpy(), cfg["fold"], "f", cfg["exclude_folds"])
    r = RunDir(run)
    assert not reserve & set(trained.tolist()) and not reserve & set(held.tolist())
    assert not reserve & set(r.oof_index().tolist()) and not reserve & set(r.oof_ood_index().ravel().tolist())
    assert not reserve & set(data.OodSet(pool).info()["source_rows"])
    for exclude in (r.config()["exclude_folds"], []):
        assert not reserve & set(folds.fold_rows(frame["fold"].to_numpy(), -1, "f", exclude)[0].tolist())
    assert r.data_config()["measure_reserve"] == info["reserve"]  # what score's leak check compares
    assert score._leaks([r.config()], info, [r]) == []
    assert score._leaks([r.config()], {**info, "reserve": "another"}, [r]) == [str(r)]


def test_adapt_auto_never_looks_at_the_measure_labels(world):
    """The choice is made on the corrupted out-of-fold images: shuffling the measure's labels
    (or scoring on it at all) changes no decision."""
    tmp, run, pool, measure = world
    a = json.loads(ensemble.build([run], "auto-a", measure, tmp / "subs", EnsembleSpec(tta="flip", adapt="auto"))
                   .with_suffix(".json").read_text())
    labels = np.load(measure / "labels.npy")
    try:
        np.save(measure / "labels.npy", np.random.default_rng(0).permutation((labels + 3) % 10))
        b = json.loads(ensemble.build([run], "auto-b", measure, tmp / "subs", EnsembleSpec(tta="flip", adapt="auto"))
                       .with_suffix(".json").read_text())
    finally:
        np.save(measure / "labels.npy", labels)
    assert a["adaptation"] == b["adaptation"] and a["weights"] == b["weights"]
    assert a["local_score"]["ood_accuracy"] != b["local_score"]["ood_accuracy"]  # the labels did change
    assert "oof_ood" in a["adaptation"][RunDir(run).member]["chosen_on"]
    assert a["local_score"]["role"].startswith("measure:") and "oof_ood" in a["roles"]["choose"]


def test_one_round_trains_predicts_and_ensembles_again(world):
    tmp, run, pool, measure = world
    csv = ensemble.build([run], "base", pool, tmp / "subs", EnsembleSpec(tta="flip", adapt="auto"))
    spec = json.loads(csv.with_suffix(".json").read_text())
    assert set(spec["adaptation"][RunDir(run).member]) == {"none", "bn", "chosen", "chosen_on"}  # the choice, its reasons
    out = selftrain.main([str(csv.with_suffix(".json")), "--threshold", "0.1", "--epochs", "1", "--suite",
                          str(measure), "--out-dir", str(tmp / "rounds"), "--models-dir", str(tmp / "models")])
    info = json.loads(out.read_text())
    assert out == tmp / "rounds" / "base-st1.json" and info["selftrain"]["round"] == 1  # where --out-dir says
    assert 0 < info["selftrain"]["images"] <= info["selftrain"]["of"] and 0 <= info["selftrain"]["pseudo_label_accuracy"] <= 1
    new = RunDir(tmp / "models" / f"{RunDir(run).name}-base-st1")
    cfg = new.config()
    assert new.finished and cfg["init_from"] == str(run) and cfg["pseudo"].endswith("pseudo.npz")
    assert cfg["fold"] == 0 and cfg["exclude_folds"] == [1]  # its held-out fold is the original's: OOF stays honest
    assert np.array_equal(new.oof_index(), RunDir(run).oof_index())
    # the defaults are relative to the members: a fraction of their lr and of their labelled images
    source = RunDir(run).config()
    fold = pd.read_csv(tmp / "folds" / "digits.csv")["fold"].to_numpy()
    labelled = int(((fold != 0) & (fold != 1) & (fold != folds.MEASURE)).sum())
    assert cfg["lr"] == pytest.approx(selftrain.LR_FRACTION * source["lr"])
    assert info["selftrain"]["max_images"] == int(selftrain.PSEUDO_FRACTION * labelled)
    assert selftrain.labelled_images(RunDir(run)) == labelled
    assert selftrain.source_run(new).path == RunDir(run).path  # round 2's lr comes from the original, not round 1
    assert "local_score" in info or "local_score_adapted" in info


def test_a_pseudo_set_of_held_out_images_is_refused(world):
    tmp, run, pool, measure = world
    held = score.main(["suite", "--out", str(tmp / "fold0"), "--fold", "0", "--dataset", "digits", "--folds-dir",
                       str(tmp / "folds"), "--names", "brightness", "--workers", "1", "--n", "4"])
    predict.predict_run(run, [held], PredictSpec("flip"), test=False)
    # the "test files" ARE fold 0: held out
    csv = ensemble.build([run], "onheld", held, tmp / "subs", EnsembleSpec(tta="flip"))
    with pytest.raises(CompetitionError, match="holds out .* pseudo-labelling them would train on the held-out fold"):
        selftrain.main([str(csv.with_suffix(".json")), "--out-dir", str(tmp / "subs"), "--models-dir",
                        str(tmp / "models")])


def test_a_pseudo_set_of_the_measure_reserve_is_refused(world):
    tmp, run, pool, measure = world
    csv = ensemble.build([run], "onmeasure", measure, tmp / "subs", EnsembleSpec(tta="flip"))
    with pytest.raises(CompetitionError, match="measure reserve: pseudo-labelling it"):
        selftrain.main([str(csv.with_suffix(".json")), "--out-dir", str(tmp / "subs"), "--models-dir",
                        str(tmp / "models")])


def test_a_test_split_suite_overlaps_the_competition_files():
    """CIFAR-100's test split is what the competition's OOD files are made of: a suite from it and
    a pseudo-label pool of those files hold the same images, whatever their rows say."""
    leaderboard = {"dataset": "cifar100", "split": "test", "n": 10}
    assert score.images_overlap(leaderboard, {})  # {}: the competition's files (no suite.json)
    assert not score.images_overlap({"dataset": "cifar100", "split": "measure", "source_rows": [1, 2]}, {})
    assert score.images_overlap({"dataset": "x", "split": "measure", "source_rows": [1, 2]},
                                {"dataset": "x", "split": "train", "source_rows": [2, 5]})
    assert not score.images_overlap({"dataset": "x", "split": "measure", "source_rows": [1, 2]},
                                    {"dataset": "x", "split": "train", "source_rows": [3, 5]})
    assert data.suite_role(leaderboard).startswith("LEADERBOARD LABELS")


def test_select_keeps_confident_rows_and_caps_classes():
    probs = np.array([[0.95, 0.05], [0.97, 0.03], [0.99, 0.01], [0.2, 0.8], [0.5, 0.5], [0.08, 0.92]])
    assert selftrain.select(probs, 0.9, None).tolist() == [0, 1, 2, 5]
    assert selftrain.select(probs, 0.9, 2).tolist() == [1, 2, 5]  # class 0 capped to its 2 most confident


def test_a_csv_without_its_json_is_an_interrupted_write_and_is_replaced(world, capsys):
    tmp, run, pool, measure = world
    (tmp / "subs").mkdir(exist_ok=True)
    (tmp / "subs" / "orphan.csv").write_text("id,label\n")  # a crash between the CSV and its JSON
    csv = ensemble.build([run], "orphan", measure, tmp / "subs", EnsembleSpec(tta="flip"))
    assert "interrupted before it): replaced" in capsys.readouterr().out and csv.with_suffix(".json").exists()
    with pytest.raises(CompetitionError, match="holds another submission"):  # a recorded one is still protected
        ensemble.build([run], "orphan", measure, tmp / "subs", EnsembleSpec(tta="flip", adapt="bn"))


def test_adapt_auto_without_choose_images_takes_bn_by_default_and_says_so(world, capsys):
    tmp, run, pool, measure = world
    dirs = [f"folds_dir={tmp / 'folds'}", f"models_dir={tmp / 'models'}"]
    bare = train.main(TINY + dirs + ["ood_check=0", "select_on=clean", "name=bare"])
    predict.predict_run(bare, [measure], PredictSpec("flip", adapts=["bn"]), test=False)
    spec = json.loads(ensemble.build([bare], "bare", measure, tmp / "subs", EnsembleSpec(tta="flip", adapt="auto"))
                      .with_suffix(".json").read_text())
    assert spec["adaptation"]["bare"]["chosen"] == "bn" and "ood_check=0" in spec["adaptation"]["bare"]["chosen_on"]
    assert "no corrupted out-of-fold images to choose on" in capsys.readouterr().out


def test_a_fine_tuned_member_is_predicted_as_the_member_it_replaces():
    # A round changes the weights and nothing else: the member's TTA, averaging and adaptation,
    # a learned variant's parameters and its recorded steps/lr/guards, are predict's settings again.
    from competition.selftrain import member_predict_spec

    plain = member_predict_spec("flip-prob", {"tta": "flip", "average": "prob"})
    assert (plain.tta, plain.average, plain.adapts) == ("flip", "prob", ())
    record = {"tta": "shift1", "average": "logits", "tent_steps": 3, "tent_lr": 0.01, "tent_batch": 64,
              "tent_guard": None, "tent_disagree": 0.2}
    spec = member_predict_spec("shift1+tent-norm_head-ens0.99", record)
    assert (spec.adapts, spec.learn_params, spec.learn_ensemble) == (("tent",), "norm+head", 0.99)
    assert (spec.learn_steps, spec.learn_lr, spec.learn_batch, spec.collapse_tol, spec.max_disagree) == \
        (3, 0.01, 64, None, 0.2)
    bn = member_predict_spec("flip+bn0.5", {"tta": "flip"})
    assert (bn.adapts, bn.bn_blend) == (("bn",), 0.5)
