"""Local scoring: the numbers of a toy case (a perfect model scores 1 with a small calibration
error; known mistakes give known per-severity accuracies and ECE), the report files, scoring a
submission through its JSON, and the suite built from held-out labelled images."""
import json

import numpy as np
import pytest
import yaml

from competition import data, metrics, runs
from competition import score as S
from competition.files import CompetitionError

C = 4


def test_perfect_logits_score_one_with_small_ece():
    labels = np.arange(40) % C
    logits = np.eye(C)[labels] * 20.0
    assert metrics.ece(logits, labels) < 1e-6
    np.testing.assert_array_equal(metrics.file_accuracy(np.tile(logits, (5, 1)), labels), np.ones(5))


def test_toy_numbers():
    # one right at confidence 0.8, one wrong at confidence 0.6 (other class 0.4): ECE = (0.2 + 0.6) / 2
    logits = np.log([[0.8, 0.2], [0.4, 0.6]])
    assert metrics.ece(logits, np.array([0, 0])) == pytest.approx(0.4)
    labels = np.array([0, 1, 2, 3])
    rows = []
    for s in range(5):  # severity s+1 gets the first 4 - s images right... at least the first one
        pred = labels.copy()
        pred[max(1, 4 - s):] = (pred[max(1, 4 - s):] + 1) % C
        rows.append(np.eye(C)[pred])
    acc = metrics.file_accuracy(np.concatenate(rows), labels)
    np.testing.assert_allclose(acc, [1, 0.75, 0.5, 0.25, 0.25])
    summ = metrics.table_summary(np.stack([acc, np.ones(5)]))
    assert summ["ood_accuracy"] == pytest.approx((2.75 + 5) / 10)
    assert summ["per_severity"] == pytest.approx([1, 0.875, 0.75, 0.625, 0.625])
    with pytest.raises(CompetitionError, match="5 severities"):
        metrics.file_accuracy(np.zeros((7, C)), labels)


@pytest.fixture
def scored(tmp_path):
    """A labelled suite (2 corruptions, N=6) and a run whose logits are perfect except for
    distortion01 at severity 5, where every image is wrong."""
    n, rng = 6, np.random.default_rng(0)
    labels = rng.integers(0, C, n)
    suite = tmp_path / "suite"
    suite.mkdir()
    for i in range(2):
        np.save(suite / f"distortion{i:02d}.npy", np.zeros((5 * n, 32, 32, 3), np.uint8))
    np.save(suite / "labels.npy", labels)
    (suite / "corruptions.json").write_text(json.dumps({"names": {"distortion00.npy": "fog",
                                                                  "distortion01.npy": "snow"}}))
    (suite / "suite.json").write_text(json.dumps({"dataset": "digits", "split": "test", "n": n}))
    run = tmp_path / "models/p-f0-s0"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"")
    (run / "summary.json").write_text(json.dumps({"trained_on": ["gaussian_noise", "fog"]}))  # finished
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "digits", "folds_dir": str(tmp_path), "fold": 0,
                                                     "data": None}))
    (run / "data_config.yaml").write_text(yaml.safe_dump({"num_classes": C}))
    rd = runs.RunDir(run)
    weights = rd.weights_hash()
    rd.save_test("flip", np.eye(C)[np.arange(20) % C] * 20, np.arange(20) % C, {"weights": weights})
    oodset = data.OodSet(suite)
    for i, src in enumerate(oodset.files):
        z = np.eye(C)[np.tile(labels, 5)] * 20
        if i == 1:
            z[4 * n:] = np.roll(z[4 * n:], 1, axis=1)
        rd.write_output("flip", runs.RunDir.ood_rel(oodset, src), z.astype(np.float16),
                        {"source": runs.source_stamp(src), "weights": weights, "ood_files": 2})
    return suite, run


def test_score_a_run(scored, capsys):
    suite, run = scored
    r = S.score_target(run, suite)
    assert r["clean_accuracy"] == 1 and r["clean_ece"] < 1e-6
    assert r["corruptions"] == ["fog", "snow"] and r["table"] == [[1] * 5, [1, 1, 1, 1, 0]]
    assert r["ood_accuracy"] == pytest.approx(0.9) and r["per_severity"] == [1, 1, 1, 1, 0.5]
    assert r["ood_ece"] == pytest.approx(0.1, abs=1e-3)  # 10% of the images wrong at confidence ~1
    prefix = runs.RunDir(run).score_prefix("flip", data.OodSet(suite))
    md = prefix.with_suffix(".md").read_text()
    assert "| snow | 1.000 | 1.000 | 1.000 | 1.000 | 0.000 | 0.800 |" in md and "**0.9000**" in md
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(prefix.with_suffix(".json").read_text())["ood_accuracy"] == pytest.approx(0.9)
    # the families training saw (summary.json's trained_on: noise and weather here) and the rest's mean
    assert r["trained_on"] == ["fog", "gaussian_noise"] and r["unseen_accuracy"] == pytest.approx(0.8)
    out = capsys.readouterr().out
    assert "OOD acc 0.9000 +- 0.0000" in out and "unseen families 0.8000 (1 of 2)" in out
    assert r["ood_se"] == 0  # every image right in 9 of the 10 cells: no spread between images


