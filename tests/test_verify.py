"""The safety net: the error measure fails on NaN/Inf, the Verifier's Verdict says what it decided
and why, and a failing group keeps exactly its good rewrites (bisection neither over- nor
under-rolls back)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import egp_fx
import egp_fx.passes as passes
from egp_fx.ir.batches import Batch
from egp_fx.ir.compare import ErrorMeter, compare
from egp_fx.passes.base import Candidate, Rewrite, RewriteKind
from egp_fx.passes.reasons import Reason
from egp_fx.pipeline.compress import output_error
from egp_fx.pipeline.verify import Verifier


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _refs(x):
    return [[x.clone()]]


@pytest.mark.parametrize("factor", [math.nan, math.inf, -math.inf])
def test_non_finite_output_is_an_infinite_error(factor):
    x = torch.rand(4, 3) + 0.5
    assert output_error(_Scale(factor), [x], _refs(x)) == math.inf


def test_one_nan_among_finite_values_is_an_infinite_error():
    ref = torch.arange(6.0).view(2, 3)
    out = ref.clone()
    out[1, 2] = math.nan
    meter = ErrorMeter()
    meter.add([out], [ref])
    assert meter.error == math.inf and meter.failed
    assert "NaN/Inf" in meter.reason


def test_relative_error_is_max_abs_difference_over_max_reference():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64)
    out = ref + torch.tensor([[0.0, 0.02], [-0.03, 0.0]], dtype=torch.float64)
    worst, scale = compare([out], [ref])
    assert worst == pytest.approx(0.03, rel=1e-12) and scale == 4.0
    assert output_error(_Scale(1.0), [out], [[ref]]) == pytest.approx(0.03 / 4.0, rel=1e-12)


def test_reference_nan_must_be_reproduced_exactly():
    ref = torch.tensor([1.0, math.nan, -math.inf])
    assert compare([ref.clone()], [ref]) == (0.0, 1.0)
    moved = torch.tensor([math.nan, 1.0, -math.inf])
    assert compare([moved], [ref]).reason
    flipped = torch.tensor([1.0, math.nan, math.inf])
    assert compare([flipped], [ref]).reason


def test_structure_and_shape_mismatches_are_infinite():
    ref = [torch.ones(2, 3)]
    assert compare([torch.ones(2, 3), torch.ones(1)], ref).reason
    assert compare([torch.ones(3, 2)], ref).reason


def test_report_of_infinite_error_is_valid_json():
    from egp_fx.pipeline.measures import Totals
    from egp_fx.pipeline.report import CompressReport

    totals = Totals(1, 1, 1, 1, 1)
    report = CompressReport(totals, totals, 1e-5, max_error=math.inf)
    assert '"max_error": "inf"' in report.to_json()


# --------------------------------------------------------------------------- the Verdict

class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("broken rewrite")


def test_verdict_says_what_was_decided_and_why():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    exact = [Rewrite("p", RewriteKind.FOLD_BN, "k", [], True, "")]
    verifier = Verifier(_Scale(1.0), [Batch((x,))], [[x.clone()]], 1e-5, 1e-2)
    same = verifier.judge(_Scale(1.0), exact)
    assert (same.accepted, same.error, same.float32, same.why.code) == \
        (True, 0.0, 0.0, Reason.WITHIN_TOLERANCE)
    off = verifier.judge(_Scale(1.001), exact)         # 1e-3 in float32 and float64 alike
    assert (off.accepted, off.why.code) == (False, Reason.BEYOND_TOLERANCE)
    assert off.error == pytest.approx(1e-3, rel=1e-3) and off.why.details["bound"] == 1e-5
    inexact = [Rewrite("p", RewriteKind.KXK_O_KXK, "k", [], False, "")]
    assert verifier.judge(_Scale(1.001), inexact).accepted      # against approx_tolerance
    nan = verifier.judge(_Scale(math.nan), exact)
    assert (nan.accepted, nan.error, nan.float32, nan.why.code) == \
        (False, math.inf, None, Reason.OUTPUT_INVALID)
    raised = verifier.judge(_Raises(), exact)
    assert (raised.accepted, raised.error, raised.why.code) == \
        (False, math.inf, Reason.OUTPUT_RAISES)
    assert str(raised.why) == "output raises RuntimeError: broken rewrite"


# --------------------------------------------------------------------------- rollback

class _ThreeStages(nn.Module):
    """Three Linear+ReLU stages with planted dead units 4 and 9 (weights 0, bias -1: dead on any
    input). Stage a's unit 0 reads only the first input coordinate: it is OFF on calibration
    data (first coordinate negative) and fires on held-out data (first coordinate positive), so
    the dead-channel rewrite of stage a must be rolled back while those of b and c stay. Every
    other unit sees random weights and is mixed on data this large."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for layer in (self.a, self.b, self.c):
                layer.bias.zero_()
                layer.weight[[4, 9]] = 0.0
                layer.bias[[4, 9]] = -1.0
            self.a.weight[:, 0] = 0.0
            self.a.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        self.eval()

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        return self.head(x)


