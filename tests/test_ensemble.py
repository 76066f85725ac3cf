"""Ensembling: fold runs form one member, weights are fitted on out-of-fold logits (the ensemble's
OOF accuracy is at least the best member's), the CSV is the weighted logit argmax in the
competition format, misaligned OOF rows and missing OOD logits are handled clearly."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from competition import data
from competition import ensemble as E
from competition import runs as R
from competition.files import CompetitionError
from competition.metrics import accuracy
from competition.specs import EnsembleSpec

N, C, K = 300, 5, 3
OOD_ROWS = (20, 20)


@pytest.fixture
def world(tmp_path):
    """A folds CSV, an OOD folder and a factory of fake run folders in the formats train.py and
    predict.py write."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N)
    fold = np.arange(N) % K
    (tmp_path / "folds").mkdir()
    pd.DataFrame({"index": np.arange(N), "label": labels, "fold": fold}).to_csv(tmp_path / "folds/digits.csv",
                                                                                 index=False)
    ood = tmp_path / "ood"
    ood.mkdir()
    for i, rows in enumerate(OOD_ROWS):
        np.save(ood / f"distortion{i:02d}.npy", np.zeros((rows, 32, 32, 3), np.uint8))

    def make(name, f, signal, seed):
        r = np.random.default_rng(seed)
        run = tmp_path / "models" / name
        run.mkdir(parents=True)
        (run / "best.pt").write_bytes(b"")
        (run / "summary.json").write_text("{}")  # finished
        cfg = {"dataset": "digits", "data": None, "folds_dir": str(tmp_path / "folds"), "fold": f}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "data_config.yaml").write_text(yaml.safe_dump({"num_classes": C}))
        idx = np.flatnonzero(fold == f)
        np.save(run / "oof_index.npy", idx)
        rd = R.RunDir(run)
        weights = rd.weights_hash()  # predict records which best.pt made each output
        rd.write_output("flip", "oof.npy", (np.eye(C)[labels[idx]] * signal + r.normal(size=(len(idx), C)))
                        .astype(np.float32), {"tta": "flip", "weights": weights})
        rd.save_test("flip", r.normal(size=(50, C)).astype(np.float32), np.arange(50) % C, {"weights": weights})
        oodset = data.OodSet(ood)
        for src in oodset.files:
            rd.write_output("flip", R.RunDir.ood_rel(oodset, src), r.normal(size=(OOD_ROWS[0], C)).astype(np.float16),
                            {"source": R.source_stamp(src), "weights": weights, "ood_files": len(oodset.files)})
        return run

    return tmp_path, labels, ood, make


def ood_logits(run, i):
    ood = data.OodSet(run.parent.parent / "ood")
    return run / "pred/flip" / R.RunDir.ood_rel(ood, ood.files[i])


def test_an_existing_submission_is_never_overwritten(world):
    tmp, labels, ood, make = world
    runs = [make("a-f0-s0", 0, 1.0, 0), make("b-f0-s0", 0, 1.0, 1)]
    csv = E.build(runs, "t", ood, tmp / "subs")
    before = csv.read_bytes(), csv.with_suffix(".json").read_bytes()
    assert E.build(runs, "t", ood, tmp / "subs") == csv  # the same submission: left alone
    assert (csv.read_bytes(), csv.with_suffix(".json").read_bytes()) == before
    with pytest.raises(CompetitionError, match="already exists and holds another submission: choose a new --name"):
        E.build(runs, "t", ood, tmp / "subs", EnsembleSpec(method="equal"))
    assert (csv.read_bytes(), csv.with_suffix(".json").read_bytes()) == before
    E.build(runs, "t", ood, tmp / "subs", EnsembleSpec(method="equal"), overwrite=True)
    assert json.loads(csv.with_suffix(".json").read_text())["method"] == "equal"


def test_member_key_drops_only_the_fold():
    assert R.member_key("models/part1-demo-f3-s0") == "part1-demo-s0"
    assert R.member_key("models/part3-f12-s1") == "part3-s1"
    assert R.member_key("models/myrun") == "myrun"


