"""MobileNets of the studies: v1 and v2 run forward and backward at 32x32 with every batch-norm
variant and activation; ghost BN with a ghost batch as big as the batch IS BatchNorm2d (outputs,
gradients, running statistics), and with smaller ghosts normalises each chunk by itself; inference
example weighting reduces to BN at weight 0 and blends in each image's own statistics otherwise."""
import pytest
import torch
from torch import nn

from competition import mobilenets as MN
from competition import models as M
from competition.files import CompetitionError

CASES = {
    "v1": ("mobilenet_v1", {"width": 0.25}),
    "v1-sigmoid": ("mobilenet_v1", {"width": 0.25, "activation": "sigmoid"}),
    "v1-ghost": ("mobilenet_v1", {"width": 0.25, "bn": "ghost", "ghost_batch_size": 2}),
    "v1-iew": ("mobilenet_v1", {"width": 0.25, "bn": "iew", "iew_weight": 0.25}),
    "v2": ("mobilenet_v2", {"width": 0.25}),
    "v2-relu-ghost": ("mobilenet_v2", {"width": 0.25, "activation": "relu", "bn": "ghost", "ghost_batch_size": 2}),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_backward(case):
    torch.manual_seed(0)
    name, args = CASES[case]
    model = M.build_model(name, 7, **args).train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 6, 1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing[:5]}"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(3, 3, 32, 32))).all()


def test_layouts_for_32x32():
    v1 = MN.mobilenet_v1(10)
    assert v1.stem[0].stride == (1, 1)
    assert v1.blocks(v1.stem(torch.zeros(1, 3, 32, 32))).shape[-2:] == (2, 2)  # 4 halvings, not 5
    assert sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in v1.modules()) == 13  # depthwise convs
    assert v1.fc.in_features == 1024
    v2 = MN.mobilenet_v2(10)
    assert v2.features[0][0].stride == (1, 1)
    assert v2.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    narrow = sum(p.numel() for p in MN.mobilenet_v1(10, width=0.25).parameters())
    assert narrow < sum(p.numel() for p in v1.parameters()) / 8


def test_options_reach_every_layer():
    v1 = MN.mobilenet_v1(10, width=0.25, activation="sigmoid", bn="ghost", ghost_batch_size=16)
    assert not any(isinstance(m, nn.ReLU) for m in v1.modules())
    bns = [m for m in v1.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 27 and all(isinstance(m, MN.GhostBatchNorm2d) and m.ghost_batch_size == 16 for m in bns)
    v2 = MN.mobilenet_v2(10, width=0.25, activation="silu", bn="iew", iew_weight=0.1)
    assert not any(isinstance(m, nn.ReLU6) for m in v2.modules()) and any(isinstance(m, nn.SiLU) for m in v2.modules())
    assert all(isinstance(m, MN.IEWBatchNorm2d) for m in v2.modules() if isinstance(m, nn.BatchNorm2d))
    for bad in ({"bn": "layernorm"}, {"activation": "softplus2"}):
        with pytest.raises(CompetitionError):
            MN.mobilenet_v1(10, **bad)


def _pair(cls, **kwargs):
    torch.manual_seed(0)
    plain, other = nn.BatchNorm2d(5), cls(5, **kwargs)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5), plain.bias.uniform_(-0.5, 0.5)
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_ghost_bn_with_ghost_size_equal_to_batch_is_batchnorm():
    plain, ghost = _pair(MN.GhostBatchNorm2d, ghost_batch_size=8)
    for step in range(3):
        x = torch.randn(8, 5, 4, 4) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), ghost(xb)
        assert torch.equal(ya, yb)
        (ya * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
        (yb * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
        assert torch.equal(xa.grad, xb.grad) and torch.equal(plain.weight.grad, ghost.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(plain, name), getattr(ghost, name)), name
    plain.eval(), ghost.eval()
    x = torch.randn(3, 5, 4, 4)
    assert torch.equal(plain(x), ghost(x))


def test_ghost_bn_normalises_each_chunk_alone():
    plain, ghost = _pair(MN.GhostBatchNorm2d, ghost_batch_size=4)
    x = torch.cat([torch.randn(4, 5, 3, 3), 3 + 2 * torch.randn(4, 5, 3, 3), torch.randn(2, 5, 3, 3)])  # 4 + 4 + 2
    out = ghost(x)
    ref = nn.BatchNorm2d(5).train()
    ref.load_state_dict(plain.state_dict())
    expected = torch.cat([ref(c) for c in x.split(4)])
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, plain(x), atol=1e-3)
    chunk_mean = torch.stack([c.mean((0, 2, 3)) for c in x.split(4)]).mean(0)
    torch.testing.assert_close(ghost.running_mean, 0.1 * chunk_mean)  # one momentum step from 0
    assert int(ghost.num_batches_tracked) == 1


def test_inference_example_weighting():
    plain, iew = _pair(MN.IEWBatchNorm2d, iew_weight=0.0)
    x = torch.randn(16, 5, 4, 4) * 2 + 1
    assert torch.equal(plain(x), iew(x))  # training: plain BN, same running-stat updates
    torch.testing.assert_close(plain.running_var, iew.running_var)
    plain.eval(), iew.eval()
    probe = torch.randn(3, 5, 4, 4) + 2
    assert torch.equal(plain(probe), iew(probe))  # weight 0: plain inference
    iew.iew_weight = 0.5
    blended = iew(probe)
    assert not torch.allclose(blended, plain(probe), atol=1e-3)
    torch.testing.assert_close(iew(probe[:1]), blended[:1])  # per image: the rest of the batch does not matter
    iew.iew_weight = 1.0  # own statistics only: instance norm with BN's affine
    inst = nn.functional.instance_norm(probe, eps=iew.eps) * iew.weight.view(1, -1, 1, 1) + iew.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(iew(probe), inst, rtol=1e-4, atol=1e-4)
