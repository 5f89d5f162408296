"""Each rewrite pass on its own, on graphs of two or three layers: what changed, a structural fact,
exact numerics (float64, 1e-12), and the refusal code and facts of each near miss; how a
reason becomes text (reasons.render)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import egp_fx
from egp_fx.ir.batches import Batch
from egp_fx.passes import collect_options
from egp_fx.passes import run_pass as drive_pass
from egp_fx.passes.base import PassContext, RewriteKind
from egp_fx.passes.reasons import MESSAGES, Reason, Why, render

X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run_pass(name: str, model: nn.Module, x: torch.Tensor = X, **options):
    """Calibrate a float64 copy of `model` on x, run one pass; (gm, outcome, reference output)."""
    gm = egp_fx.calibrate(model.double().eval(), [x], progress=False)
    with torch.no_grad():
        ref = gm(x)
    ctx = PassContext(Batch((x[:1],)), collect_options({"channel_multiple": 1, **options}))
    outcome = drive_pass(name, gm, ctx)
    return gm, outcome, ref


def assert_exact(gm, x, ref):
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-12, atol=1e-12)


def calls(gm, kind) -> int:
    """How many nodes call a module of type `kind` or the function `kind`."""
    if isinstance(kind, type):
        return sum(1 for n in gm.graph.nodes if n.op == "call_module"
                   and isinstance(gm.get_submodule(n.target), kind))
    return sum(1 for n in gm.graph.nodes if n.target is kind)


def refused(outcome) -> list[tuple[Reason, dict]]:
    """(code, facts) of every refusal."""
    return [(r.code, dict(r.details)) for r in outcome.refusals]


def with_bn(conv: nn.Module, channels: int, dims: int = 2) -> nn.Sequential:
    bn = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    torch.manual_seed(1)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return nn.Sequential(conv, bn)


# --------------------------------------------------------------------------- fold_bn

def test_fold_bn_into_conv_and_linear():
    torch.manual_seed(0)
    model = nn.Sequential(with_bn(nn.Conv2d(3, 4, 3, padding=1), 4), nn.Flatten(),
                          with_bn(nn.Linear(256, 5), 5, dims=1))
    gm, out, ref = run_pass("fold_bn", model)
    assert [r.kind for r in out.rewrites] == [RewriteKind.FOLD_BN, RewriteKind.FOLD_BN]
    assert calls(gm, nn.BatchNorm2d) == calls(gm, nn.BatchNorm1d) == 0
    assert_exact(gm, X, ref)


class _TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _BnAfterPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.max_pool2d(x, 2))


@pytest.mark.parametrize("model, why", [
    (_TwoReaders(), (Reason.BN_LAYER_USERS, {"layer": "conv", "users": 2})),
    (_BnAfterPool(), (Reason.BN_INPUT_NOT_LAYER, {})),
])
def test_fold_bn_refuses_near_misses(model, why):
    gm, out, ref = run_pass("fold_bn", model)
    assert not out.rewrites and refused(out) == [why]
    assert calls(gm, nn.BatchNorm2d) == 1
    assert_exact(gm, X, ref)


# --------------------------------------------------------------------------- constants

class _DeadBranch(nn.Module):
    """x + conv2(relu(conv1 x)) with conv1 planted dead (weights 0, bias -1)."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.bias.fill_(-1.0)
            self.conv2.bias.fill_(shift)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


def test_constants_dead_branch_leaves_no_add():
    gm, out, ref = run_pass("constants", _DeadBranch(0.0))
    assert {r.kind for r in out.rewrites} == {RewriteKind.CONSTANT_BRANCH, RewriteKind.DROP_ADD}
    assert calls(gm, nn.Conv2d) == 0 and calls(gm, F.relu) == 0
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function") == 0   # output is x itself
    assert_exact(gm, X, ref)


def test_constants_nonzero_branch_keeps_one_add_of_a_constant():
    gm, out, ref = run_pass("constants", _DeadBranch(0.25))
    assert [r.kind for r in out.rewrites] == [RewriteKind.CONSTANT_BRANCH]
    assert calls(gm, nn.Conv2d) == 0
    adds = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(adds) == 1 and any(a.op == "get_attr" for a in adds[0].all_input_nodes)
    assert_exact(gm, X, ref)


