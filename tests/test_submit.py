"""Submission CSVs: the writer and the validator agree, the validator names each kind of
mistake, and submitting without Kaggle credentials fails with one clear error."""
import os
import sys

import numpy as np
import pandas as pd
import pytest

from competition import submit as S
from competition.files import CompetitionError

ROWS = [10, 10, 10]  # three OOD files of N = 2 images per severity (every file holds the same images)


@pytest.fixture
def ood_dir(tmp_path):
    d = tmp_path / "ood"
    d.mkdir()
    for i, rows in enumerate(ROWS):
        np.save(d / f"distortion{i:02d}.npy", np.zeros((rows, 32, 32, 3), np.uint8))
    return d


@pytest.fixture
def good(tmp_path):
    labels = np.arange(sum(ROWS)) % 7
    return S.write_submission(tmp_path / "sub.csv", labels, ROWS), labels


def lines(path):
    return path.read_text().splitlines()


def rewrite(path, rows):
    path.write_text("\n".join(rows) + "\n")


def test_ids_in_file_severity_index_order():
    assert S.submission_ids([10, 5]) == (
        [f"distortion00_{s}_{i}" for s in range(1, 6) for i in range(2)]
        + [f"distortion01_{s}_0" for s in range(1, 6)])
    with pytest.raises(CompetitionError, match="multiple of 5"):
        S.submission_ids([7])


def test_round_trip(good, ood_dir):
    path, labels = good
    assert lines(path)[:3] == ["id,label", "distortion00_1_0,0", "distortion00_1_1,1"]
    for kwargs in ({"ood_dir": ood_dir}, {"rows_per_file": ROWS}, {}):
        frame = S.check_submission(path, num_classes=7, **kwargs)
        assert list(frame["id"]) == S.submission_ids(ROWS)
        np.testing.assert_array_equal(frame["label"].to_numpy(), labels)
        assert frame["label"].dtype == np.int64


def test_writer_rejects_bad_labels(tmp_path):
    with pytest.raises(CompetitionError, match="30 OOD rows"):
        S.write_submission(tmp_path / "x.csv", np.zeros(29, np.int64), ROWS)
    with pytest.raises(CompetitionError, match="integer"):
        S.write_submission(tmp_path / "x.csv", np.zeros(30, np.float32), ROWS)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("header", ["id,Label", "ID,label", "label,id", "id, label", "id,label,extra"])
def test_rejects_wrong_header(good, header):
    path, _ = good
    rewrite(path, [header] + lines(path)[1:])
    with pytest.raises(CompetitionError, match="header"):
        S.check_submission(path)


def test_rejects_missing_row(good, ood_dir):
    path, _ = good
    rows = lines(path)
    rewrite(path, rows[:18] + rows[19:])  # drops data row 18: distortion01_4_1
    with pytest.raises(CompetitionError, match=r"29 rows, expected 30 .*row 18: id distortion01_4_1 expected"):
        S.check_submission(path, ood_dir=ood_dir)
    with pytest.raises(CompetitionError, match="distortion01 has 9 rows"):  # no reference: the ids alone
        S.check_submission(path)


def test_rejects_swapped_ids(good):
    path, _ = good
    rows = lines(path)
    rows[3], rows[4] = rows[4], rows[3]  # data rows 3 and 4: distortion00_2_0, distortion00_2_1
    rewrite(path, rows)
    with pytest.raises(CompetitionError, match="row 3: id distortion00_2_0 expected, found distortion00_2_1"):
        S.check_submission(path, rows_per_file=ROWS)


def test_rejects_duplicate_id(good):
    path, _ = good
    rows = lines(path)
    rows[5] = rows[4].split(",")[0] + ",3"  # row 5 repeats row 4's id
    rewrite(path, rows)
    with pytest.raises(CompetitionError, match="row 5: id distortion00_2_1 appears again .first at row 4"):
        S.check_submission(path, rows_per_file=ROWS)


@pytest.mark.parametrize("label", ["7", "100", "-1", "123456789012345678901234567890"])
def test_rejects_label_out_of_range(good, label):
    path, _ = good
    rows = lines(path)
    rows[17] = rows[17].split(",")[0] + "," + label
    rewrite(path, rows)
    with pytest.raises(CompetitionError, match=r"row 17 \(distortion01_4_0\): label .*(out of range|not an integer)"):
        S.check_submission(path, num_classes=7)


