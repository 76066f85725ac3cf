"""Prediction: TTA views are the right pixels, TTA of a flip-invariant model changes nothing,
BN adaptation changes the statistics only while it lasts, and predict_run writes one logits file
per OOD file (rows = images) next to test and out-of-fold logits, then skips done work."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from competition import adapt as A
from competition import data
from competition import predict as P
from competition import tta as T
from competition.files import CompetitionError
from competition.runs import RunDir
from competition.specs import PredictSpec

CFG = {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 8, "channels_last": False, "num_classes": 4}


def images(n=6, size=8, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_parse_tta():
    assert T.parse_tta("none") == [(False, 0, 0)]
    assert T.parse_tta("flip") == [(False, 0, 0), (True, 0, 0)]
    assert len(T.parse_tta("shift1")) == 6 and len(T.parse_tta("shift2")) == 10
    assert T.parse_tta("id,flip,1:-2,f-1:1") == [(False, 0, 0), (True, 0, 0), (False, 1, -2), (True, -1, 1)]
    assert T.tta_name(T.parse_tta("shift1")) == "shift1"
    with pytest.raises(CompetitionError, match="cannot read view"):
        T.parse_tta("rotate")


def test_views_are_flips_and_reflect_shifts():
    x = images()
    assert torch.equal(T.apply_view(x, (True, 0, 0)), x.flip(2))
    shifted = T.apply_view(x, (False, 1, -1))  # out[r, c] = x[r + 1, c - 1], reflected at the borders
    assert torch.equal(shifted[:, :-1, 1:], x[:, 1:, :-1])
    assert torch.equal(shifted[:, -1, 1:], x[:, -2, :-1])  # row 8 reflects to row 6
    assert torch.equal(shifted[:, :-1, 0], x[:, 1:, 1])  # column -1 reflects to column 1


class FlipInvariant(nn.Module):
    """Averages the input and its mirror image before a linear layer: flips cannot change it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(((x + x.flip(-1)) / 2).flatten(1))


def test_tta_of_flip_invariant_model_equals_plain_prediction():
    torch.manual_seed(0)
    model, x = FlipInvariant().eval(), images()
    plain = T.tta_logits(model, x, CFG, T.parse_tta("none"))
    torch.testing.assert_close(T.tta_logits(model, x, CFG, T.parse_tta("flip")), plain)
    torch.testing.assert_close(T.tta_logits(model, x, CFG, T.parse_tta("flip"), "prob"), plain.log_softmax(1))
    assert not torch.allclose(T.tta_logits(model, x, CFG, T.parse_tta("shift1")), plain)  # shifts do act


def test_probability_averaging_is_log_mean_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    x = images()
    views = T.parse_tta("flip")
    per_view = [T.tta_logits(model, x, CFG, [v]).softmax(1) for v in views]
    out = T.tta_logits(model, x, CFG, views, "prob")
    torch.testing.assert_close(out.softmax(1), sum(per_view) / 2)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                         nn.LazyLinear(2)).eval()


def test_bn_adaptation_is_temporary():
    model = bn_model()
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    bn = model[1]
    bn.running_mean.fill_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifted = [torch.randn(16, 3, 8, 8) * 3 + 5 for _ in range(3)]
    with A.bn_source_stats(model):
        seen = A.adapt_bn(model, shifted)
        assert seen == 48 and not model.training and not bn.training and bn.momentum is None
        assert not torch.allclose(bn.running_mean, before["1.running_mean"])
        # the cumulative average over all batches, not the last batch's
        with torch.no_grad():
            feats = torch.cat([model[0](b) for b in shifted])
        torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
        adapted = model(shifted[0]).detach()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.momentum == 0.1 and not model.training
    assert not torch.allclose(model(shifted[0]), adapted)
    with A.bn_source_stats(model):  # blend 0 keeps the source statistics
        A.adapt_bn(model, shifted, blend=0.0)
        torch.testing.assert_close(bn.running_mean, before["1.running_mean"])


def test_bn_restored_after_an_error():
    model = bn_model()
    model(torch.randn(2, 3, 8, 8))
    before = model[1].running_var.clone()
    with pytest.raises(RuntimeError):
        with A.bn_source_stats(model):
            A.adapt_bn(model, [torch.randn(4, 3, 8, 8) * 9])
            raise RuntimeError("boom")
    assert torch.equal(model[1].running_var, before)