class _DeadIntoCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-2.0)

    def forward(self, x):
        return torch.cat([F.relu(self.conv(x)), x], dim=1)


def test_constants_refuses_a_constant_that_reaches_a_concat():
    gm, out, ref = run_pass("constants", _DeadIntoCat())
    assert not [r for r in out.rewrites
                if r.kind in (RewriteKind.CONSTANT, RewriteKind.CONSTANT_BRANCH)]
    facts = {"node": "cat", "op": "call_function", "target": "cat"}   # conv: zero weights
    assert refused(out) == [(Reason.CONSTANT_NEEDS_BATCH, {"seed": Reason.ZERO_WEIGHTS, **facts}),
                            (Reason.CONSTANT_NEEDS_BATCH, {"seed": Reason.ALL_DEAD, **facts})]
    assert_exact(gm, X, ref)


def test_constants_drops_relu_of_a_non_negative_input():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU())
    gm, out, ref = run_pass("constants", model)
    assert [r.kind for r in out.rewrites] == [RewriteKind.DROP_RELU]
    assert calls(gm, nn.ReLU) == 1
    assert_exact(gm, X, ref)


# --------------------------------------------------------------------------- dead_channels

def _planted(conv: nn.Conv2d | nn.Linear, rows, value: float) -> None:
    """Rows whose output is `value` for every input (weights 0)."""
    with torch.no_grad():
        conv.weight[rows] = 0.0
        conv.bias[rows] = value


def _near(conv: nn.Conv2d | nn.Linear, rows, value: float) -> None:
    """Rows whose output stays within 0.05 of `value` on this data, but varies."""
    with torch.no_grad():
        conv.weight[rows] *= 1e-2
        conv.bias[rows] = value


def test_dead_channels_leave_producer_and_consumer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    _planted(model[0], [1, 6], -1.0)
    gm, out, ref = run_pass("dead_channels", model)
    assert [(r.kind, str(r.decision)) for r in out.rewrites] == [
        (RewriteKind.NARROW_CHANNELS, "narrowed 8 -> 6")]
    assert gm.get_submodule("0").out_channels == 6 and gm.get_submodule("2").in_channels == 6
    assert_exact(gm, X, ref)


def test_constant_channel_goes_into_an_unpadded_consumer_bias_only():
    torch.manual_seed(0)
    unpadded = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    _planted(unpadded[0], [2], 9.0)                      # ReLU6 saturated: outputs 6
    gm, out, ref = run_pass("dead_channels", unpadded)
    assert gm.get_submodule("2").in_channels == 7
    assert_exact(gm, X, ref)
    padded = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 3, padding=1))
    _planted(padded[0], [2], 9.0)
    gm, out, ref = run_pass("dead_channels", padded)
    assert not out.rewrites and gm.get_submodule("2").in_channels == 8
    assert_exact(gm, X, ref)


def test_dead_channels_refuse_a_producer_that_is_not_a_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[1].weight[[0, 3]] = 0.0
        model[1].bias[[0, 3]] = -1.0
    gm, out, ref = run_pass("dead_channels", model)
    assert not out.rewrites
    assert refused(out) == [(Reason.DC_NO_PRODUCER, {})]
    assert_exact(gm, X, ref)


def test_dead_channels_round_to_the_width_multiple():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 1))
    _planted(model[0], list(range(17)), -1.0)
    gm, out, ref = run_pass("dead_channels", model, channel_multiple=16)
    assert gm.get_submodule("0").out_channels == 16
    assert_exact(gm, X, ref)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 1))
    _planted(model[0], [0, 1, 2], -1.0)                  # 32 -> 29 would be padded back to 32
    gm, out, ref = run_pass("dead_channels", model, channel_multiple=16)
    assert not out.rewrites
    assert refused(out) == [(Reason.DC_ABOVE_MULTIPLE, {"removable": 4, "multiple": 16})]  # 3 + 1 dead on X


# --------------------------------------------------------------------------- linear_units