def test_fitted_weights_beat_or_match_the_best_member():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, C, 400)
    members = [np.eye(C)[labels] * s + rng.normal(size=(400, C)) * 1.5 for s in (1.0, 1.2, 0.8, 0.2)]
    w = E.fit_weights(members, labels)
    assert w.shape == (4,) and np.all(w >= 0) and np.isclose(w.sum(), 1)
    best = max(accuracy(z, labels) for z in members)
    assert accuracy(R.combine(members, w), labels) >= best
    assert accuracy(R.combine(members, w), labels) > best  # independent errors: averaging pays here
    assert E.fit_weights(members[:1], labels).tolist() == [1.0]


def test_ensemble_writes_a_valid_submission_and_sidecar(world):
    tmp, labels, ood, make = world
    runs = [make(f"{m}-f{f}-s0", f, s, seed=10 * i + f) for i, (m, s) in enumerate([("a", 1.5), ("b", 1.2), ("c", 0.3)])
            for f in range(K)]
    csv = E.build(runs, "t", ood, tmp / "subs")
    info = json.loads((tmp / "subs/t.json").read_text())
    assert [m["name"] for m in info["members"]] == ["a-s0", "b-s0", "c-s0"]
    assert all(len(m["runs"]) == K and m["oof_rows"] == N for m in info["members"])
    assert info["oof"]["aligned"] and info["oof"]["rows"] == N
    assert info["oof"]["accuracy"] >= info["oof"]["best_member_accuracy"]
    assert np.isclose(sum(info["weights"].values()), 1, atol=1e-5)
    assert {m["setting"] for m in info["members"]} == {"flip"} and info["fit_on"] == "clean"

    # the CSV is the argmax of the weighted sum of each member's fold-averaged logits
    w = [m["weight"] for m in info["members"]]
    want = []
    for i in range(len(OOD_ROWS)):
        per_member = [np.mean([np.load(ood_logits(r, i)).astype(np.float32) for r in runs[m * K:(m + 1) * K]], 0)
                      for m in range(3)]
        want.append(sum(wi * z for wi, z in zip(w, per_member)).argmax(1))
    frame = pd.read_csv(csv)
    assert list(frame.columns) == ["id", "label"] and len(frame) == sum(OOD_ROWS)
    assert frame["id"].iloc[0] == "distortion00_1_0" and frame["id"].iloc[-1] == "distortion01_5_3"
    np.testing.assert_array_equal(frame["label"].to_numpy(), np.concatenate(want))
    assert info["test_accuracy"] is not None


def test_misaligned_oof_rows_use_the_intersection(world, capsys):
    tmp, labels, ood, make = world
    runs = [make(f"a-f{f}-s0", f, 1.0, f) for f in range(K)] + [make("b-f0-s0", 0, 1.0, 7)]
    E.build(runs, "t", ood, tmp / "subs")
    assert "fitted on the 100 rows all of them hold" in capsys.readouterr().out
    info = json.loads((tmp / "subs/t.json").read_text())
    assert info["oof"] == {**info["oof"], "rows": 100, "aligned": False}
    assert [m["oof_rows"] for m in info["members"]] == [N, 100]


def test_missing_logits_say_run_predict_first(world):
    tmp, labels, ood, make = world
    runs = [make("a-f0-s0", 0, 1.0, 0), make("b-f0-s0", 0, 1.0, 1)]
    ood_logits(runs[1], 1).unlink()
    with pytest.raises(CompetitionError, match=r"b-f0-s0/pred/flip/ood/ood-\w+/distortion01.npy is missing: run `python "
                                               r"-m competition.predict .*b-f0-s0 --ood-dir .* --tta flip`"):
        E.build(runs, "t", ood, tmp / "subs")
    (runs[1] / "pred/flip/oof.npy").unlink()
    with pytest.raises(CompetitionError, match="pred/flip/oof.npy is missing: run `python -m competition.predict"):
        E.build(runs, "t", ood, tmp / "subs")
    assert not (tmp / "subs/t.csv").exists()


def test_cli_with_glob(world, monkeypatch, capsys):
    tmp, labels, ood, make = world
    for f in range(K):
        make(f"a-f{f}-s0", f, 1.0, f)
    make("b-f0-s0", 0, 2.0, 9)
    monkeypatch.chdir(tmp)
    csv = E.main(["models/*", "--name", "g", "--ood-dir", "ood", "--method", "equal"])
    assert csv.exists() and "wrote" in capsys.readouterr().out
    assert json.loads((tmp / "submissions/g.json").read_text())["weights"] == {"a-s0": 0.5, "b-s0": 0.5}
