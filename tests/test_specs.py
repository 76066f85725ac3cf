"""Typed specs: every key of base.yaml in exactly one section of TrainSpec, a value of the wrong
type refused where the spec is made (and at load), naming the key; predict's and ensemble's
command lines read into one PredictSpec / EnsembleSpec each."""
import dataclasses
import re
import types
from pathlib import Path

import pytest

from competition import config as C
from competition import specs
from competition.files import CompetitionError

PKG = Path(specs.__file__).parent


def test_the_sections_partition_base_yaml():
    base = set(C.base_config())
    sections = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in specs.SECTIONS.items()}
    union = set().union(*sections.values())
    assert union == base, (sorted(base - union), sorted(union - base))  # exhaustive: no key without a section
    assert sum(len(keys) for keys in sections.values()) == len(union)  # disjoint: no key in two
    assert set(C.RULES) == base and C.RULES is specs.RULES  # the one table of types, derived from the fields


@pytest.mark.parametrize("preset", sorted(p.stem for p in C.CONFIG_DIR.glob("*.yaml") if p.stem != "base"))
def test_every_preset_loads_into_the_spec(preset):
    cfg = C.resolve(None, [preset])
    spec = specs.train_spec(cfg)
    for key, section in specs.SECTION_OF.items():
        assert getattr(getattr(spec, section), key) == cfg[key], key
    assert isinstance(spec.optim.lr, float) and isinstance(spec.loop.epochs, int)


def test_a_mistyped_value_is_refused_naming_the_key():
    cfg = C.resolve(1)
    with pytest.raises(CompetitionError, match=r"epochs='3'.*whole number"):
        specs.train_spec({**cfg, "epochs": "3"})
    with pytest.raises(CompetitionError, match=r"flip=1.*true or false"):
        specs.AugmentSpec.from_config({**cfg, "flip": 1})
    with pytest.raises(CompetitionError, match=r"optimizer='sgdd'.*one of sgd, adamw"):
        specs.train_spec(cfg).replace(optimizer="sgdd")
    # ... and at load, before any stage: a preset or override of the wrong type
    with pytest.raises(CompetitionError, match=r"epochs='3'"):
        C.load_config([], ["epochs='3'"])
    with pytest.raises(CompetitionError, match=r"lr=-0.1.*above 0"):
        C.resolve(2, None, ["lr=-0.1"])


def test_unknown_and_missing_keys_are_named():
    cfg = C.resolve(1)
    with pytest.raises(CompetitionError, match=r"weight_decy \(did you mean weight_decay\?\)"):
        specs.train_spec({**cfg, "weight_decy": 0.1})
    with pytest.raises(CompetitionError, match=r"lacks pretrained"):
        specs.train_spec({k: v for k, v in cfg.items() if k != "pretrained"})
    old = {k: v for k, v in cfg.items() if k != "eval_train"}  # a run saved before eval_train existed
    assert specs.train_spec(C.complete(old)).data.eval_train == C.base_config()["eval_train"]
    with pytest.raises(CompetitionError, match="epoch"):
        specs.train_spec(cfg).replace(epoch=3)


def test_specs_are_frozen_values_apart_from_the_dict():
    cfg = C.resolve(2, None, ["step_milestones=[3, 6]", "lr=1"])
    spec = specs.train_spec(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.optim.lr = 0.5
    assert spec.optim.lr == 1.0 and isinstance(spec.optim.lr, float)  # a whole number given for a float
    cfg["step_milestones"].append(9)
    assert spec.schedule.step_milestones == [3, 6]  # copied: the dict and the spec share nothing
    smaller = spec.replace(batch_size=64, flip=False)
    assert (smaller.optim.batch_size, smaller.augment.flip, spec.optim.batch_size) == (64, False, cfg["batch_size"])


def test_no_training_key_is_read_only_by_prediction():
    """The issue's rule: a training spec holds nothing only prediction reads. Every key predict.py
    reads from a run's config is also read by the training side."""
    read = re.compile(r"""cfg(?:\.get\(|\[)["'](\w+)["']""")
    predict_keys = set(read.findall((PKG / "predict.py").read_text())) & specs.KEYS
    assert predict_keys  # the scan sees predict's reads at all
    training = "".join((PKG / f"{m}.py").read_text() for m in ("train", "train_data", "learner", "models", "optim",
                                                               "augment", "batch_size", "runtime", "runs"))
    only_predict = {k for k in predict_keys if not re.search(rf"""\.{k}\b|["']{k}["']""", training)}
    assert not only_predict, f"training keys read only by prediction: {only_predict}"


def test_predict_and_ensemble_read_their_command_lines_into_one_spec(monkeypatch):
    from competition import ensemble, predict

    seen = []
    monkeypatch.setattr(predict, "expand_runs", lambda runs: [types.SimpleNamespace(path=r) for r in runs])
    monkeypatch.setattr(predict, "predict_run", lambda run, dirs, spec, **options: seen.append(spec))
    predict.main(["models/x", "--tta", "shift1", "--bn-adapt", "--tent-lr", "0.01", "--collapse-tol", "-1",
                  "--batch-size", "64"])
    predict.main(["models/x", "--adapt", "tent, eata", "--bn-adapt"])  # --adapt names them all
    assert seen == [specs.PredictSpec("shift1", adapts=("bn",), learn_lr=0.01, collapse_tol=None, batch_size=64),
                    specs.PredictSpec(adapts=("tent", "eata"))]
    assert seen[1].learn_args == {"steps": 1, "lr": 1e-3, "batch": 128, "guard": 0.1, "params": "bn", "ensemble": None,
                                  "disagree": 0.05}  # as predict.json records them
    monkeypatch.setattr(ensemble, "expand_runs", lambda runs: runs)
    monkeypatch.setattr(ensemble, "build", lambda runs, name, ood, out, spec, *a, **k: seen.append(spec))
    ensemble.main(["models/x", "--name", "n", "--tta", "flip", "--bn-adapt", "--fit-on", "clean", "--rounds", "9"])
    assert seen[-1] == specs.EnsembleSpec(rounds=9, tta="flip", adapt="bn", fit_on="clean")


@pytest.mark.parametrize("make, message", [
    (lambda: specs.PredictSpec(average="mean"), "--average must be logits or prob"),
    (lambda: specs.PredictSpec(bn_blend=1.5), "--bn-blend 1.5: must lie in 0..1"),
    (lambda: specs.PredictSpec(learn_steps=0), "--tent-steps 0"),
    (lambda: specs.EnsembleSpec(method="mean"), "--method must be one of caruana, equal"),
    (lambda: specs.EnsembleSpec(fit_on="test"), "--fit-on must be one of auto, clean, ood"),
])
def test_a_bad_prediction_or_ensemble_setting_fails_where_the_spec_is_made(make, message):
    with pytest.raises(CompetitionError, match=re.escape(message)):
        make()
