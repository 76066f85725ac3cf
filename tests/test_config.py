"""Configs: base.yaml <- presets (by name or path, with `extends:`) <- key=value overrides;
unknown keys are errors, so a typo never trains silently with a default."""
import pytest
import yaml

from competition import config as C
from competition.files import CompetitionError


def write(path, text):
    path.write_text(text)
    return str(path)


def test_base_defaults():
    cfg = C.load_config()
    assert cfg == C.read_yaml(C.CONFIG_DIR / "base.yaml")
    assert cfg["model"] == "simple_cnn" and cfg["model_args"] == {} and cfg["lr"] == 0.1


@pytest.mark.parametrize("preset", sorted(p.stem for p in C.CONFIG_DIR.glob("*.yaml") if p.stem != "base"))
def test_every_shipped_preset_loads(preset):
    cfg = C.load_config([preset])
    assert set(cfg) == set(C.load_config())  # presets set known keys only


def test_preset_and_overrides_in_order(tmp_path):
    a = write(tmp_path / "a.yaml", "model: resnet18\nmodel_args: {stem: cifar}\nlr: 0.2\nepochs: 40\n")
    b = write(tmp_path / "b.yaml", "epochs: 3\n")
    cfg = C.load_config([a, b], ["lr=0.05", "model_args.stem=imagenet", "unfreeze={0: [head], 2: [all]}",
                                 "weights=", "name=my-run"])
    assert cfg["model"] == "resnet18"
    assert cfg["epochs"] == 3  # later preset wins
    assert cfg["lr"] == 0.05 and isinstance(cfg["lr"], float)  # override wins, parsed as YAML
    assert cfg["model_args"] == {"stem": "imagenet"}
    assert cfg["unfreeze"] == {0: ["head"], 2: ["all"]}
    assert cfg["weights"] is None and cfg["name"] == "my-run"
    assert cfg["batch_size"] == C.load_config()["batch_size"]  # untouched keys keep the default


def test_dotted_override_adds_to_a_mapping(tmp_path):
    cfg = C.load_config([], ["model_args.widths=[32, 64]", "model_args.hidden=128"])
    assert cfg["model_args"] == {"widths": [32, 64], "hidden": 128}
    assert C.load_config()["model_args"] == {}  # nothing leaks into the next load


@pytest.mark.parametrize("text, value", [("lr=1e-3", 0.001), ("lr=5.0e-4", 0.0005), ("min_lr=2E-6", 2e-6),
                                         ("epochs=12", 12), ("flip=false", False), ("ema=null", None),
                                         ("mixed_precision=no", "no"), ("flip=True", True)])
def test_override_values_are_typed(text, value):
    got = C.load_config([], [text])[text.split("=")[0]]
    assert got == value and type(got) is type(value)  # lr=1e-3 is a float, not the string '1e-3'


def test_yes_and_no_are_words_not_booleans(tmp_path):
    """YAML 1.1 reads no/yes/on/off as booleans: the documented mixed_precision=no was refused as
    'must be a text'. Only true/false are booleans, and a flag given yes is one clear error."""
    assert C.load_config([write(tmp_path / "p.yaml", "mixed_precision: no\n")])["mixed_precision"] == "no"
    with pytest.raises(CompetitionError, match="flip.*must be true or false"):
        C.validate(C.load_config([], ["flip=yes"]))


def test_exponent_floats_in_preset_files(tmp_path):
    cfg = C.load_config([write(tmp_path / "p.yaml", "lr: 3e-4\nwarmup_lr: 1.0e-6\n")])
    assert cfg["lr"] == 3e-4 and isinstance(cfg["lr"], float) and cfg["warmup_lr"] == 1e-6


def test_unknown_keys_rejected(tmp_path):
    with pytest.raises(CompetitionError, match="learning_rate"):
        C.load_config([], ["learning_rate=0.1"])
    with pytest.raises(CompetitionError, match="epoch"):
        C.load_config([write(tmp_path / "typo.yaml", "epoch: 5\n")])
    with pytest.raises(CompetitionError, match="not a mapping"):
        C.load_config([], ["lr.head=0.1"])
    with pytest.raises(CompetitionError, match="key=value"):
        C.load_config([], ["lr"])


