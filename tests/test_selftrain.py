"""Self-training end to end on digits: a stand-in unlabelled test set from a fold the runs
exclude, one round through the training loop, a new run folder and submission; it refuses a
pseudo-label set made of held-out images, and the adaptation choice lands in the JSON."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from competition import ensemble, predict, score, selftrain, train, tta
from competition.files import CompetitionError
from competition.runs import RunDir

TINY = ["--part", "1", "--preset", "demo", "epochs=2", "model_args.widths=[8,16,16]", "model_args.hidden=16",
        "exclude_folds=[1]", "ood_check=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st")
    dirs = [f"folds_dir={tmp / 'folds'}", f"models_dir={tmp / 'models'}"]
    run = train.main(TINY + dirs)
    common = ["--dataset", "digits", "--folds-dir", str(tmp / "folds"), "--names", "brightness,gaussian_noise",
              "--workers", "1", "--n", "12"]
    pool = score.main(["suite", "--out", str(tmp / "pool"), "--fold", "1", *common])  # the "test files"
    measure = score.main(["suite", "--out", str(tmp / "measure"), "--fold", "0", *common])
    predict.predict_run(run, [pool, measure], tta.parse_tta("flip"), adapts=["bn"], test=False)
    return tmp, run, pool, measure


def test_one_round_trains_predicts_and_ensembles_again(world):
    tmp, run, pool, measure = world
    csv = ensemble.build([run], "base", pool, tmp / "subs", tta_name="flip", adapt="auto", suite=measure)
    spec = json.loads(csv.with_suffix(".json").read_text())
    assert set(spec["adaptation"][RunDir(run).member]) == {"none", "bn", "chosen"}  # the choice and its reasons
    out = selftrain.main([str(csv.with_suffix(".json")), "--threshold", "0.1", "--epochs", "1", "--suite",
                          str(measure), "--out-dir", str(tmp / "rounds")])
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
    labelled = int(((fold != 0) & (fold != 1)).sum())
    assert cfg["lr"] == pytest.approx(selftrain.LR_FRACTION * source["lr"])
    assert info["selftrain"]["max_images"] == int(selftrain.PSEUDO_FRACTION * labelled)
    assert selftrain.labelled_images(RunDir(run)) == labelled
    assert selftrain.source_run(new).path == RunDir(run).path  # round 2's lr comes from the original, not round 1
    assert "local_score" in info or "local_score_adapted" in info


def test_a_pseudo_set_of_held_out_images_is_refused(world):
    tmp, run, pool, measure = world
    csv = ensemble.build([run], "onheld", measure, tmp / "subs", tta_name="flip")  # the "test files" ARE fold 0: held out
    with pytest.raises(CompetitionError, match="holds out .* pseudo-labelling them would train on the held-out fold"):
        selftrain.main([str(csv.with_suffix(".json")), "--out-dir", str(tmp / "subs")])


def test_select_keeps_confident_rows_and_caps_classes():
    probs = np.array([[0.95, 0.05], [0.97, 0.03], [0.99, 0.01], [0.2, 0.8], [0.5, 0.5], [0.08, 0.92]])
    assert selftrain.select(probs, 0.9, None).tolist() == [0, 1, 2, 5]
    assert selftrain.select(probs, 0.9, 2).tolist() == [1, 2, 5]  # class 0 capped to its 2 most confident
