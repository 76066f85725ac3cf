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


# ---------------------------------------------------------------------------- learned adaptation variants

def test_variant_names_round_trip():
    from competition import adapt as A

    for objective in A.ADAPTATIONS:
        options = [(p, e) for p in A.PARAMS for e in (None, 0.0, 0.99, 1.0, 1e-05)] if objective in A.OBJECTIVES \
            else [("bn", None)]
        for params, alpha in options:
            name = A.variant(objective, params, alpha)
            assert A.parse_variant(name) == (objective, params, alpha), name
            assert R.parse_adaptation(name) == (objective, params, alpha, 1.0)
            assert R.setting_name("flip", "logits", name) == f"flip+{name}" and R.adaptation(f"flip+{name}") == name
    assert A.parse_variant("tent-norm_head-ens0.99") == ("tent", "norm+head", 0.99)
    for blend in (0.0, 0.5, 1e-05):  # bn's blend is setting_name's suffix, read by parse_adaptation alone
        assert R.parse_adaptation(R.adaptation(R.setting_name("flip", "logits", "bn", blend))) == \
            ("bn", "bn", None, blend)
    # spellings predict never writes name no folder: refused, never read as something near
    for name in ("none", "", "tent-bn", "tent-ens0.990", "tent-ens1.5", "tent-ens", "tent-all-norm_head",
                 "tent-ens0.5-all", "bn-all", "bn-ens0.5", "bn0.5", "TENT", "tent-"):
        with pytest.raises(ValueError, match="not an adaptation a prediction setting carries"):
            A.parse_variant(name)
    for part in ("bn1", "bn0.50", "bn1.5", "tent-x"):
        with pytest.raises(CompetitionError, match="not an adaptation a prediction setting carries"):
            R.parse_adaptation(part)


def test_how_suggests_predict_flags_that_write_the_variant():
    run = R.RunDir("models/r")
    assert run.how("flip+tent-all") == "run `python -m competition.predict models/r --tta flip --adapt tent " \
                                       "--learn-params all` first"
    assert run.how("shift1-prob+shot-norm_head-ens0.99") == (
        "run `python -m competition.predict models/r --tta shift1 --average prob --adapt shot --learn-params "
        "norm+head --learn-ensemble 0.99` first")
    assert run.how("flip+eata-ens1e-05").endswith("--adapt eata --learn-ensemble 1e-05` first")
    assert run.how("flip+bn0.5").endswith("--tta flip --adapt bn --bn-blend 0.5` first")
    assert run.how("flip+tent").endswith("--tta flip --adapt tent` first")
    assert run.how("flip").endswith("--tta flip` first")
    assert run.how("flip+tent-bogus").startswith("no predict command writes flip+tent-bogus ('tent-bogus' is not")


def add_setting(run, setting, labels, right, seed):
    """predict's outputs of an adapted `setting` for a fake run of the world: OOD logits, and the
    corrupted out-of-fold ones (19 x 5 cells of the same 10 held-out rows), right on the first
    `right` rows of each cell and wrong on the rest: accuracy right / 10 on the choose images."""
    rd, r = R.RunDir(run), np.random.default_rng(seed)
    rows = rd.oof_index()[:10]
    np.save(run / R.RunDir.OOF_OOD_INDEX, rows)
    guess = (labels[rows] + (np.arange(10) >= right)) % C
    z = np.tile(np.eye(C)[guess] * 5, (19 * 5, 1)).astype(np.float16)
    rd.write_output(setting, R.RunDir.PRED_OOF_OOD, z, {"weights": rd.weights_hash()})
    oodset = data.OodSet(run.parent.parent / "ood")
    for src in oodset.files:
        rd.write_output(setting, R.RunDir.ood_rel(oodset, src), r.normal(size=(OOD_ROWS[0], C)).astype(np.float16),
                        {"source": R.source_stamp(src), "weights": rd.weights_hash(), "ood_files": len(oodset.files)})


def test_adapt_auto_picks_a_variant_best_on_the_choose_images(world, capsys):
    tmp, labels, ood, make = world
    a = make("a-f0-s0", 0, 1.0, 0)
    b0, b1 = make("b-f0-s0", 0, 1.0, 1), make("b-f1-s0", 1, 1.0, 2)
    for setting, right in [("flip", 5), ("flip+bn", 6), ("flip+tent", 6), ("flip+tent-all", 8),
                           ("flip+tent-norm_head-ens0.99", 7), ("flip+tent-bogus", 10)]:
        add_setting(a, setting, labels, right, 0)
    for run in (b0, b1):
        for setting, right in [("flip", 5), ("flip+bn", 7)]:
            add_setting(run, setting, labels, right, 0)
    add_setting(b0, "flip+tent-all", labels, 10, 0)  # one run of b only: b can't use it
    members = R.group_members([R.RunDir(x) for x in (a, b0, b1)], "flip")
    assert E.adapted_settings(members[0], "flip") == ["flip+bn", "flip+tent", "flip+tent-norm_head-ens0.99",
                                                      "flip+tent-all"]  # cheapest first; no folder predict never names
    csv = E.build([a, b0, b1], "auto", ood, tmp / "subs", EnsembleSpec(adapt="auto"))
    info = json.loads(csv.with_suffix(".json").read_text())
    assert info["adaptation"]["a-s0"] == {**info["adaptation"]["a-s0"], "none": 0.5, "bn": 0.6, "tent": 0.6,
                                          "tent-all": 0.8, "tent-norm_head-ens0.99": 0.7, "chosen": "tent-all"}
    assert "tent-bogus" not in info["adaptation"]["a-s0"]
    assert info["adaptation"]["b-s0"]["chosen"] == "bn" and "tent-all" not in info["adaptation"]["b-s0"]
    assert [m["setting"] for m in info["members"]] == ["flip+tent-all", "flip+bn"]
    assert "0.8000 tent-all" in capsys.readouterr().out
    # one variant for everyone, by name, through the command line too
    E.main([str(a), "--name", "named", "--ood-dir", str(ood), "--adapt", "tent-norm_head-ens0.99",
            "--out-dir", str(tmp / "subs")])
    named = json.loads((tmp / "subs/named.json").read_text())
    assert named["members"][0]["setting"] == "flip+tent-norm_head-ens0.99"
    with pytest.raises(CompetitionError, match="--adapt must be none, auto or an adaptation predict writes: "
                                               "'tent-bogus' is not"):
        E.build([a], "bad", ood, tmp / "subs", EnsembleSpec(adapt="tent-bogus"))


def test_one_folds_file_spelled_relative_and_absolute_is_one_split(world, monkeypatch):
    """A run trained with folds_dir relative to the project and one with the absolute path name the
    same file: the ensemble takes them as one split; a really different folds file is refused."""
    tmp, labels, ood, make = world
    a, b = make("a", 0, 3.0, 0), make("b", 1, 3.0, 1)
    monkeypatch.chdir(tmp)
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    (b / "config.yaml").write_text(yaml.safe_dump({**cfg, "folds_dir": "folds"}))
    members = [R.Member(n, [R.RunDir(r)], "flip") for n, r in (("a", a), ("b", b))]
    assert (R.oof_labels(members) == labels).all()
    (tmp / "other").mkdir()
    (tmp / "other/digits.csv").write_text((tmp / "folds/digits.csv").read_text())
    (b / "config.yaml").write_text(yaml.safe_dump({**cfg, "folds_dir": "other"}))
    with pytest.raises(CompetitionError, match="different folds files"):
        R.oof_labels([R.Member(n, [R.RunDir(r)], "flip") for n, r in (("a", a), ("b", b))])
