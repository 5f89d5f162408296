"""Dead branches leave nothing behind: a constant that is zero in real arithmetic but a float32
residue is dropped (with the rounding bound in the report), a genuinely non-zero one stays."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import egp_fx
from egp_fx.ir.ops import Ops, Role

DEAD_BLOCKS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")


def _cancelling(bn: nn.BatchNorm2d, seed: int, shift: float = 0.0) -> None:
    """bn(0) = beta - gamma * mean / sqrt(var + eps) is `shift` in real arithmetic; beta is
    computed in float32, so bn(0) of a zero shift comes out as a rounding residue."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps) + shift)


def planted_resnet(k: int, shift: float = 0.0) -> nn.Module:
    """ResNet-18 whose first k blocks of DEAD_BLOCKS have a dead first ReLU and a branch that
    adds `shift` (0: a float32 residue of a cancelling BatchNorm)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for i, name in enumerate(DEAD_BLOCKS[:k]):
        block = model.get_submodule(name)
        with torch.no_grad():
            block.bn1.weight.zero_()
            block.bn1.bias.fill_(-1.0)
        _cancelling(block.bn2, seed=i, shift=shift)
    return model


def oracle(model: nn.Module, k: int) -> nn.Module:
    out = copy.deepcopy(model)
    for name in DEAD_BLOCKS[:k]:
        layer, index = name.split(".")
        getattr(out, layer)[int(index)] = nn.Identity()
    return out


def _adds_and_activations(gm) -> tuple[int, int]:
    ops = Ops(gm)
    roles = [ops(n) for n in gm.graph.nodes]
    return sum(o.role is Role.ADD for o in roles), sum(o.role is Role.ACTIVATION for o in roles)


def _data(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 64, 64, generator=g) for _ in range(n)]


def test_the_plant_leaves_a_float32_residue():
    bn = nn.BatchNorm2d(64).eval()
    _cancelling(bn, seed=0)
    with torch.no_grad():
        residue = bn(torch.zeros(1, 64, 1, 1)).abs().max()
    assert 0 < float(residue) < 1e-6


@pytest.mark.parametrize("k", [2, 4])
def test_dead_blocks_run_exactly_the_oracles_adds_and_relus(k):
    model, calib = planted_resnet(k), _data()
    small = egp_fx.compress(model, calib, progress=False)
    assert _adds_and_activations(small) == _adds_and_activations(egp_fx.trace(oracle(model, k)))
    report = egp_fx.report_of(small)
    zeros = [r for r in report.applied if r.kind == "zero_up_to_rounding"]
    assert len(zeros) == k
    assert all(r.exact and r.bound is not None and 0 < r.bound < 1e-5 for r in zeros)
    assert report.max_error <= 1e-5 and not report.rolled_back
    with torch.no_grad():
        for x in calib:
            torch.testing.assert_close(small(x), model(x), rtol=0,
                                       atol=1e-5 * float(model(x).abs().max()))


def test_a_genuinely_non_zero_branch_keeps_exactly_one_add():
    model, calib = planted_resnet(1, shift=0.25), _data()
    small = egp_fx.compress(model, calib, progress=False)
    adds, acts = _adds_and_activations(small)
    ref_adds, ref_acts = _adds_and_activations(egp_fx.trace(oracle(model, 1)))
    assert (adds, acts) == (ref_adds + 1, ref_acts)     # x + 0.25 stays; relu(x + 0.25) goes
    report = egp_fx.report_of(small)
    assert not [r for r in report.applied if r.kind == "zero_up_to_rounding"]
    with torch.no_grad():
        for x in calib:
            torch.testing.assert_close(small(x), model(x), rtol=0,
                                       atol=1e-5 * float(model(x).abs().max()))


def test_report_lists_the_rounding_zeros_with_their_bound():
    small = egp_fx.compress(planted_resnet(1), _data(), progress=False)
    (zero,) = [r for r in egp_fx.report_of(small).applied if r.kind == "zero_up_to_rounding"]
    assert "is zero to within its float32 rounding (bound" in zero.detail
    as_dict = egp_fx.report_of(small).to_dict()
    listed = [r for r in as_dict["rewrites"] if r["kind"] == "zero_up_to_rounding"]
    assert len(listed) == 1 and listed[0]["bound"] == zero.bound