def test_score_a_submission_through_its_json(scored, tmp_path):
    suite, run = scored
    spec = {"members": [{"name": "p-s0", "runs": [str(run)], "weight": 1.0, "setting": "flip"}],
            "oof": {"accuracy": 0.5}}
    (tmp_path / "sub.json").write_text(json.dumps(spec))
    r = S.main([str(tmp_path / "sub.json"), "--ood-dir", str(suite)])[0]
    assert r["ood_accuracy"] == pytest.approx(0.9) and r["clean_accuracy"] == 1
    assert json.loads((tmp_path / "sub.json").read_text())["local_score"]["ood_accuracy"] == pytest.approx(0.9)
    assert (tmp_path / "sub.score.md").exists() and (tmp_path / "sub.score.png").exists()


def test_scoring_needs_labels_and_predictions(scored, tmp_path):
    suite, run = scored
    with pytest.raises(CompetitionError, match="labels.npy is missing"):
        S.score_target(run, tmp_path)
    with pytest.raises(CompetitionError, match=r"pred/flip\+bn/ood/suite-\w+/distortion00.npy is missing"):
        S.score_target(run, suite, adapt="bn")


def test_score_a_learned_variant_setting(scored, capsys):
    """A setting predict named after its options (pred/flip+tent-all/) is scored by that name, and a
    name predict never writes is refused as such, not searched for."""
    suite, run = scored
    rd, oodset = runs.RunDir(run), data.OodSet(suite)
    perfect = (np.eye(C)[np.tile(oodset.labels, 5)] * 20).astype(np.float16)  # the plain logits miss a cell
    for src in oodset.files:
        rel = runs.RunDir.ood_rel(oodset, src)
        rd.write_output("flip+tent-all", rel, perfect, rd.manifest("flip")[rel])
    r = S.main([str(run), "--ood-dir", str(suite), "--tta", "flip", "--adapt", "tent-all"])[0]
    assert r["settings"] == ["flip+tent-all"] and r["ood_accuracy"] == 1
    assert rd.score_prefix("flip+tent-all", oodset).with_suffix(".json").exists()
    with pytest.raises(CompetitionError, match=r"'tent-bogus' is not an adaptation a prediction setting carries"):
        S.score_target(run, suite, "flip", adapt="tent-bogus")
    with pytest.raises(CompetitionError, match=r"pred/flip\+tent-norm_head-ens0.99/ood/.* is missing: run `python -m "
                                               r"competition.predict .* --tta flip --adapt tent --learn-params "
                                               r"norm\+head --learn-ensemble 0.99` first"):
        S.score_target(run, suite, "flip", adapt="tent-norm_head-ens0.99")


def test_build_suite_from_the_test_split(tmp_path):
    out = S.main(["suite", "--out", str(tmp_path / "s"), "--dataset", "digits", "--n", "6",
                  "--names", "brightness,contrast", "--workers", "1"])
    assert sorted(p.name for p in out.glob("distortion*.npy")) == ["distortion00.npy", "distortion01.npy"]
    assert np.load(out / "distortion00.npy").shape == (30, 32, 32, 3)
    info = json.loads((out / "suite.json").read_text())
    assert info["split"] == "test" and info["n"] == 6 and len(np.load(out / "labels.npy")) == 6
    assert data.OodSet(out).is_suite


def test_build_suite_without_test_split_uses_fold0_and_warns(tmp_path, capsys):
    from PIL import Image

    from competition import folds

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((32, 32, 3), 40 * i + (c == "dog") * 20, np.uint8)).save(root / c / f"{i}.png")
    folds.main(["--dataset", "imagefolder", "--data", str(root), "--k", "5", "--folds-dir", str(tmp_path / "f"),
                "--data-dir", str(tmp_path / "d")])
    out = S.build_suite(tmp_path / "s", "imagefolder", root, tmp_path / "d", tmp_path / "f", n=0, names=["brightness"])
    info = json.loads((out / "suite.json").read_text())
    assert info["split"] == "train" and info["fold"] == 0 and info["n"] == 2
    assert "LEAK" in capsys.readouterr().err
    assert S._leaks([{"fold": 1}, {"fold": 0}], info, [runs.RunDir("r1"), runs.RunDir("r0")]) == ["r1"]
    assert runs.member_key("x") == "x"


