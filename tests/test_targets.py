"""Widths chosen for the hardware: the target's multiple, channel_multiple overriding it, and
the width picked by measurement when cost="latency"."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx.passes.dead_channels import candidate_widths
from egp_fx.passes.reasons import Reason


def mlp(dead: int, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 8)).eval()
    with torch.no_grad():
        model[0].weight[:dead] = 0.0
        model[0].bias[:dead] = -1.0
    return model


X = [torch.randn(64, 32, generator=torch.Generator().manual_seed(1))]


def _width(gm) -> int:
    return next(lay.out_channels for n in gm.graph.nodes
                if (lay := egp_fx.ir.layer.layer_of(gm, n)) is not None and lay.path == "0")


@pytest.mark.parametrize("target, width, multiple",
                         [("ort-cpu", 160, 16), ("cuda", 192, 64), ("generic", 152, 8)])
def test_the_target_sets_the_width_multiple(target, width, multiple):
    gm = egp_fx.compress(mlp(104), X, target=target, progress=False)    # 152 live units
    assert _width(gm) == width and egp_fx.report_of(gm).target == target
    kept = [dict(r.details) for r in egp_fx.report_of(gm).refusals
            if r.code is Reason.DC_KEPT_FOR_MULTIPLE]
    assert kept == ([{"kept": width - 152, "removable": 104, "multiple": multiple}]
                    if width > 152 else [])


def test_channel_multiple_overrides_the_target():
    gm = egp_fx.compress(mlp(100), X, target="cuda", channel_multiple=1, progress=False)
    assert _width(gm) == 156
    gm = egp_fx.compress(mlp(100), X, target="generic", channel_multiple=64, progress=False)
    assert _width(gm) == 192


def test_candidate_widths():
    assert candidate_widths(256, 156) == [160, 192, 256]
    assert candidate_widths(256, 250) == [256]


def _stub(fast: set[int]):
    """Latency 1 ms for a pair whose hidden width is in `fast`, 2 ms otherwise."""
    seen = []

    def latency(module, x):
        width = module[0].out_features if isinstance(module, nn.Sequential) else -1
        seen.append(width)
        return 1e-3 if width in fast else 2e-3
    return latency, seen


def test_latency_picks_the_fastest_width_and_says_why():
    latency, seen = _stub({192})
    gm = egp_fx.compress(mlp(100), X, cost="latency", latency_fn=latency, progress=False)
    assert _width(gm) == 192
    assert sorted(set(seen)) == [160, 192, 256]      # every candidate timed once
    (why,) = [r.why for r in egp_fx.report_of(gm).refusals if r.key == "_1"]
    assert why.code is Reason.DC_KEPT_FOR_SPEED
    assert (why.details["kept"], why.details["removable"]) == (192 - 156, 100)
    assert why.details["times"] == {160: 2e-3, 192: 1e-3, 256: 2e-3}
    with torch.no_grad():
        torch.testing.assert_close(gm(X[0]), mlp(100)(X[0]), rtol=1e-5, atol=1e-6)


def test_a_narrowing_that_measures_slower_is_not_applied():
    latency, _ = _stub({256})
    gm = egp_fx.compress(mlp(100), X, cost="latency", latency_fn=latency, progress=False)
    assert _width(gm) == 256
    report = egp_fx.report_of(gm)
    assert not [r for r in report.applied if r.kind == "narrow_channels"]
    assert [r.code for r in report.refusals if r.key == "_1"] == [Reason.DC_ALL_SLOWER]