# ---------------------------------------------------------------------------- a real (tiny) run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from competition import train

    tmp = tmp_path_factory.mktemp("predict")
    run_dir = train.main(["--part", "1", "--preset", "demo", "epochs=1", "train_subset=96", f"models_dir={tmp}/models",
                          f"folds_dir={tmp}/folds", "model_args.widths=[8,8,8]", "model_args.hidden=8"])
    ood = tmp / "ood"
    ood.mkdir()
    rng = np.random.default_rng(0)
    for i, rows in enumerate((15, 15)):
        np.save(ood / f"distortion{i:02d}.npy", rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8))
    return run_dir, ood


def out(run_dir, ood, i, setting="flip"):
    """Where predict puts the logits of OOD file i under a setting (runs.RunDir owns the layout)."""
    oodset = data.OodSet(ood)
    return RunDir(run_dir).pred_dir(setting) / RunDir.ood_rel(oodset, oodset.files[i])


def test_predict_writes_logits_and_skips_done_work(run, monkeypatch):
    run_dir, ood = run
    status = P.predict_run(run_dir, [ood], PredictSpec("flip", batch_size=64))
    assert set(status.values()) == {"written"} and len(status) == 5  # test, oof, oof_ood, 2 OOD files
    # the corrupted held-out copies (the demo's ood_check=10): 19 corruptions x 5 severities x 10 images
    assert np.load(run_dir / "pred/flip/oof_ood.npy").shape == (19 * 5 * 10, 10)
    assert np.load(out(run_dir, ood, 0)).shape == (15, 10)
    assert np.load(out(run_dir, ood, 1)).shape == (15, 10)
    assert np.load(out(run_dir, ood, 1)).dtype == np.float16
    assert np.load(run_dir / "pred/flip/test.npy").shape == (360, 10)  # digits' test split
    assert np.load(run_dir / "test_labels.npy").shape == (360,)
    assert len(np.load(run_dir / "pred/flip/oof.npy")) == len(np.load(run_dir / "oof_index.npy"))
    assert RunDir(run_dir).ood_logits_paths(data.OodSet(ood), "flip") == [out(run_dir, ood, 0), out(run_dir, ood, 1)]

    # the same logits as predicting the images one batch in one go (order, gather, padding)
    model, cfg, data_cfg = RunDir(run_dir).load_model()
    x = torch.from_numpy(np.load(ood / "distortion01.npy"))
    want = T.tta_logits(model, x, data_cfg, T.parse_tta("flip")).numpy()
    np.testing.assert_allclose(np.load(out(run_dir, ood, 1)), want, atol=2e-2, rtol=1e-2)

    # done work is skipped: nothing is predicted again
    monkeypatch.setattr(T, "tta_logits", lambda *a, **k: pytest.fail("predicted again"))
    assert set(P.predict_run(run_dir, [ood], PredictSpec("flip")).values()) == {"skipped"}
    monkeypatch.undo()
    # outputs are keyed by the files' contents: a touched file, or the folder moved elsewhere, is
    # still the same data and reuses every prediction; changed bytes redo the folder's outputs
    os.utime(ood / "distortion00.npy", ns=(os.stat(ood / "distortion00.npy").st_mtime_ns + 10**9,) * 2)
    assert set(P.predict_run(run_dir, [ood], PredictSpec("flip"), test=False, oof=False).values()) == {"skipped"}
    moved = ood.parent / "elsewhere" / ood.name
    moved.parent.mkdir()
    ood.rename(moved)
    try:
        assert set(P.predict_run(run_dir, [moved], PredictSpec("flip"), test=False, oof=False).values()) == {"skipped"}
        assert RunDir(run_dir).ood_logits_paths(data.OodSet(moved), "flip") == [out(run_dir, moved, i) for i in (0, 1)]
    finally:
        moved.rename(ood)
    images = np.load(ood / "distortion00.npy")
    images[0, 0, 0] ^= 1
    np.save(ood / "distortion00.npy", images)
    status = P.predict_run(run_dir, [ood], PredictSpec("flip"), test=False, oof=False)
    assert [status[str(out(run_dir, ood, i))] for i in (0, 1)] == ["written", "written"]
    status = P.predict_run(run_dir, [ood], PredictSpec("flip"), test=False, oof=False, force=True)
    assert set(status.values()) == {"written"}