def _signed_data(n: int, sign: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(64, 4, generator=g)
        x[:, 0] = sign * x[:, 0].abs()
        out.append(x)
    return out


def test_failing_group_keeps_exactly_its_good_rewrites():
    model = _ThreeStages()
    calib, holdout = _signed_data(4, -1.0, 0), _signed_data(1, 1.0, 1)
    gm = egp_fx.compress(model, calib, holdout_loader=holdout, channel_multiple=1, progress=False)
    report = egp_fx.report_of(gm)
    narrowed = {r.key: r.status for r in report.rewrites if r.kind is RewriteKind.NARROW_CHANNELS}
    assert narrowed == {"relu": "rolled back", "relu_1": "applied", "relu_2": "applied"}
    assert gm.get_submodule("a").out_features == 16
    assert gm.get_submodule("b").out_features == 14 and gm.get_submodule("c").out_features == 14
    (rolled,) = [r for r in report.refusals if r.code is Reason.ROLLED_BACK]
    assert rolled.key == "relu" and rolled.details["verdict"].code is Reason.BEYOND_TOLERANCE
    with torch.no_grad():
        for x in calib + holdout:
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def _scale(gm, node, factor):
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(torch.mul, (node, factor))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    return Rewrite("poison", "scale", node.name, [node.name], True, f"{node.name} times {factor}")


def test_nan_producing_pass_is_rolled_back_and_named(monkeypatch):
    """A pass that writes NaN into one of three activations: only that rewrite is undone."""
    def poison(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is torch.relu:
                factor = math.nan if node.name == "relu_1" else 1.0
                yield Candidate(node.name, functools.partial(_scale, gm, node, factor))

    monkeypatch.setitem(passes.PASSES, "poison", passes.PassSpec("poison", poison, False, None, ""))
    model = _ThreeStages()
    calib = _signed_data(2, 1.0, 0)
    gm = egp_fx.compress(model, calib, passes=("poison",), progress=False)
    report = egp_fx.report_of(gm)
    assert {r.key: r.status for r in report.rewrites} == {
        "relu": "applied", "relu_1": "rolled back", "relu_2": "applied"}
    bad = [r for r in report.refusals if r.key == "relu_1"]
    assert [(r.code, r.details["verdict"].code) for r in bad] == [
        (Reason.ROLLED_BACK, Reason.OUTPUT_INVALID)]
    assert report.max_error == 0.0
    muls = [n for n in gm.graph.nodes if n.target is torch.mul]
    assert len(muls) == 2
    with torch.no_grad():
        assert torch.equal(gm(calib[0]), model(calib[0]))


@pytest.mark.parametrize("verify_samples,holdout,measured", [
    (None, False, 0),     # verified on all calibration data: that error is the report's
    (8, False, 1),        # verified on 8 samples: the report's error is measured on all
    (None, True, 2),      # held-out data in the verification set: both measured apart
])
def test_report_error_covers_all_calibration_data_and_is_measured_once(
        monkeypatch, verify_samples, holdout, measured):
    import importlib

    compress_module = importlib.import_module("egp_fx.pipeline.compress")

    calls = []
    real = compress_module.output_error
    monkeypatch.setattr(compress_module, "output_error",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _ThreeStages()
    calib = _signed_data(2, 1.0, 0)
    gm = egp_fx.compress(model, calib, verify_samples=verify_samples, channel_multiple=1,
                         holdout_loader=_signed_data(1, 1.0, 1) if holdout else None,
                         progress=False)
    report = egp_fx.report_of(gm)
    assert report.applied and not report.rolled_back
    assert len(calls) == measured
    with torch.no_grad():
        refs = [[model(x)] for x in calib]
    assert report.max_error == real(gm, calib, refs)