def test_standard_error_is_over_images_not_cells():
    from competition.metrics import image_standard_error
    right = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]])  # 3 images, right in 4, 2 and 0 of 4 cells
    assert image_standard_error(right) == pytest.approx(0.5 / np.sqrt(3))  # per image 1, .5, 0: sd .5
    # 95 cells that agree on which images are hard are no more certain than one cell
    one = right[1:2]
    assert image_standard_error(np.repeat(one, 95, 0)) == image_standard_error(one) == pytest.approx(
        np.std([1, 0, 0], ddof=1) / np.sqrt(3))


def test_paired_difference_over_the_same_images(scored, capsys):
    a = {"target": "a", "ood_dir": "s", S.PER_IMAGE: np.array([1, 1, 0, 0.5])}
    b = {"target": "b", "ood_dir": "s", S.PER_IMAGE: np.array([1, 1, 1, 0.5])}
    diff, se = S.paired_difference(a, b)
    assert diff == pytest.approx(0.25) and se == pytest.approx(0.25)  # d = [0, 0, 1, 0]: sd 0.5 over 2
    with pytest.raises(CompetitionError, match="different suites"):
        S.paired_difference(a, {**b, "ood_dir": "other"})
    suite, run = scored
    results = S.main([str(run), str(run), "--ood-dir", str(suite)])
    assert S.PER_IMAGE not in json.loads(runs.RunDir(run).score_prefix("flip", data.OodSet(suite))
                                         .with_suffix(".json").read_text())
    assert results[0][S.PER_IMAGE].shape == (6,)
    assert "OOD acc +0.00 +- 0.00 points (paired over the suite's 6 images)" in capsys.readouterr().out


def test_a_cifar100_test_split_suite_is_refused_or_flagged(tmp_path):
    """CIFAR-100's test split is the competition's OOD files, uncorrupted: a suite from it scores the
    leaderboard's own answers. Refused by default; the flag builds it and every report says so;
    a measure reserve in the folds file is used instead, without any flag."""
    from competition import folds
    from test_data import write_cifar100

    write_cifar100(tmp_path / "d", n_train=30, n_test=6)
    common = dict(dataset="cifar100", data_dir=tmp_path / "d", folds_dir=tmp_path / "f", n=0, names=["brightness"])
    with pytest.raises(CompetitionError, match="leaderboard's own answers.*--measure-n"):
        S.build_suite(tmp_path / "s0", **common)
    out = S.build_suite(tmp_path / "s1", leaderboard_labels=True, **common)
    suite = data.OodSet(out)
    assert suite.info()["leaderboard_labels"] and suite.role().startswith("LEADERBOARD LABELS")
    folds.main(["--dataset", "cifar100", "--data-dir", str(tmp_path / "d"), "--folds-dir", str(tmp_path / "f"),
                "--k", "2", "--measure-n", "6"])
    out = S.build_suite(tmp_path / "s2", **common)
    info = data.OodSet(out).info()
    frame = folds.read_folds(tmp_path / "f" / "cifar100.csv")
    assert info["split"] == "measure" and sorted(info["source_rows"]) == folds.measure_rows(frame).tolist()
    assert data.OodSet(out).role().startswith("measure:")


def test_self_training_on_the_competition_files_leaks_into_a_test_split_suite(tmp_path):
    """The competition's OOD files are CIFAR-100's test split corrupted: a run self-trained on them
    is flagged on a suite of that split (whatever its rows), not on a measure reserve."""
    pseudo = tmp_path / "pseudo.npz"
    (tmp_path / "pseudo.json").write_text(json.dumps({"ood_dir": str(tmp_path / "ood-test"), "pool": {},
                                                      "source_rows": []}))
    cfg = {"fold": 0, "pseudo": str(pseudo)}
    leaderboard = {"dataset": "cifar100", "split": "test", "leaderboard_labels": True, "n": 10}
    assert S._leaks([cfg], leaderboard, [runs.RunDir("st")]) == ["st"]
    assert S._leaks([{"fold": 0}], leaderboard, [runs.RunDir("plain")]) == []


def test_a_suite_of_fold_minus_one_is_refused(tmp_path):
    with pytest.raises(CompetitionError, match="--fold -1"):
        S.build_suite(tmp_path / "s", "digits", folds_dir=tmp_path / "f", n=4, names=["brightness"], fold=-1)