@pytest.mark.parametrize("label", ["3.5", "cat", "", "2.0"])
def test_rejects_non_integer_label(good, label):
    path, _ = good
    rows = lines(path)
    rows[2] = rows[2].split(",")[0] + "," + label
    rewrite(path, rows)
    with pytest.raises(CompetitionError, match=r"row 2 .*is not an integer class index"):
        S.check_submission(path)


def test_rejects_malformed_id_and_missing_file(good, tmp_path):
    path, _ = good
    rows = lines(path)
    rows[1] = "distortion0_1_0,0"
    rewrite(path, rows)
    with pytest.raises(CompetitionError, match="row 1: id 'distortion0_1_0' is not of the form"):
        S.check_submission(path)
    with pytest.raises(CompetitionError, match="does not exist"):
        S.check_submission(tmp_path / "nope.csv")


def test_cli_check(good, ood_dir, capsys):
    path, _ = good
    S.main(["--check", str(path), "--ood-dir", str(ood_dir), "--num-classes", "7"])
    assert "ok:" in capsys.readouterr().out
    with pytest.raises(CompetitionError, match="out of range"):
        S.main(["--check", str(path), "--num-classes", "5"])


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """A HOME without ~/.kaggle, no KAGGLE_* variables, and a fresh import of kaggle (it reads its
    config directory when first imported). Submitting for real would fail the test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in [v for v in list(os.environ) if v.startswith("KAGGLE_") or v == "XDG_CONFIG_HOME"]:
        monkeypatch.delenv(var)
    for mod in [m for m in sys.modules if m == "kaggle" or m.startswith("kaggle.")]:
        monkeypatch.delitem(sys.modules, mod)
    kaggle_extended = pytest.importorskip("kaggle.api.kaggle_api_extended")

    def never(*args, **kwargs):
        raise AssertionError("the test must not contact Kaggle")

    monkeypatch.setattr(kaggle_extended.KaggleApi, "competition_submit", never)
    return home


def test_submit_without_credentials_is_one_clear_error(good, no_credentials):
    path, _ = good
    with pytest.raises(CompetitionError, match="kaggle.json.*KAGGLE_USERNAME"):
        S.kaggle_submit(path, "test", "some-competition")


def test_submit_needs_a_competition(good, monkeypatch):
    path, _ = good
    monkeypatch.delenv("KAGGLE_COMPETITION", raising=False)
    with pytest.raises(CompetitionError, match="--competition SLUG"):
        S.kaggle_submit(path, "test")
    with pytest.raises(CompetitionError, match="--competition SLUG"):
        S.main([str(path), "-m", "test"])


def test_cli_validates_before_submitting(good, no_credentials, monkeypatch):
    path, _ = good
    rows = lines(path)
    rewrite(path, rows[:-1])
    monkeypatch.setattr(S, "kaggle_submit", lambda *a: pytest.fail("submitted an invalid file"))
    with pytest.raises(CompetitionError, match="distortion02 has 9 rows"):
        S.main([str(path), "-m", "test", "--competition", "x", "--allow-partial"])


def test_frame_is_what_kaggle_reads(good):
    path, _ = good
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["id", "label"] and len(frame) == sum(ROWS)


def test_a_demo_sized_csv_is_never_uploaded_to_the_competition(good, monkeypatch):
    path, _ = good  # a valid CSV of a few rows, as the digits demo writes
    monkeypatch.setattr(S, "kaggle_submit", lambda *a: pytest.fail("spent a daily submission on a wrong-size file"))
    with pytest.raises(CompetitionError, match=r"rows, expected 950000 for the competition.s 19 files of 50000 rows"):
        S.main([str(path), "-m", "demo", "--competition", "x"])


def test_no_network_is_told_apart_from_a_refusal(good, monkeypatch):
    import socket

    path, _ = good

    class Api:
        def __init__(self, exc):
            self.exc = exc

        def competition_submit(self, *a):
            raise self.exc

    try:  # requests-style wrapping: the network error is the cause
        try:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        except OSError as inner:
            raise RuntimeError("HTTPSConnectionPool: Max retries exceeded") from inner
    except RuntimeError as wrapped:
        offline = wrapped
    monkeypatch.setattr(S, "_kaggle_api", lambda: Api(offline))
    with pytest.raises(CompetitionError, match="could not reach Kaggle.*check kaggle.com"):
        S.kaggle_submit(path, "m", "slug")
    monkeypatch.setattr(S, "_kaggle_api", lambda: Api(PermissionError("403 Forbidden: accept the rules")))
    with pytest.raises(CompetitionError, match="Kaggle refused"):
        S.kaggle_submit(path, "m", "slug")
