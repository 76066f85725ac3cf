"""Balanced predictions per OOD file and severity (ensemble --balance): the competition's files hold
every class equally in each severity, so the class prior that makes a slice's soft counts equal is
known. Checked here: the counts come out equal, a per-class bias of the logits (what a corruption
adds) is undone exactly, blocks are balanced each on its own, and the flag travels from ensemble
to the CSV, the JSON, score, selftrain and the pipeline; balanced local suites hold each class
equally."""
import json

import numpy as np
import pandas as pd
import pytest

from competition import data, pipeline
from competition import ensemble as E
from competition import runs as R
from competition import score as S
from competition import selftrain
from competition.files import CompetitionError
from competition.specs import EnsembleSpec

from test_ensemble import K, OOD_ROWS, world  # noqa: F401  (the fixture)
from test_score import scored  # noqa: F401  (the fixture)


def slice_logits(n_per_class=60, classes=6, signal=1.5, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    z = np.eye(classes)[labels] * signal + rng.normal(size=(len(labels), classes))
    return z, labels


def test_counts_come_out_equal_and_rows_are_log_probabilities():
    z, labels = slice_logits()
    z[:, 0] += 2.0  # a corruption that makes class 0 look likely everywhere
    assert np.bincount(z.argmax(1), minlength=6)[0] > 150  # of 360: the plain argmax piles onto class 0
    b = R.balance_classes(z, slices=1)
    assert b.dtype == np.float32 and b.shape == z.shape
    np.testing.assert_allclose(np.exp(b).sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(np.exp(b).sum(0), 60, rtol=1e-3)  # soft counts: 360 rows / 6 classes
    counts = np.bincount(b.argmax(1), minlength=6)
    assert 45 <= counts.min() and counts.max() <= 75, counts  # hard counts near 60 (soft ones exactly)
    assert (b.argmax(1) == labels).mean() > (z.argmax(1) == labels).mean() + 0.1


def test_a_per_class_bias_is_undone_exactly():
    """Sinkhorn's answer depends on the logits only up to a bias per class, so any shift of the class
    prior a corruption causes gives the same balanced prediction."""
    z, _ = slice_logits(seed=1)
    bias = np.random.default_rng(2).normal(size=6) * 3
    np.testing.assert_allclose(R.balance_classes(z + bias, slices=1), R.balance_classes(z, slices=1), atol=2e-3)


def test_each_severity_is_balanced_on_its_own():
    blocks = [slice_logits(seed=s)[0] + np.eye(6)[s] * 3 for s in range(5)]  # another bias in each block
    together = R.balance_classes(np.concatenate(blocks))
    for s, z in enumerate(blocks):
        np.testing.assert_allclose(together[s * 360:(s + 1) * 360], R.balance_classes(z, slices=1), atol=1e-6)
    with pytest.raises(CompetitionError, match="not 5 equal blocks"):
        R.balance_classes(np.zeros((7, 3)))


def test_ensemble_balance_writes_balanced_labels_and_records_it(world):  # noqa: F811
    tmp, labels, ood, make = world
    runs = [make(f"a-f{f}-s0", f, 1.0, f) for f in range(K)]
    plain = E.build(runs, "plain", ood, tmp / "subs")
    csv = E.build(runs, "bal", ood, tmp / "subs", EnsembleSpec(balance=True))
    info = json.loads(csv.with_suffix(".json").read_text())
    assert info["balance"] is True and json.loads(plain.with_suffix(".json").read_text())["balance"] is False
    members, weights, _ = R.members_from_json(csv.with_suffix(".json"))
    want = np.concatenate([R.balance_classes(z).argmax(1) for _, z in R.ood_logits(members, weights, data.OodSet(ood))])
    got = pd.read_csv(csv)["label"].to_numpy()
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, pd.read_csv(plain)["label"].to_numpy())
    # the same runs and weights without --balance are another submission: not silently rewritten
    with pytest.raises(CompetitionError, match="holds another submission"):
        E.build(runs, "bal", ood, tmp / "subs")
    assert E.main([*map(str, runs), "--name", "bal", "--ood-dir", str(ood), "--out-dir", str(tmp / "subs"),
                   "--balance"]) == csv  # the same one again: unchanged


def test_score_reads_balance_from_the_json_and_notes_an_unequal_suite(scored, tmp_path, capsys):  # noqa: F811
    suite, run = scored
    spec = {"members": [{"name": "p-s0", "runs": [str(run)], "weight": 1.0, "setting": "flip"}], "balance": True}
    (tmp_path / "sub.json").write_text(json.dumps(spec))
    r = S.main([str(tmp_path / "sub.json"), "--ood-dir", str(suite)])[0]
    assert r["balance"] is True
    out = capsys.readouterr().out
    assert "holds its classes unequally" in out  # the fixture's 6 labels are not balanced
    assert "(leaderboard estimate, flip +balance)" in out
    assert "local_score_adapted" in json.loads((tmp_path / "sub.json").read_text())
    members, weights, _ = R.members_from_json(tmp_path / "sub.json")
    z = next(R.ood_logits(members, weights, data.OodSet(suite)))[1]
    want = (R.balance_classes(z).argmax(1) == np.tile(np.load(suite / "labels.npy"), 5)).reshape(5, -1).mean(1)
    np.testing.assert_allclose(r["table"][0], want, atol=1e-6)
    with pytest.raises(CompetitionError, match="--balance is for run folders"):
        S.score_target(tmp_path / "sub.json", suite, balance=True)
    run_result = S.score_target(run, suite, balance=True)
    assert run_result["balance"] is True
    assert any((R.RunDir(run).pred_dir("flip") / "ood").glob("*/score-balanced.json"))


def test_balanced_rows_hold_each_class_equally():
    labels = np.random.default_rng(0).integers(0, 4, 200)
    rows = data.sample_balanced(labels, 40, seed=3)
    assert np.array_equal(np.bincount(labels[rows]), [10] * 4) and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, data.sample_balanced(labels, 40, seed=3))
    assert not np.array_equal(rows, data.sample_balanced(labels, 40, seed=4))
    with pytest.raises(CompetitionError, match="multiple of the 4 classes"):
        data.sample_balanced(labels, 42, 0)
    with pytest.raises(CompetitionError, match="lower --n to at most"):
        data.sample_balanced(labels, 400, 0)


