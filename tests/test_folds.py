"""Folds: stratified, seeded, written once, never silently replaced by a different split."""
import numpy as np
import pandas as pd
import pytest

from competition import folds as F
from competition.files import CompetitionError

# 4 classes of uneven size (37, 23, 50, 11), shuffled
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [37, 23, 50, 11]))


@pytest.mark.parametrize("k", [2, 5])
def test_folds_are_stratified(k):
    fold = F.make_folds(LABELS, k=k, seed=0)
    assert fold.shape == LABELS.shape and set(fold.tolist()) == set(range(k))
    for c in range(4):
        per_fold = np.bincount(fold[LABELS == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1


def test_folds_are_seeded(tmp_path):
    a = F.write_folds(F.folds_frame(LABELS, 5, seed=0), tmp_path / "a.csv")
    b = F.write_folds(F.folds_frame(LABELS, 5, seed=0), tmp_path / "b.csv")
    assert a == b == "written"
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert not np.array_equal(F.make_folds(LABELS, 5, seed=0), F.make_folds(LABELS, 5, seed=1))


def test_too_few_images_for_k():
    with pytest.raises(CompetitionError, match="rarest class has 11"):
        F.make_folds(LABELS, k=12)
    with pytest.raises(CompetitionError, match="at least 2"):
        F.make_folds(LABELS, k=1)


def test_write_folds_keeps_an_existing_split(tmp_path):
    path = tmp_path / "folds" / "x.csv"
    frame = F.folds_frame(LABELS, 5, seed=0)
    assert F.write_folds(frame, path) == "written"
    before = path.read_bytes()
    assert F.write_folds(F.folds_frame(LABELS, 5, seed=0), path) == "unchanged"
    other = F.folds_frame(LABELS, 5, seed=1)
    with pytest.raises(CompetitionError, match="--force") as e:
        F.write_folds(other, path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before
    assert F.write_folds(other, path, force=True) == "written"
    pd.testing.assert_frame_equal(F.read_folds(path), other)
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]  # no temp files left behind


def test_read_folds_round_trip_columns(tmp_path):
    frame = F.folds_frame(LABELS, 3, seed=2)
    F.write_folds(frame, tmp_path / "f.csv")
    back = F.read_folds(tmp_path / "f.csv")
    assert list(back.columns) == ["index", "label", "fold"]
    np.testing.assert_array_equal(back["index"], np.arange(len(LABELS)))
    np.testing.assert_array_equal(back["label"], LABELS)


@pytest.mark.parametrize("text, problem", [
    ("index,label\n0,1\n1,2\n", "columns"),
    ("index,label,fold\n0,1,zero\n", "not a folds CSV"),
    ("index,label,fold\n0,1,\n", "not a folds CSV"),
    ("", "not a folds CSV"),
    ("\x00\x01garbage", "f.csv"),
])
def test_read_folds_rejects_malformed_csv(tmp_path, text, problem):
    path = tmp_path / "f.csv"
    path.write_text(text)
    with pytest.raises(CompetitionError, match=problem) as e:
        F.read_folds(path)
    assert str(path) in str(e.value)


def test_read_folds_missing_says_what_to_run(tmp_path):
    with pytest.raises(CompetitionError, match="competition.folds"):
        F.read_folds(tmp_path / "nope.csv")


def test_main_writes_digits_folds(tmp_path, capsys):
    argv = ["--dataset", "digits", "--folds-dir", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    out = F.main(argv)
    assert out == tmp_path / "digits.csv"
    frame = F.read_folds(out)
    assert len(frame) == 1437 and sorted(frame["fold"].unique()) == [0, 1, 2, 3, 4]  # digits' 80% train split
    assert "written" in capsys.readouterr().out
    F.main(argv)
    assert "unchanged" in capsys.readouterr().out
    with pytest.raises(CompetitionError, match="--force"):
        F.main(argv + ["--seed", "1"])
    F.main(argv + ["--seed", "1", "--force"])
    assert not F.read_folds(out).equals(frame)


def test_dataset_name():
    assert F.dataset_name("digits") == "digits"
    assert F.dataset_name("imagefolder", "../shared/data/cifar10-jpg-train.tar.gz") == "cifar10-jpg-train"


def test_measure_reserve_is_stratified_seeded_and_leaves_the_folds_alone_without_it():
    with_reserve = F.make_folds(LABELS, 5, seed=0, measure_n=20)
    reserve = with_reserve == F.MEASURE
    assert reserve.sum() == 20 and np.array_equal(with_reserve, F.make_folds(LABELS, 5, seed=0, measure_n=20))
    share = 20 * np.bincount(LABELS) / len(LABELS)  # stratified: each class its share of the 20
    assert np.abs(np.bincount(LABELS[reserve]) - share).max() < 1
    assert sorted(np.unique(with_reserve[~reserve])) == [0, 1, 2, 3, 4]
    assert np.array_equal(F.make_folds(LABELS, 5, seed=0, measure_n=0), F.make_folds(LABELS, 5, seed=0))
    with pytest.raises(CompetitionError, match="measure-n"):
        F.make_folds(LABELS, 5, measure_n=len(LABELS))
    frame = F.folds_frame(LABELS, 5, 0, 20)
    assert F.reserve_id(F.measure_rows(frame)) and F.reserve_id([]) is None