def test_another_tta_never_changes_the_first_ones_outputs(run):
    run_dir, ood = run
    P.predict_run(run_dir, [ood], PredictSpec("flip"), test=False)
    before = out(run_dir, ood, 0).read_bytes(), (run_dir / "pred/flip/oof.npy").read_bytes()
    P.predict_run(run_dir, [ood], PredictSpec("shift1"), test=False)
    assert (out(run_dir, ood, 0).read_bytes(), (run_dir / "pred/flip/oof.npy").read_bytes()) == before
    assert out(run_dir, ood, 0, "shift1").exists() and sorted(RunDir(run_dir).settings())[:2] == ["flip", "shift1"]


def test_default_tta_is_the_one_the_run_reported(run, monkeypatch):
    """Without --tta a run is predicted with its config's oof_tta (the TTA behind the held-out
    accuracy train.py printed), or flip when that is none."""
    run_dir, _ = run
    real = RunDir.load_model
    for oof_tta, want in (("shift1", "shift1"), ("none", "flip")):
        def load(*a, _tta=oof_tta, **k):
            model, cfg, data_cfg = real(*a, **k)
            return model, {**cfg, "oof_tta": _tta}, data_cfg
        monkeypatch.setattr(RunDir, "load_model", load)
        P.predict_run(run_dir, [], None, test=False, force=True)
        assert RunDir(run_dir).manifest(want)["oof.npy"]["tta"] == want


def test_stale_or_missing_ood_logits_are_a_clear_error(run, tmp_path):
    run_dir, ood = run
    P.predict_run(run_dir, [ood], PredictSpec("flip"), test=False, oof=False)
    images = np.load(ood / "distortion01.npy")
    np.save(ood / "distortion01.npy", 255 - images)  # new bytes behind the same name: no output is theirs
    try:
        with pytest.raises(CompetitionError, match="is missing.*competition.predict"):
            RunDir(run_dir).ood_logits_paths(data.OodSet(ood), "flip")
    finally:
        np.save(ood / "distortion01.npy", images)
    with pytest.raises(CompetitionError, match=r"pred/flip\+bn/ood/ood-\w+/distortion00.npy is missing.*--adapt bn"):
        RunDir(run_dir).ood_logits_paths(data.OodSet(ood), "flip+bn")


def test_bn_adapt_writes_a_separate_folder_and_leaves_the_model(run, tmp_path):
    run_dir, ood = run
    suite = tmp_path / "suite"  # a local suite: its own subfolder, never over the real files' logits
    suite.mkdir()
    np.save(suite / "distortion00.npy", np.load(ood / "distortion01.npy"))
    (suite / "corruptions.json").write_text(json.dumps({"names": {"distortion00.npy": "noise"}}))
    P.predict_run(run_dir, [ood], PredictSpec("none"), test=False, oof=False)
    before = out(run_dir, ood, 0, "none").read_bytes()
    P.predict_run(run_dir, [suite], PredictSpec("none", adapts=["bn"], bn_blend=0.5), test=False, oof=False)
    plain = np.load(out(run_dir, suite, 0, "none"))
    adapted = np.load(out(run_dir, suite, 0, "none+bn0.5"))
    assert plain.shape == adapted.shape == (15, 10) and not np.allclose(plain, adapted)
    assert out(run_dir, ood, 0, "none").read_bytes() == before
    rel = RunDir.ood_rel(data.OodSet(suite), data.OodSet(suite).files[0])
    assert RunDir(run_dir).manifest("none+bn0.5")[rel]["bn_blend"] == 0.5


# ---------------------------------------------------------------------------- TENT