def test_a_balanced_suite_from_the_test_split(tmp_path):
    out = S.main(["suite", "--out", str(tmp_path / "s"), "--dataset", "digits", "--n", "30", "--names",
                  "brightness", "--workers", "1", "--balanced"])
    assert np.array_equal(np.bincount(np.load(out / "labels.npy")), [3] * 10)
    assert json.loads((out / "suite.json").read_text())["balanced"] is True


def test_selftrain_takes_balance_from_the_json_and_checks_its_type(tmp_path):
    spec = {"name": "x", "ood_dir": "d", "method": "caruana", "balance": True}
    selftrain.check_spec(spec, tmp_path / "x.json")
    with pytest.raises(CompetitionError, match="'balance' is \"yes\""):
        selftrain.check_spec({**spec, "balance": "yes"}, tmp_path / "x.json")
    with pytest.raises(CompetitionError, match="'rounds' is true"):
        selftrain.check_spec({**spec, "rounds": True}, tmp_path / "x.json")


def test_pipeline_balance_builds_a_balanced_suite_and_ensemble():
    plan, _ = pipeline.parse(["--balance"])
    cmds = {title.split(":")[0].split(" ->")[0]: argv for title, argv in pipeline.steps(plan)[0]}
    assert plan.suite.endswith("-bal") and plan.name.endswith("-bal")
    assert "--balanced" in cmds["local OOD suite"] and "--balance" in cmds["ensemble"]
    plain, _ = pipeline.parse([])
    assert not plain.balance and plain.name == "digits-demo-p12"
    assert not any("--balance" in a for _, a in pipeline.steps(plain)[0] if "ensemble" in a[0])
    # the competition's files hold each class equally: balanced by default there, --no-balance turns it off
    c100, _ = pipeline.parse(["--dataset", "cifar100"])
    assert c100.balance and c100.name == "cifar100-full-p123" and c100.suite.endswith("-bal")
    off, _ = pipeline.parse(["--dataset", "cifar100", "--no-balance"])
    assert not off.balance and off.name == "cifar100-full-p123-nobal"


def test_the_board_marks_a_balanced_submission(world):  # noqa: F811
    from competition import board

    tmp, labels, ood, make = world
    runs = [make(f"a-f{f}-s0", f, 1.0, f) for f in range(K)]
    for name, spec in (("p", EnsembleSpec()), ("b", EnsembleSpec(balance=True))):
        E.build(runs, name, ood, tmp / "subs", spec)
    rows = {n: board._submission_row(json.loads((tmp / f"subs/{n}.json").read_text()), tmp / f"subs/{n}.json")
            for n in "pb"}
    assert rows["b"]["settings"] == "flip +balance" and rows["p"]["settings"] == "flip"