def test_a_typo_names_the_closest_key_and_a_prediction_setting_where_it_belongs(tmp_path):
    with pytest.raises(CompetitionError, match=r"weight_decy \(did you mean weight_decay\?\)"):
        C.load_config([], ["weight_decy=0.1"])
    with pytest.raises(CompetitionError, match=r"epoch \(did you mean epochs\?\)"):
        C.load_config([write(tmp_path / "typo.yaml", "epoch: 5\n")])
    with pytest.raises(CompetitionError, match=r"bn_adapt is a prediction setting.*competition.predict RUN --adapt bn"):
        C.load_config([], ["bn_adapt=true"])
    # A run saved when bn_adapt was a training key still counts as the same run.
    assert C.comparable({**C.base_config(), "bn_adapt": False}) == C.comparable(C.base_config())


def test_data_derived_keys_are_not_config_keys():
    # num_classes, mean/std... are decided by the data (train's data config, data_config.yaml), not
    # by the user: setting them would be silently ignored, so it is an error.
    for key in ("num_classes=10", "mean=[0.5,0.5,0.5]", "run_dir=models/x"):
        with pytest.raises(CompetitionError, match="unknown config key"):
            C.load_config([], [key])


def test_extends(tmp_path):
    parent = write(tmp_path / "parent.yaml", "model: resnet50\nlr: 0.05\nmodel_args: {pretrained: false}\n"
                                             "unfreeze: {0: [head], 1: [layer4], 3: [all]}\n")
    write(tmp_path / "child.yaml", f"extends: {parent}\nlr: 0.01\nunfreeze: {{0: [all]}}\n")
    cfg = C.load_config([str(tmp_path / "child.yaml")])
    assert "extends" not in cfg
    assert cfg["model"] == "resnet50" and cfg["model_args"] == {"pretrained": False}  # from the parent
    assert cfg["lr"] == 0.01  # the child wins
    assert cfg["unfreeze"] == {0: ["all"]}  # a schedule is replaced whole, not merged stage by stage


def test_extends_a_sibling_file_and_a_shipped_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # a relative `extends:` is found next to the child, not from cwd
    (tmp_path / "exp").mkdir()
    write(tmp_path / "exp" / "mid.yaml", "extends: base\nepochs: 7\n")
    write(tmp_path / "exp" / "leaf.yaml", "extends: mid.yaml\nbatch_size: 32\n")
    cfg = C.load_config([str(tmp_path / "exp" / "leaf.yaml")])
    assert (cfg["epochs"], cfg["batch_size"]) == (7, 32)


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path / "x.yaml", f"extends: {tmp_path / 'y.yaml'}\n")
    write(tmp_path / "y.yaml", f"extends: {tmp_path / 'x.yaml'}\n")
    with pytest.raises(CompetitionError, match="extends itself"):
        C.load_config([str(tmp_path / "x.yaml")])
    write(tmp_path / "orphan.yaml", "extends: no_such_preset\n")
    with pytest.raises(CompetitionError, match="no_such_preset"):
        C.load_config([str(tmp_path / "orphan.yaml")])


def test_by_part_applies_to_the_chosen_part_only(tmp_path):
    generic = write(tmp_path / "tiny.yaml", "epochs: 2\nby_part:\n  2: {lr: 0.5, model_args: {stem: cifar}}\n")
    part2 = write(tmp_path / "p2.yaml", "part: 2\nmodel: resnet18\nlr: 0.2\n")
    cfg = C.load_config([part2, generic], ["epochs=3"])
    assert (cfg["lr"], cfg["model_args"], cfg["epochs"]) == (0.5, {"stem": "cifar"}, 3)
    assert "by_part" not in cfg
    cfg = C.load_config([generic])  # part 1: the part-2 table does not apply
    assert cfg["lr"] == 0.1 and cfg["model_args"] == {}


def test_bad_preset_files(tmp_path):
    with pytest.raises(CompetitionError, match="no preset 'nope'"):
        C.load_config(["nope"])
    with pytest.raises(CompetitionError, match="bad.yaml"):
        C.load_config([write(tmp_path / "bad.yaml", "lr: [0.1\n")])
    with pytest.raises(CompetitionError, match="list.yaml"):
        C.load_config([write(tmp_path / "list.yaml", "- lr\n- 0.1\n")])


def test_save_config_round_trip(tmp_path):
    cfg = C.load_config([], ["lr=1e-3", "model_args.stem=imagenet", "unfreeze={0: [head], 3: [all]}"])
    C.save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == cfg
    assert C.read_yaml(tmp_path / "run" / "config.yaml") == cfg


@pytest.mark.parametrize("text, problem", [("lr=[1,", "not valid YAML"), ("=3", "no key"), (".x=3", "no key")])
def test_a_malformed_override_is_one_error(text, problem):
    from competition.config import parse_override
    from competition.files import CompetitionError

    with pytest.raises(CompetitionError, match=problem):
        parse_override(text)
