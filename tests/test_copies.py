"""One prediction per picture from all its copies (ensemble --copies): the OOD files hold the same
pictures in every file and severity, and where they keep one order, row i of every cell is one
picture. Checked here: signatures ignore brightness and contrast; copies are linked when the cells
share an order and never when they do not (whole files shuffled apart, every cell shuffled, too
few rows); every linked row gets the mean of its copies' probabilities and an unlinked cell keeps
its own; the flag travels from ensemble to the CSV, the JSON, score, the board, selftrain and the
pipeline."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from competition import copies, data, pipeline, selftrain
from competition import ensemble as E
from competition import runs as R
from competition import score as S
from competition.files import CompetitionError
from competition.metrics import softmax
from competition.specs import EnsembleSpec

N, C, FILES = 120, 4, 3  # pictures per cell (>= copies.MIN_ROWS), classes, OOD files


def pictures(n=N, seed=0):
    """Smooth random pictures: 4 x 4 colour grids blown up to 32 x 32, as CIFAR's are mostly low-frequency."""
    grid = np.random.default_rng(seed).uniform(30, 220, size=(n, 4, 4, 3))
    return np.kron(grid, np.ones((1, 8, 8, 1)))


def corrupted(x, kind, severity, seed):
    rng = np.random.default_rng(seed)
    if kind == 0:  # brightness and contrast
        y = x * (1 - 0.1 * severity) + 12 * severity
    elif kind == 1:  # noise
        y = x + rng.normal(0, 8 * severity, x.shape)
    else:  # a coarse blur: 2 x 2 block means
        y = x.reshape(len(x), 16, 2, 16, 2, 3).mean((2, 4)).repeat(2, 1).repeat(2, 2) + severity
    return np.clip(y, 0, 255).astype(np.uint8)


def write_suite(folder, order=None, n=N):
    """FILES files of 5 severities of the same pictures; `order(file, severity)` -> a row permutation."""
    x, folder = pictures(n), folder
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(FILES):
        cells = [corrupted(x, f, s + 1, 10 * f + s) for s in range(5)]
        if order is not None:
            cells = [c[order(f, s)] for s, c in enumerate(cells)]
        np.save(folder / f"distortion{f:02d}.npy", np.concatenate(cells))
    return data.OodSet(folder)


def test_signatures_ignore_brightness_and_contrast():
    x = pictures(5)
    a = copies.signatures(x.astype(np.uint8))
    b = copies.signatures(np.clip(x * 0.5 + 40, 0, 255).astype(np.uint8))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=0.02)  # rounding to uint8 only
    assert not copies.signatures(np.full((2, 32, 32, 3), 77, np.uint8)).any()  # flat: correlates with nothing
    assert copies.signatures(np.zeros((3, 6, 6), np.uint8)).shape == (3, 36)  # smaller than the grid: every pixel


def test_copies_are_linked_when_the_cells_share_an_order_and_only_then(tmp_path):
    found = copies.find(write_suite(tmp_path / "aligned"))
    assert found.groups == [list(range(FILES * 5))] and "15 of 15" in found.words()
    # each file shuffled on its own (its 5 severities in one order): three groups of 5, never across files
    perms = [np.random.default_rng(f).permutation(N) for f in range(FILES)]
    found = copies.find(write_suite(tmp_path / "files", lambda f, s: perms[f]))
    assert found.groups == [list(range(5 * f, 5 * f + 5)) for f in range(FILES)]
    # every cell in its own order: nothing, and said so
    found = copies.find(write_suite(tmp_path / "cells", lambda f, s: np.random.default_rng(9 + 5 * f + s).permutation(N)))
    assert found.groups == [] and "different orders" in found.words()
    found = copies.find(write_suite(tmp_path / "few", n=copies.MIN_ROWS - 1))
    assert found.groups == [] and "too few rows" in found.words()


def test_groups_are_connected_components():
    links = np.zeros((6, 6), bool)
    for a, b in ((0, 1), (1, 2), (4, 5)):
        links[a, b] = links[b, a] = True
    assert copies.groups_of(links) == [[0, 1, 2], [4, 5]]