@pytest.mark.parametrize("objective", A.OBJECTIVES)
def test_learned_adaptation_moves_only_bn_affine_and_restores_the_source_weights(objective):
    model = bn_model()
    model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        model[5].weight.mul_(30)  # confident predictions: EATA learns only from reliable (low-entropy) ones
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(16, 3, 8, 8) * 2 + 1 for _ in range(3)]
    seen = {}
    with A.source_weights(model):
        A.learn(model, lambda: iter(batches), objective, steps=2, lr=1e-1)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        seen["changed"] = changed
        assert not model.training
    # what moved: BN scale/shift (learned) and running statistics (re-estimated); no conv or linear weight
    assert {"1.weight", "1.bias"} <= seen["changed"]
    assert not any(k.startswith(("0.", "5.")) for k in seen["changed"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # back to the source weights after the slice
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_the_objectives_known_values():
    uniform, onehot = torch.zeros(4, 10), torch.eye(10)[:4] * 50
    assert A.slice_loss(uniform, "tent") == pytest.approx(np.log(10), rel=1e-5)
    assert A.slice_loss(onehot, "tent") == pytest.approx(0, abs=1e-5)
    # SHOT-IM: confident AND diverse is best; confident on one class for all is penalised
    same = torch.zeros(4, 10)
    same[:, 3] = 50
    assert A.slice_loss(onehot, "shot") == pytest.approx(-np.log(4), abs=1e-4)
    assert A.slice_loss(same, "shot") == pytest.approx(0, abs=1e-4)
    # EATA: unreliable predictions (entropy above 0.4 ln C) carry no weight
    assert A.slice_loss(uniform, "eata") == 0
    assert A.class_entropy(torch.tensor([1, 1, 1, 1]), 10) == 0
    assert A.class_entropy(torch.arange(10), 10) == pytest.approx(np.log(10))
    assert A.collapsed(torch.tensor([1, 1, 1, 2]), torch.tensor([0, 1, 2, 3]), 10)
    assert not A.collapsed(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]), 10)


@pytest.mark.parametrize("objective", A.OBJECTIVES)
def test_learned_slices_do_not_depend_on_their_order(run, objective):
    run_dir, _ = run
    model, cfg, data_cfg = RunDir(run_dir).load_model()
    from accelerate import Accelerator

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)  # 5 "severity" slices of 8
    pred = P.Predictor(model, data_cfg, Accelerator(cpu=True), T.parse_tta("flip"), batch_size=16)
    args = {"steps": 2, "lr": 1e-2, "batch": 4, "guard": None}
    whole = pred.predict_ood(images, objective, learn_args=args).astype(np.float32)
    last_alone, _ = pred.predict_learned(images, np.arange(32, 40), objective, **args)
    np.testing.assert_allclose(whole[32:], last_alone, atol=2e-2, rtol=1e-2)  # float16 storage of `whole`
    reordered = np.concatenate([images[32:], images[:32]])
    again = pred.predict_ood(reordered, objective, learn_args=args).astype(np.float32)
    np.testing.assert_allclose(again[:8], whole[32:], atol=2e-2, rtol=1e-2)
    if objective == "tent":
        plain = pred.predict_ood(images, "none").astype(np.float32)
        assert not np.allclose(whole, plain, atol=1e-2)  # it did adapt


@pytest.fixture(scope="module")
def guard_slice(run):
    """(Predictor of the module's run with flip TTA, one slice of 64 random images, its rows, BN
    adaptation's logits of it): the guards' tests share it, built once. Learned adaptation must
    leave the model's weights as they were (checked when the module ends)."""
    run_dir, _ = run
    model, cfg, data_cfg = RunDir(run_dir).load_model()
    from accelerate import Accelerator

    images = np.random.default_rng(2).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    pred = P.Predictor(model, data_cfg, Accelerator(cpu=True), T.parse_tta("flip"), batch_size=16)
    rows = np.arange(64)
    before = {k: v.clone() for k, v in pred.model.state_dict().items()}
    yield pred, images, rows, pred.predict_adapted(images, rows)
    assert all(torch.equal(v, before[k]) for k, v in pred.model.state_dict().items()), "learned adaptation changed the shared model"


def test_the_collapse_guard_falls_back_to_bn_on_a_slice_built_to_collapse(guard_slice):
    """Entropy minimisation at a huge learning rate drives a slice onto a few classes: the guard
    (no labels: the spread of predicted classes against BN's) keeps BN's logits for it."""
    pred, images, rows, bn = guard_slice
    wild = {"steps": 20, "lr": 5.0, "batch": 16}
    unguarded, fell = pred.predict_learned(images, rows, "tent", guard=None, disagree=None, **wild)
    assert not fell and A.collapsed(unguarded.argmax(1), bn.argmax(1), 10)  # it did collapse
    guarded, fell = pred.predict_learned(images, rows, "tent", guard=0.1, disagree=None, **wild)
    assert fell == "collapsed" and np.allclose(guarded, bn, atol=1e-5)
    _, fell = pred.predict_learned(images, rows, "tent", guard=0.1, **wild)  # both guards: collapse is named first
    assert fell == "collapsed"
    mild, fell = pred.predict_learned(images, rows, "tent", guard=0.1, steps=1, lr=1e-4, batch=16)
    assert not fell