def test_linear_units_identity_and_affine_into_producer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.LeakyReLU(0.1),
                          nn.Conv2d(4, 2, 1))
    _near(model[0], list(range(4)), 3.0)                 # ReLU always on: identity
    _near(model[2], list(range(4)), -2.0)                # LeakyReLU negative side: 0.1 z
    gm, out, ref = run_pass("linear_units", model)
    assert [r.detail for r in out.rewrites] == [
        "_1 (relu) -> identity", "_3 (leaky_relu) -> per-channel affine folded into _2"]
    assert calls(gm, nn.ReLU) == calls(gm, nn.LeakyReLU) == 0
    assert_exact(gm, X, ref)


def test_linear_units_keep_a_partly_linear_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    _near(model[0], [0, 1], 3.0)
    gm, out, ref = run_pass("linear_units", model)
    assert not out.rewrites
    assert refused(out) == [(Reason.LU_PARTLY_LINEAR, {"linear": 2, "channels": 4})]
    assert calls(gm, nn.ReLU) == 1


# --------------------------------------------------------------------------- cleanup

def test_cleanup_removes_eval_noops_and_dead_code():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.Identity(), nn.ReLU())
    gm, out, ref = run_pass("cleanup", model)
    assert [r.kind for r in out.rewrites] == [RewriteKind.DROP_NOOP, RewriteKind.DROP_NOOP]
    assert calls(gm, nn.Dropout) == calls(gm, nn.Identity) == 0
    assert_exact(gm, X, ref)


# --------------------------------------------------------------------------- shapes kept valid

def test_passes_keep_every_shape_they_change(monkeypatch):
    """Shapes are propagated once per compress; after all passes, the shapes each node carries
    equal a fresh propagation on the final graph."""
    from egp_fx.ir.shapes import propagate, shape_of
    from egp_fx.pipeline.report import EXAMPLE_META_KEY

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 8),
                          nn.ReLU6(), nn.Linear(8, 4)).eval()
    _planted(model[0], list(range(20)), -1.0)           # 20 dead: narrowed to a multiple of 16
    _near(model[3], list(range(32)), 3.0)               # every unit linear: folds into the 1x1
    x = torch.randn(4, 3, 8, 8)
    import importlib

    runs = []
    for module in map(importlib.import_module, ("egp_fx.calibrate.calibration", "egp_fx.passes.base")):
        monkeypatch.setattr(module, "propagate", lambda *a, real=module.propagate:
                            runs.append(1) or real(*a))
    gm = egp_fx.compress(model, [x], progress=False)
    assert len(runs) == 1                # by calibrate; the passes keep those shapes valid
    kinds = {r.kind for r in egp_fx.report_of(gm).applied}
    assert {RewriteKind.NARROW_CHANNELS, RewriteKind.LINEARISE, RewriteKind.FOLD_BN} <= kinds
    kept = {n.name: shape_of(n) for n in gm.graph.nodes if n.op != "output"}
    propagate(gm, gm.meta[EXAMPLE_META_KEY])
    fresh = {n.name: shape_of(n) for n in gm.graph.nodes if n.op != "output"}
    assert kept == fresh


# --------------------------------------------------------------------------- reasons as text

def test_every_reason_has_one_message():
    assert set(MESSAGES) == set(Reason)


def test_a_refusal_is_rendered_from_its_code_and_facts():
    _, out, _ = run_pass("fold_bn", _TwoReaders())
    assert [r.reason for r in out.refusals] == ["BatchNorm not folded: conv has 2 users"]
    verdict = Why(Reason.BEYOND_TOLERANCE, {"error": 0.0123, "bound": 1e-5})
    assert render(Reason.ROLLED_BACK, {"verdict": verdict}) == \
        "rolled back: output error 0.0123 beyond tolerance 1e-05"
    assert str(Why(Reason.DC_ALL_SLOWER, {"times": {16: 2e-3, 8: 1.5e-3}})) == \
        "dead channels kept: every narrower width measures slower on the target (8: 1.5 ms, 16: 2 ms)"
    assert str(Why(Reason.AFFINE_NOT_FOLDED, {"sides": {
        "producer": Why(Reason.AFFINE_USERS, {"node": "a", "users": 2}),
        "consumer": Why(Reason.AFFINE_APPROXIMATE)}})) == (
        "constant not folded: producer: output of a has 2 users; consumer: shift into a "
        "zero-padded conv is approximate at the border (allow_approximate is off)")
