"""Models: every architecture runs forward and backward on a tiny batch (right shape, finite,
a gradient on every parameter); ResNet-50 loads a local ImageNet weights file with a new head;
progressive unfreezing opens the stages in order. 32x32 input throughout, so CPU-fast."""
import pytest
import torch

from competition import models as M
from competition.config import resolve
from competition.files import CompetitionError
from competition.specs import train_spec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 2 gain nothing from intra-op threads, and when another job shares the cores an
    OpenMP barrier waiting on a descheduled thread makes a 0.2 s ResNet-50 step take 7 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = {
    "simple_cnn": ("simple_cnn", {}),
    "simple_cnn-gelu-pool-first": ("simple_cnn", {"widths": [8, 16, 32, 32], "convs_per_block": 1,
                                                  "pool_first": True, "activation": "gelu", "head_grid": 2}),
    "resnet18-cifar": ("resnet18", {"stem": "cifar"}),
    "resnet18-imagenet": ("resnet18", {"stem": "imagenet"}),
    "resnet50": ("resnet50", {"pretrained": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_backward(case):
    torch.manual_seed(0)
    name, args = CASES[case]
    model = M.build_model(name, 7, **args).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 6])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    if args.get("activation") == "gelu":
        assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())


def test_resnet18_stems_differ():
    cifar, imagenet = M.resnet18(10, stem="cifar"), M.resnet18(10, stem="imagenet")
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    with pytest.raises(CompetitionError, match="stem"):
        M.resnet18(10, stem="tiny")


def test_build_model_errors():
    with pytest.raises(CompetitionError, match="unknown model 'vgg'"):
        M.build_model("vgg", 10)
    with pytest.raises(CompetitionError, match="bad model_args"):
        M.build_model("simple_cnn", 10, depth=3)
    with pytest.raises(CompetitionError, match="head_grid"):
        M.build_model("simple_cnn", 10, head_grid=0)
    with pytest.raises(CompetitionError, match="activation 'tanh'"):
        M.build_model("simple_cnn", 10, activation="tanh")


def test_model_from_config():
    spec = train_spec(resolve(2, None, ["model_args={stem: imagenet}"])).model
    model = M.model_from_config(spec, 5)
    assert model.fc.out_features == 5 and model.conv1.kernel_size == (7, 7)
    # a saved run's config (runs.RunDir.load_model), perhaps older than some keys: the same model
    model = M.model_from_config({"model": "resnet18", "model_args": {"stem": "imagenet"}}, 5)
    assert model.fc.out_features == 5 and model.conv1.kernel_size == (7, 7)


# ---------------------------------------------------------------------------- pretrained weights
@pytest.fixture(scope="module")
def imagenet_file(random_resnet50):
    """A random ResNet-50 with the 1000-class ImageNet head, saved as a plain state dict: what
    `torch.save(timm.create_model('resnet50', pretrained=True).state_dict(), path)` writes
    (conftest.py: the session's file, and the state dict read back from it)."""
    return random_resnet50, torch.load(random_resnet50)


def test_resnet50_loads_local_weights_with_a_new_head(imagenet_file):
    path, sd = imagenet_file
    model = M.resnet50(10, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.layer3[2].conv2.weight, sd["layer3.2.conv2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[0].bn1.running_var, sd["layer4.0.bn1.running_var"], rtol=0, atol=0)
    assert model.fc.out_features == 10 and model.fc.weight.shape == (10, 2048)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # through the config path too
    cfg = {"model": "resnet50", "model_args": {}, "pretrained": True, "weights": str(path)}
    torch.testing.assert_close(M.model_from_config(cfg, 3).conv1.weight, sd["conv1.weight"], rtol=0, atol=0)


def test_resnet50_bad_weights_files(tmp_path):
    with pytest.raises(CompetitionError, match="missing.pth"):
        M.resnet50(10, weights=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a state dict" * 100)
    with pytest.raises(CompetitionError, match="garbage.pth"):
        M.resnet50(10, weights=str(garbage))
    wrong = tmp_path / "resnet18.pth"
    torch.save(M.resnet18(1000, stem="imagenet").state_dict(), wrong)
    with pytest.raises(CompetitionError, match="resnet18.pth"):
        M.resnet50(10, weights=str(wrong))


# ---------------------------------------------------------------------------- progressive unfreezing
SCHEDULE = {0: ["head"], 1: ["layer4"], 2: ["layer3"], 3: ["all"]}


@pytest.fixture(scope="module")
def resnet50():
    return M.resnet50(10)


@pytest.mark.parametrize("schedule", [SCHEDULE, {str(k): v for k, v in SCHEDULE.items()}], ids=["int", "str"])
def test_progressive_unfreezing(resnet50, schedule):
    def open_stages(epoch):
        M.set_trainable(resnet50, M.unfrozen_prefixes(schedule, epoch))
        return {n.split(".")[0] for n, p in resnet50.named_parameters() if p.requires_grad}

    all_params = len(list(resnet50.parameters()))
    assert open_stages(0) == {"fc"}
    assert M.set_trainable(resnet50, M.unfrozen_prefixes(schedule, 0)) == 2  # fc weight and bias
    assert open_stages(1) == {"fc", "layer4"}
    assert open_stages(2) == {"fc", "layer4", "layer3"}
    assert open_stages(3) == {"fc", "layer4", "layer3", "layer2", "layer1", "conv1", "bn1"}
    assert M.set_trainable(resnet50, M.unfrozen_prefixes(schedule, 9)) == all_params
    assert M.unfrozen_prefixes(schedule, 3) is None


def test_no_schedule_trains_everything(resnet50):
    assert M.unfrozen_prefixes(None, 0) is None and M.unfrozen_prefixes({}, 5) is None
    M.set_trainable(resnet50, ["fc"])
    assert M.set_trainable(resnet50, None) == len(list(resnet50.parameters()))


def test_frozen_stages_get_no_gradient(resnet50):
    M.set_trainable(resnet50, M.unfrozen_prefixes(SCHEDULE, 1))
    resnet50(torch.randn(2, 3, 32, 32)).sum().backward()
    assert resnet50.fc.weight.grad is not None and resnet50.layer4[0].conv1.weight.grad is not None
    assert resnet50.layer3[0].conv1.weight.grad is None and resnet50.conv1.weight.grad is None
    resnet50.zero_grad(set_to_none=True)
    M.set_trainable(resnet50, None)


def test_prefix_matches_whole_module_names():
    model = torch.nn.ModuleDict({"layer1": torch.nn.Linear(2, 2), "layer10": torch.nn.Linear(2, 2)})
    assert M.set_trainable(model, ["layer1"]) == 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"layer1.weight", "layer1.bias"}