@pytest.mark.parametrize("params", A.PARAMS)
def test_only_the_parameters_each_choice_names_learn(params):
    model = bn_model()
    model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        model[5].weight.mul_(30)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    claimed = {"bn": {"1.weight", "1.bias"}, "norm+head": {"1.weight", "1.bias", "5.weight", "5.bias"},
               "all": {n for n, _ in model.named_parameters()}}[params]
    assert {n for n, p in model.named_parameters() if any(p is q for q in A.learnable(model, params))} == claimed
    batches = [torch.randn(16, 3, 8, 8) * 2 + 1 for _ in range(3)]
    with A.source_weights(model):
        A.learn(model, lambda: iter(batches), "tent", steps=2, lr=1e-1, params=params)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= claimed  # every other parameter bit-identical while adapted
    assert {"bn": "1.weight", "norm+head": "5.weight", "all": "0.weight"}[params] in changed  # and the claim learned
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_classifier_is_timms_head_or_the_last_linear():
    from competition import models

    seq = bn_model()
    seq(torch.randn(2, 3, 8, 8))
    assert A.classifier(seq) is seq[5]
    net = models.build_model("resnet18", 3, channels=(4, 4, 4, 4))
    assert A.classifier(net) is net.get_classifier() is net.fc

    class Aux(nn.Module):  # the head registered before another Linear: get_classifier decides, not the order
        def __init__(self):
            super().__init__()
            self.head, self.aux = nn.Linear(4, 3), nn.Linear(4, 2)

        def get_classifier(self):
            return self.head

    aux = Aux()
    assert A.classifier(aux) is aux.head
    with pytest.raises(ValueError, match="no classifier"):
        A.classifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.parametrize("params", A.PARAMS)
def test_weight_ensembling_alpha_0_keeps_the_source_and_1_is_off(params):
    """ROID's ensembling, params <- alpha * params + (1 - alpha) * source after each update."""
    batches = [torch.randn(16, 3, 8, 8) * 2 + 1 for _ in range(3)]

    def learned(alpha):
        model = bn_model()
        model(torch.randn(2, 3, 8, 8))
        source = {n: p.detach().clone() for n, p in model.named_parameters()}
        with A.source_weights(model):
            A.learn(model, lambda: iter(batches), "tent", steps=2, lr=1e-1, params=params, ensemble_alpha=alpha)
            return source, {k: v.clone() for k, v in model.state_dict().items()}

    source, off = learned(None)
    _, one = learned(1.0)
    _, zero = learned(0.0)
    _, half = learned(0.5)
    assert all(torch.equal(one[k], off[k]) for k in off)  # alpha 1: exactly no ensembling
    assert all(torch.equal(zero[n], source[n]) for n in source)  # alpha 0: the source parameters exactly
    assert not torch.equal(half["1.weight"], off["1.weight"]) and not torch.equal(half["1.weight"], source["1.weight"])
    with pytest.raises(ValueError, match="must lie in 0..1"):
        learned(1.5)


def test_the_drift_guard_falls_back_to_bn_on_a_slice_built_to_drift(guard_slice):
    """SHOT-IM at a large learning rate keeps the class histogram (its diversity term) while
    rewriting most labels: the entropy guard cannot see it, the disagreement guard (no labels: BN's
    own predictions as reference) does, and it never fires on BN adaptation itself (alpha 0)."""
    pred, images, rows, bn = guard_slice
    wild = {"steps": 5, "lr": 0.3, "batch": 16}
    unguarded, why = pred.predict_learned(images, rows, "shot", guard=None, disagree=None, **wild)
    assert why is None and not A.collapsed(unguarded.argmax(1), bn.argmax(1), 10)  # no collapse to see
    assert A.disagreement(unguarded.argmax(1), bn.argmax(1)) > 0.3  # but it did drift
    guarded, why = pred.predict_learned(images, rows, "shot", guard=0.1, disagree=0.15, **wild)
    assert why == "drifted" and np.allclose(guarded, bn, atol=1e-5)
    itself, why = pred.predict_learned(images, rows, "shot", guard=0.1, disagree=0.0, ensemble=0.0, **wild)
    assert why is None and np.allclose(itself, bn, atol=1e-5)  # BN itself: nothing differs, nothing fires
    assert A.disagreement(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])) == 0.25
    assert A.drifted(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0]), 0.2)
    assert not A.drifted(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0]), 0.25)