@pytest.fixture
def world(tmp_path):
    """Two fake runs (folds 0 and 1 of a folds CSV) with logits for an aligned suite of FILES x 5 x N."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, 200)
    fold = np.arange(200) % 2
    (tmp_path / "folds").mkdir()
    pd.DataFrame({"index": np.arange(200), "label": labels, "fold": fold}).to_csv(tmp_path / "folds/digits.csv",
                                                                                   index=False)
    ood = write_suite(tmp_path / "ood")
    truth = rng.integers(0, C, N)
    np.save(tmp_path / "ood/labels.npy", truth)
    (tmp_path / "ood/corruptions.json").write_text(json.dumps({"names": {
        f"distortion{f:02d}.npy": name for f, name in enumerate(("brightness", "gaussian_noise", "pixelate"))}}))
    (tmp_path / "ood/suite.json").write_text(json.dumps({"dataset": "digits", "split": "test", "n": N}))
    ood = data.OodSet(tmp_path / "ood")
    runs = []
    for f in range(2):
        r = np.random.default_rng(f)
        run = tmp_path / "models" / f"a-f{f}-s0"
        run.mkdir(parents=True)
        (run / "best.pt").write_bytes(b"")
        (run / "summary.json").write_text("{}")
        (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "digits", "data": None, "fold": f,
                                                         "folds_dir": str(tmp_path / "folds")}))
        (run / "data_config.yaml").write_text(yaml.safe_dump({"num_classes": C}))
        idx = np.flatnonzero(fold == f)
        np.save(run / "oof_index.npy", idx)
        rd = R.RunDir(run)
        weights = rd.weights_hash()
        rd.write_output("flip", "oof.npy", (np.eye(C)[labels[idx]] + r.normal(size=(len(idx), C))).astype(np.float32),
                        {"tta": "flip", "weights": weights})
        rd.save_test("flip", r.normal(size=(20, C)).astype(np.float32), np.arange(20) % C, {"weights": weights})
        for src in ood.files:  # right more often than not, and noisier at higher severity
            z = np.concatenate([np.eye(C)[truth] * 1.2 + r.normal(size=(N, C)) * (0.6 + 0.3 * s) for s in range(5)])
            rd.write_output("flip", R.RunDir.ood_rel(ood, src), z.astype(np.float16),
                            {"source": R.source_stamp(src), "weights": weights, "ood_files": FILES})
        runs.append(run)
    return tmp_path, runs, ood


def cells(z_files):
    """(files * 5, N, C) from the per-file (5N, C) logits ood_logits yields."""
    return np.concatenate([np.asarray(z).reshape(5, N, -1) for _, z in z_files])


def test_every_copy_gets_the_mean_of_its_copies_probabilities(world):
    tmp, runs, ood = world
    members, weights = R.group_members([R.RunDir(r) for r in runs], "flip"), np.ones(1)
    own = cells(R.ood_logits(members, weights, ood))
    shared = cells(R.ood_logits(members, weights, ood, copies=True))
    want = np.log(softmax(own.reshape(-1, C)).reshape(own.shape).mean(0))
    np.testing.assert_allclose(shared, np.broadcast_to(want, shared.shape), atol=1e-5)
    truth = ood.labels
    assert (shared.argmax(2) == truth).mean() > (own.argmax(2) == truth).mean() + 0.05
    # balanced first, then shared: the mean of the balanced cells' probabilities
    both = cells(R.ood_logits(members, weights, ood, balance=True, copies=True))
    bal = cells(R.ood_logits(members, weights, ood, balance=True))
    np.testing.assert_allclose(both[0], np.log(np.exp(bal).mean(0)), atol=1e-5)


def test_an_unlinked_cell_keeps_its_own_predictions(world, monkeypatch):
    tmp, runs, ood = world
    members, weights = R.group_members([R.RunDir(r) for r in runs], "flip"), np.ones(1)
    found = copies.find(ood)
    found.groups = [list(range(5, 15))]  # as if file 0 were in another order
    monkeypatch.setattr(R, "find_copies", lambda o: found)
    own = cells(R.ood_logits(members, weights, ood))
    shared = cells(R.ood_logits(members, weights, ood, copies=True))
    np.testing.assert_allclose(shared[:5], own[:5], atol=1e-6)
    assert np.allclose(shared[5], shared[14]) and not np.allclose(shared[0], shared[5])


def test_ensemble_copies_writes_one_label_per_picture_and_records_it(world, capsys):
    tmp, runs, ood = world
    plain = E.build(runs, "plain", ood.path, tmp / "subs")
    csv = E.build(runs, "cp", ood.path, tmp / "subs", EnsembleSpec(copies=True))
    info = json.loads(csv.with_suffix(".json").read_text())
    assert info["copies"] is True and info["copies_found"]["linked_cells"] == 15
    assert json.loads(plain.with_suffix(".json").read_text())["copies"] is False
    assert "15 of 15 file-severity cells" in capsys.readouterr().out
    got = pd.read_csv(csv)["label"].to_numpy().reshape(15, N)
    assert (got == got[0]).all()  # every copy of a picture: one label
    with pytest.raises(CompetitionError, match="holds another submission"):
        E.build(runs, "cp", ood.path, tmp / "subs")  # the same runs without --copies: another submission
    # score reads it from the JSON, and refuses to be told otherwise
    r = S.main([str(csv.with_suffix(".json")), "--ood-dir", str(ood.path)])[0]
    assert r["copies"] is True and "+copies)" in capsys.readouterr().out
    assert r["ood_accuracy"] == pytest.approx((got == ood.labels).mean())
    with pytest.raises(CompetitionError, match="--copies is for run folders"):
        S.score_target(csv.with_suffix(".json"), ood.path, copies=True)
    run_result = S.score_target(runs[0], ood.path, copies=True)
    assert run_result["copies"] is True
    assert any((R.RunDir(runs[0]).pred_dir("flip") / "ood").glob("*/score-copies.json"))
    # the board marks it
    from competition import board
    row = board._submission_row(info, csv.with_suffix(".json"))
    assert row["settings"] == "flip +copies"


def test_selftrain_takes_copies_from_the_json_and_checks_its_type(tmp_path):
    spec = {"name": "x", "ood_dir": "d", "method": "caruana", "copies": True}
    selftrain.check_spec(spec, tmp_path / "x.json")
    with pytest.raises(CompetitionError, match="'copies' is \"yes\""):
        selftrain.check_spec({**spec, "copies": "yes"}, tmp_path / "x.json")
    with pytest.raises(CompetitionError, match="copies 1: must be true or false"):
        EnsembleSpec(copies=1)


def test_pipeline_copies_on_for_the_competition_and_off_elsewhere():
    c100, _ = pipeline.parse(["--dataset", "cifar100"])
    cmds = {title.split(":")[0].split(" ->")[0]: argv for title, argv in pipeline.steps(c100)[0]}
    assert c100.copies and c100.name == "cifar100-full-p123" and "--copies" in cmds["ensemble"]
    off, _ = pipeline.parse(["--dataset", "cifar100", "--no-copies"])
    assert not off.copies and off.name == "cifar100-full-p123-nocp"
    demo, _ = pipeline.parse([])
    assert not demo.copies and demo.name == "digits-demo-p12"
    assert not any("--copies" in a for _, a in pipeline.steps(demo)[0])
    on, _ = pipeline.parse(["--copies", "--balance"])
    assert on.name == "digits-demo-p12-bal-cp"


def test_the_order_of_the_files_changes_no_prediction():
    """Episodic in the issue's sense: a picture's consensus is a mean over its copies, so which file or
    severity comes first cannot change it (the copies' order in the mean is irrelevant)."""
    probs = softmax(np.random.default_rng(0).normal(size=(15 * N, C))).reshape(15, N, C)
    order = np.random.default_rng(1).permutation(15)
    np.testing.assert_allclose(copies.consensus(probs[order]), copies.consensus(probs), atol=1e-6)
    np.testing.assert_allclose(np.exp(copies.consensus(probs)), probs.mean(0), atol=1e-6)


def test_a_submission_whose_files_held_no_copies_is_scored_without_them(world, capsys):
    """The suite is in one order by construction; the competition's files might not be. Scored on the
    suite, a submission is scored as it was made on its own files."""
    tmp, runs, ood = world
    csv = E.build(runs, "cp", ood.path, tmp / "subs", EnsembleSpec(copies=True))
    spec = json.loads(csv.with_suffix(".json").read_text())
    elsewhere = {**spec, "ood_dir": str(tmp / "real"), "copies_found": {**spec["copies_found"], "linked_cells": 0}}
    (tmp / "subs/elsewhere.json").write_text(json.dumps(elsewhere))
    r = S.score_target(tmp / "subs/elsewhere.json", ood.path)
    assert r["copies"] is False and "found no copies in its own files" in capsys.readouterr().out
    plain = S.score_target(E.build(runs, "plain", ood.path, tmp / "subs").with_suffix(".json"), ood.path)
    assert r["ood_accuracy"] == pytest.approx(plain["ood_accuracy"])
    partly = {**elsewhere, "copies_found": {**spec["copies_found"], "linked_cells": 10}}
    (tmp / "subs/partly.json").write_text(json.dumps(partly))
    assert S.score_target(tmp / "subs/partly.json", ood.path)["copies"] is True
    assert "linked only 10 of 15" in capsys.readouterr().out
