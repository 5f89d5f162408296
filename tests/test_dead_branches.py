"""Dead branches leave nothing behind: a constant that is zero in real arithmetic but a float32
residue is dropped (with the rounding bound in the report), a genuinely non-zero one stays."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx.ir.ops import Ops, Role
from egp_fx.testing.planted import images, resnet18_oracle, resnet18_planted
from egp_fx.testing.planting import cancelling


def _adds_and_activations(gm) -> tuple[int, int]:
    ops = Ops(gm)
    roles = [ops(n) for n in gm.graph.nodes]
    return sum(o.role is Role.ADD for o in roles), sum(o.role is Role.ACTIVATION for o in roles)


def _data():
    return images(2, 4, 64, seed=1)


def test_the_plant_leaves_a_float32_residue():
    bn = nn.BatchNorm2d(64).eval()
    cancelling(bn, seed=0)
    with torch.no_grad():
        residue = bn(torch.zeros(1, 64, 1, 1)).abs().max()
    assert 0 < float(residue) < 1e-6


@pytest.mark.parametrize("k", [2, 4])
def test_dead_blocks_run_exactly_the_oracles_adds_and_relus(k):
    model, calib = resnet18_planted(k), _data()
    small = egp_fx.compress(model, calib, progress=False)
    oracle = egp_fx.trace(resnet18_oracle(model, k))
    assert _adds_and_activations(small) == _adds_and_activations(oracle)
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
    model, calib = resnet18_planted(1, shift=0.25), _data()
    small = egp_fx.compress(model, calib, progress=False)
    adds, acts = _adds_and_activations(small)
    ref_adds, ref_acts = _adds_and_activations(egp_fx.trace(resnet18_oracle(model, 1)))
    assert (adds, acts) == (ref_adds + 1, ref_acts)     # x + 0.25 stays; relu(x + 0.25) goes
    report = egp_fx.report_of(small)
    assert not [r for r in report.applied if r.kind == "zero_up_to_rounding"]
    with torch.no_grad():
        for x in calib:
            torch.testing.assert_close(small(x), model(x), rtol=0,
                                       atol=1e-5 * float(model(x).abs().max()))


def test_report_lists_the_rounding_zeros_with_their_bound():
    small = egp_fx.compress(resnet18_planted(1), _data(), progress=False)
    (zero,) = [r for r in egp_fx.report_of(small).applied if r.kind == "zero_up_to_rounding"]
    assert "is zero to within its float32 rounding (bound" in zero.detail
    as_dict = egp_fx.report_of(small).to_dict()
    listed = [r for r in as_dict["rewrites"] if r["kind"] == "zero_up_to_rounding"]
    assert len(listed) == 1 and listed[0]["bound"] == zero.bound
