"""Extending egp_fx touches one place: an activation kind is one entry (activations.register), a
pass is one decorated generator (passes.register)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx import passes
from egp_fx.ir import activations
from egp_fx.ir.activations import ActivationKind
from egp_fx.ir.regions import Affine, RegionSpec
from egp_fx.passes.base import Candidate, Rewrite


class ShiftedReLU(nn.Module):
    """max(z - 1, 0): a ReLU-like unit egp_fx does not know out of the box."""

    def forward(self, z):
        return torch.clamp(z - 1.0, min=0.0)


@pytest.fixture
def shifted_relu_kind():
    kind = ActivationKind(
        "shifted_relu", (ShiftedReLU,),
        regions=lambda p, m: RegionSpec("shifted_relu", 1.0, 1.0, True, Affine(0.0, 0.0), None,
                                        Affine(1.0, -1.0)))
    activations.register(kind)
    yield kind
    activations.unregister("shifted_relu")


def test_a_new_activation_kind_is_one_entry(shifted_relu_kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), ShiftedReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].bias[16:] = 1.0                 # z = 1 + w x: mixed around the kink at 1
        model[0].weight[:16] = 0.0
        model[0].bias[:16] = 0.5                 # z = 0.5 < 1: OFF for every input
    x = torch.randn(16, 8)
    gm = egp_fx.compress(model, [x], channel_multiple=1, progress=False)
    (row,) = egp_fx.layer_stats(egp_fx.pipeline.report.original_of(gm))
    assert (row.kind, len(row.dead)) == ("shifted_relu", 16)
    assert str(egp_fx.report_of(gm).decisions_by_path()["1"][0]) == "narrowed 32 -> 16"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_hardsigmoid_is_piecewise_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Hardsigmoid(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.uniform_(-1.0, 1.0)        # every unit in the linear middle: z/6 + 1/2
    x = torch.randn(16, 8)
    gm = egp_fx.compress(model, [x], progress=False)
    report = egp_fx.report_of(gm)
    assert [str(d) for d in report.decisions_by_path()["1"]] == ["linearised"]
    assert report.after.nonlinear_depth == 0 and report.after.weighted_depth == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def _double(gm, node):
    with gm.graph.inserting_after(node):
        twice = gm.graph.call_function(torch.add, (node, node))
    node.replace_all_uses_with(twice, delete_user_cb=lambda u: u is not twice)
    return Rewrite("doubling", "double", node.name, [node.name], True, "x + x")


def test_a_new_pass_is_one_decorated_generator():
    @passes.register("doubling", positions=(95,))
    def doubling(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "output":
                yield Candidate("out", functools.partial(_double, gm, node.args[0]))

    try:
        assert passes.default_pipeline()[-1] == "doubling"
        model = nn.Sequential(nn.Linear(4, 4)).eval()
        x = torch.randn(3, 4)
        gm = egp_fx.compress(model, [x], tolerance=1e-5, progress=False)
        report = egp_fx.report_of(gm)   # the doubling changes the output: rolled back, named
        assert [(r.pass_name, r.status.value) for r in report.rewrites
                if r.pass_name == "doubling"] == [("doubling", "rolled back")]
    finally:
        passes.PASSES.pop("doubling")
    assert "doubling" not in passes.default_pipeline()