def test_learned_slices_with_the_new_options_do_not_depend_on_their_order(run):
    run_dir, _ = run
    model, cfg, data_cfg = RunDir(run_dir).load_model()
    from accelerate import Accelerator

    images = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    pred = P.Predictor(model, data_cfg, Accelerator(cpu=True), T.parse_tta("flip"), batch_size=16)
    args = {"steps": 2, "lr": 1e-1, "batch": 4, "guard": 0.1, "params": "all", "ensemble": 0.9, "disagree": 0.15}
    whole = pred.predict_ood(images, "tent", learn_args=args).astype(np.float32)
    last_alone, _ = pred.predict_learned(images, np.arange(32, 40), "tent", **args)
    np.testing.assert_allclose(whole[32:], last_alone, atol=2e-2, rtol=1e-2)
    again = pred.predict_ood(np.concatenate([images[32:], images[:32]]), "tent", learn_args=args).astype(np.float32)
    np.testing.assert_allclose(again[:8], whole[32:], atol=2e-2, rtol=1e-2)
    assert pred.fallbacks[0] == 10 and pred.fallbacks[1] == sum(pred.fallback_reasons.values())


def test_learn_params_and_ensemble_are_in_predict_json_and_the_name_only_when_not_default(run):
    run_dir, ood = run
    common = [str(run_dir), "--ood-dir", str(ood), "--tta", "none", "--adapt", "tent", "--learn-batch", "16",
              "--no-test", "--no-oof"]
    P.main(common + ["--learn-params", "norm+head", "--learn-ensemble", "0.99", "--max-disagree", "0.2"])
    P.main(common)
    rel = RunDir.ood_rel(data.OodSet(ood), data.OodSet(ood).files[0])
    record = RunDir(run_dir).manifest("none+tent-norm_head-ens0.99")[rel]
    assert (record["adapt"], record["tent_params"], record["tent_ensemble"], record["tent_disagree"]) == \
        ("tent", "norm+head", 0.99, 0.2)
    default = RunDir(run_dir).manifest("none+tent")[rel]  # the defaults keep the folder's old name
    assert (default["tent_params"], default["tent_ensemble"], default["tent_disagree"]) == ("bn", None, A.MAX_DISAGREE)
    assert out(run_dir, ood, 0, "none+tent-norm_head-ens0.99").exists()
    with pytest.raises(CompetitionError, match="--learn-ensemble 1.5: must lie in 0..1"):
        PredictSpec(learn_ensemble=1.5)
    with pytest.raises(CompetitionError, match="--learn-params head"):
        P.predict_run(run_dir, [ood], PredictSpec(adapts=["tent"], learn_params="head"), test=False, oof=False)


def test_adapting_a_model_without_batch_norm_is_one_error(run, monkeypatch):
    run_dir, ood = run
    real = RunDir.load_model

    def no_bn(self, *a, **k):
        model, cfg, data_cfg = real(self, *a, **k)
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(10)), cfg, data_cfg

    monkeypatch.setattr(RunDir, "load_model", no_bn)
    with pytest.raises(CompetitionError, match="has no batch-norm layers, so --adapt tent has nothing to adapt"):
        P.predict_run(run_dir, [ood], PredictSpec(adapts=["tent"]), test=False)


def test_every_stage_knows_the_same_adaptations():
    from competition import ensemble

    assert P.ADAPTATIONS == ensemble.ADAPTATIONS == ("bn", *A.OBJECTIVES)


def test_one_folder_named_twice_is_predicted_once(run, monkeypatch):
    # the pipeline names its local suite twice (relative, and absolute as --ood-dir) when it is the target
    run_dir, ood = run
    jobs, real = [], P.execute
    monkeypatch.setattr(P, "execute", lambda run, cfg, predictor, todo, *a: jobs.append(len(todo)) or
                        real(run, cfg, predictor, todo, *a))
    P.predict_run(run_dir, [ood], PredictSpec("none"), test=False, oof=False, force=True)
    monkeypatch.chdir(ood.parent)
    P.predict_run(run_dir, [ood.resolve(), ood.name], PredictSpec("none"), test=False, oof=False, force=True)
    assert jobs[1] == jobs[0] > 0
