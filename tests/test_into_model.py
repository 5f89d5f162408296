"""egp_fx.deploy.into_model on vision models: where it applies and where it must refuse.
(The language-model cases, with generate(), are in test_transformers.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import egp_fx

DEAD = [1, 4, 5, 9, 12, 13, 14, 15]          # 8 of 16 channels: narrowing to 8 fits multiple 8


def _net(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1)]
    layers += [nn.BatchNorm2d(16)] if batch_norm else []
    layers += [nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
               nn.Linear(8 * 8 * 8, 10)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():                   # planted dead channels: zero weights, bias -1
        net[0].weight[DEAD] = 0.0
        net[0].bias[DEAD] = -1.0
        if batch_norm:
            net[1].running_mean.uniform_(-0.1, 0.1)
            net[1].running_var.uniform_(0.5, 2.0)
            net[1].weight.uniform_(0.5, 1.5)
            net[1].bias[DEAD] = -1.0
    return net


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def test_narrowed_convolutions_go_back_into_the_sequential():
    net = _net(batch_norm=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = egp_fx.compress(net, _calib(), target="generic", progress=False)
    result = egp_fx.into_model(small, net)
    assert type(result) is nn.Sequential
    assert result[0].weight.shape == (8, 3, 3, 3) and result[0].out_channels == 8
    assert result[2].weight.shape == (8, 8, 3, 3) and result[2].in_channels == 8
    keep = [c for c in range(16) if c not in DEAD]
    assert torch.equal(result[0].weight, net[0].weight[keep])
    assert torch.equal(result[2].weight, net[2].weight[:, keep])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result(x), net(x), rtol=0, atol=1e-6)


def test_refused_where_a_folded_batchnorm_changed_the_narrowed_layer():
    net = _net(batch_norm=True)
    small = egp_fx.compress(net, _calib(), target="generic", progress=False)
    kinds = {r.kind for r in egp_fx.report_of(small).applied}
    assert {"fold_bn", "narrow_channels"} <= kinds
    with pytest.raises(egp_fx.CompressError, match="differs from the compressed module"):
        egp_fx.into_model(small, net)


def test_refused_when_nothing_was_narrowed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    small = egp_fx.compress(net, [torch.randn(16, 4)], progress=False)
    with pytest.raises(egp_fx.CompressError, match="narrowed no layer"):
        egp_fx.into_model(small, net)
    with pytest.raises(egp_fx.CompressError, match="not a GraphModule"):
        egp_fx.into_model(small, small)
