"""Pass 5, folding of linear neighbours: chains, residual adds, constant scales/shifts."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import egp_fx
from egp_fx.ir.batches import Batch
from egp_fx.passes import collect_options, drive, run_pass
from egp_fx.passes.base import PassContext, Rewrite, RewriteKind
from egp_fx.passes.fold import affine as fold_affine
from egp_fx.passes.fold import fold_to_fixpoint
from egp_fx.passes.fold import residual as fold_residual
from egp_fx.passes.reasons import Reason, Why
from egp_fx.pipeline.latency import WidthTable

TOL = dict(rtol=1e-5, atol=1e-5)


def _layers(gm, cls) -> list[nn.Module]:
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


def _flops(module, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x[:1])
    return int(counter.get_total_flops())


def _fold(model, x, rule=None, allow=None, latency_fn=None, **options):
    """Trace `model`, run fold_linear (or only `rule`) with the pass options given, deciding by
    the measured `latency_fn` when given; (gm, outcome, reference output)."""
    gm = egp_fx.trace(model)
    with torch.no_grad():
        ref = gm(x)
    timings = WidthTable(latency_fn) if latency_fn is not None else None
    ctx = PassContext(Batch((x,)), collect_options(options), timings)
    if rule is None:
        out = run_pass("fold_linear", gm, ctx, allow=allow)
    else:
        out = drive(lambda g, c: fold_to_fixpoint(g, c, [rule]), gm, ctx, allow=allow)
    return gm, out, ref


def _same(gm, x, ref, **tol):
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, **(tol or TOL))


def _refused(out) -> list[tuple[Reason, dict]]:
    """(code, facts) of every refusal."""
    return [(r.code, dict(r.details)) for r in out.refusals]


def seq(**layers) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Fork(nn.Module):
    """a feeds b and the output: a has two users."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y), y


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


class Scaled(nn.Module):
    """conv -> * s -> + t (what linear_units leaves without a producer), then a consumer conv."""

    def __init__(self, into_consumer: bool, pad: int, shift: bool):
        super().__init__()
        self.into_consumer, self.shift = into_consumer, shift
        self.conv = nn.Conv2d(4, 6, 3, padding=pad, groups=2)
        n = 4 if into_consumer else 6
        self.register_buffer("s", torch.rand(1, n, 1, 1) + 0.5)
        self.register_buffer("t", torch.randn(n, 1, 1))

    def forward(self, x):
        if not self.into_consumer:
            return self.conv(x) * self.s + self.t
        return self.conv(x * self.s + (self.t if self.shift else 0.0))


def _rewrite(out, kind: RewriteKind) -> Rewrite:
    found = [r for r in out.rewrites if r.kind == kind]
    assert len(found) == 1, [r.kind for r in out.rewrites]
    return found[0]


# -- rule 1: Linear o Linear -------------------------------------------------------------------

def test_linear_o_linear_on_tokens_through_dropout():
    torch.manual_seed(0)
    model = seq(fc1=nn.Linear(16, 64), drop=nn.Dropout(0.1), norm=nn.Identity(),
                fc2=nn.Linear(64, 16))
    x = torch.randn(2, 5, 16)
    gm, out, ref = _fold(model, x)
    assert out.modified and len(_layers(gm, nn.Linear)) == 1
    (fc,) = _layers(gm, nn.Linear)
    assert fc.weight.shape == (16, 16)
    _same(gm, x, ref)
    r = _rewrite(out, RewriteKind.LINEAR_O_LINEAR)
    assert (r.pass_name, r.key, r.exact) == ("fold_linear", "fc2", True)
    assert r.nodes == ["fc1", "drop", "norm", "fc2"] and str(r.decision) == "folded into fc2"
    assert r.params_saved == (16 * 64 + 64 + 64 * 16 + 16) - (16 * 16 + 16)
    assert r.flops_saved == 2 * 5 * (16 * 64 + 64 * 16 - 16 * 16)
    assert not out.refusals


def test_transformer_mlp_and_residual_become_one_linear():
    torch.manual_seed(0)
    model = Residual(seq(fc1=nn.Linear(8, 32), fc2=nn.Linear(32, 8)))
    x = torch.randn(3, 4, 8)
    gm, out, ref = _fold(model, x)
    assert [r.kind for r in out.rewrites] == [RewriteKind.LINEAR_O_LINEAR,
                                              RewriteKind.RESIDUAL_INTO_LINEAR]
    assert len(_layers(gm, nn.Linear)) == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_function"]
    _same(gm, x, ref)


# -- rules 2-4: conv chains ----------------------------------------------------------------------

def test_strided_conv_o_1x1():
    torch.manual_seed(0)
    model = seq(a=nn.Conv2d(3, 16, 3, stride=2, padding=1), b=nn.Conv2d(16, 5, 1))
    x = torch.randn(2, 3, 11, 11)
    gm, out, ref = _fold(model, x)
    (conv,) = _layers(gm, nn.Conv2d)
    assert conv.weight.shape == (5, 3, 3, 3) and conv.stride == (2, 2)
    _same(gm, x, ref)
    r = _rewrite(out, RewriteKind.CONV_O_1X1)
    assert r.exact and r.key == "b" and r.nodes == ["a", "b"] and r.flops_saved > 0


def test_grouped_first_conv_refused():
    model = seq(a=nn.Conv2d(8, 8, 3, padding=1, groups=8), b=nn.Conv2d(8, 8, 1))
    gm, out, _ = _fold(model, torch.randn(1, 8, 6, 6))
    assert not out.modified and len(_layers(gm, nn.Conv2d)) == 2
    assert _refused(out) == [(Reason.CHAIN_GROUPED, {"what": "3x3 o 1x1", "groups1": 8,
                                                      "groups2": 1})]


@pytest.mark.parametrize("pad, bias, mode, folds", [
    (1, False, "zeros", True),      # zero first bias: the padded border is right
    (0, True, "zeros", True),       # unpadded kxk: exact always
    (1, True, "reflect", True),     # reflect padding commutes with the 1x1
    (1, True, "zeros", False),      # border sees b1
])
def test_1x1_o_conv(pad, bias, mode, folds):
    torch.manual_seed(0)
    model = seq(a=nn.Conv2d(4, 16, 1, bias=bias),
                b=nn.Conv2d(16, 6, 3, padding=pad, padding_mode=mode))
    x = torch.randn(2, 4, 9, 9)
    gm, out, ref = _fold(model, x)
    assert len(_layers(gm, nn.Conv2d)) == (1 if folds else 2)
    _same(gm, x, ref)
    if folds:
        r = _rewrite(out, RewriteKind.PW_O_CONV)
        assert r.exact and gm.get_submodule("b").weight.shape == (6, 4, 3, 3)
    else:
        assert _refused(out) == [(Reason.CHAIN_APPROXIMATE, {"what": "1x1 o 3x3",
                                                             "inexact": Reason.BIAS_AT_BORDER})]


def test_kxk_o_unpadded_kxk_is_exact():
    torch.manual_seed(0)
    model = seq(a=nn.Conv2d(3, 32, 3, padding=1), b=nn.Conv2d(32, 4, 3, stride=2))
    x = torch.randn(2, 3, 12, 12)
    gm, out, ref = _fold(model, x)
    (conv,) = _layers(gm, nn.Conv2d)
    assert conv.weight.shape == (4, 3, 5, 5) and conv.padding == (1, 1) and conv.stride == (2, 2)
    _same(gm, x, ref)
    assert _rewrite(out, RewriteKind.KXK_O_KXK).exact


def test_kxk_o_padded_kxk_only_when_approximate_allowed():
    torch.manual_seed(0)
    model = seq(a=nn.Conv2d(4, 32, 3, padding=1), b=nn.Conv2d(32, 4, 3, padding=1))
    x = torch.randn(2, 4, 10, 10)
    gm, out, _ = _fold(model, x)
    assert not out.modified and _refused(out) == [
        (Reason.CHAIN_APPROXIMATE, {"what": "3x3 o 3x3 -> 5x5", "inexact": Reason.PADDED_BORDER})]

    gm, out, ref = _fold(model, x, allow_approximate=True)
    (conv,) = _layers(gm, nn.Conv2d)
    assert conv.weight.shape == (4, 4, 5, 5) and conv.padding == (2, 2)
    r = _rewrite(out, RewriteKind.KXK_O_KXK)
    assert r.exact is False and str(r.decision) == "folded into b"
    with torch.no_grad():  # exact away from the 1-pixel border the second conv padded
        torch.testing.assert_close(gm(x)[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], **TOL)
        assert not torch.allclose(gm(x), ref, **TOL)


def test_3x3_o_3x3_raises_flops_refused():
    model = seq(a=nn.Conv2d(8, 8, 3, padding=1), b=nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 8, 8)
    gm, out, _ = _fold(model, x, allow_approximate=True)
    assert not out.modified and len(_layers(gm, nn.Conv2d)) == 2
    ((code, facts),) = _refused(out)
    assert (code, facts["what"], facts["ratio"]) == (Reason.CHAIN_MORE_FLOPS, "3x3 o 3x3 -> 5x5",
                                                     pytest.approx(25 / 18))


# -- rule 6: latency cost ------------------------------------------------------------------------

@pytest.mark.parametrize("merged_faster", [True, False])
def test_latency_cost_decides_when_asked(merged_faster):
    seen = []

    def latency(module, x):  # a stub device: the single merged conv is faster or slower
        seen.append((type(module).__name__, tuple(x.shape)))
        return 1.0 if isinstance(module, nn.Sequential) == merged_faster else 0.5

    model = seq(a=nn.Conv2d(8, 8, 3, padding=1), b=nn.Conv2d(8, 8, 3))   # exact, raises FLOPs
    x = torch.randn(1, 8, 8, 8)
    gm, out, ref = _fold(model, x, latency_fn=latency)
    assert out.modified == merged_faster
    assert ("Sequential", (1, 8, 8, 8)) in seen and ("Conv2d", (1, 8, 8, 8)) in seen
    _same(gm, x, ref)
    if not merged_faster:
        assert _refused(out) == [(Reason.CHAIN_SLOWER, {"what": "3x3 o 3x3 -> 5x5", "ratio": 2.0})]


# -- rule 5: residual ------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 6, 3, padding=1),
    nn.Conv2d(6, 6, 3, padding=1, groups=6),            # depthwise
    nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3),
    nn.Conv2d(6, 6, 1, bias=False),
    nn.Conv2d(6, 6, 5, padding=2, padding_mode="reflect"),
])
def test_residual_into_conv(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 7)
    gm, out, ref = _fold(Residual(conv), x, rule=fold_residual.rule)
    r = _rewrite(out, RewriteKind.RESIDUAL_INTO_CONV)
    assert (r.key, r.nodes, r.exact, str(r.decision)) == ("add", ["body", "add"], True, "folded into body")
    assert not [n for n in gm.graph.nodes if n.op == "call_function"]
    _same(gm, x, ref)


def test_residual_refused_when_size_changes():
    x = torch.randn(1, 6, 7, 7)
    gm, out, _ = _fold(Residual(nn.Conv2d(6, 1, 3, padding=1)), x)   # broadcasts over channels
    assert not out.modified and [code for code, _ in _refused(out)] == [Reason.RES_SHAPES]
    gm, out, _ = _fold(Residual(nn.Linear(7, 7)), x)   # square linear: folds
    assert _rewrite(out, RewriteKind.RESIDUAL_INTO_LINEAR).exact


# -- rule 7: preconditions ---------------------------------------------------------------------

def test_first_layer_with_two_users_refused():
    x = torch.randn(1, 3, 6, 6)
    gm, out, ref = _fold(Fork(), x)
    assert not out.modified and len(_layers(gm, nn.Conv2d)) == 2
    assert _refused(out) == [(Reason.CHAIN_USERS, {"node": "a", "users": 2})]
    assert [r.key for r in out.refusals] == ["b"]


def test_shared_module_refused():
    x = torch.randn(2, 8)
    gm, out, ref = _fold(Twice(), x)
    assert not out.modified
    assert _refused(out) == [(Reason.CHAIN_SHARED, {"sharing": "module a shared by 2 calls"})] * 2
    _same(gm, x, ref)


def test_only_limits_the_keys():
    model = seq(a=nn.Linear(4, 16), b=nn.Linear(16, 16), c=nn.Linear(16, 4))
    x = torch.randn(3, 4)
    gm, out, ref = _fold(model, x, allow={"b"}.__contains__)
    assert [r.key for r in out.rewrites] == ["b"] and not out.refusals
    assert len(_layers(gm, nn.Linear)) == 2
    _same(gm, x, ref)
    gm, out, ref = _fold(model, x, allow={"c"}.__contains__)   # a key is the layer folded into: b, then a
    assert [(r.key, r.nodes) for r in out.rewrites] == [("c", ["b", "c"]), ("c", ["a", "c"])]
    _same(gm, x, ref)


# -- constant scale / shift --------------------------------------------------------------------

def test_scale_and_shift_into_producer():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    gm, out, ref = _fold(Scaled(False, 1, True), x, rule=fold_affine.rule)
    assert [r.kind for r in out.rewrites] == [RewriteKind.SCALE_INTO_PRODUCER,
                                              RewriteKind.SHIFT_INTO_PRODUCER]
    assert all(r.exact for r in out.rewrites)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    _same(gm, x, ref)


@pytest.mark.parametrize("pad, shift, folds", [(1, False, True), (0, True, True), (1, True, False)])
def test_scale_and_shift_into_consumer(pad, shift, folds):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    gm, out, ref = _fold(Scaled(True, pad, shift), x)
    _same(gm, x, ref)
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and "mul" in str(n.target)]
    if folds:
        assert not muls and all(r.exact for r in out.rewrites)
        assert {r.kind for r in out.rewrites} <= {RewriteKind.SCALE_INTO_CONSUMER,
                                                  RewriteKind.SHIFT_INTO_CONSUMER}
    else:
        assert _refused(out) == [(Reason.AFFINE_NOT_FOLDED,
                                  {"sides": {"consumer": Why(Reason.AFFINE_APPROXIMATE)}})]
        gm, out, ref = _fold(Scaled(True, pad, shift), x, allow_approximate=True)
        assert _rewrite(out, RewriteKind.SHIFT_INTO_CONSUMER).exact is False


class TokenAffine(nn.Module):
    """Linear on tokens, divided by a number, minus a per-channel buffer, times a per-token one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.register_buffer("t", torch.randn(8))
        self.register_buffer("per_token", torch.rand(5, 1) + 0.5)

    def forward(self, x):
        return (self.fc(x) / 4.0 - self.t) * self.per_token


def test_div_sub_into_linear_producer_and_per_token_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm, out, ref = _fold(TokenAffine(), x)
    assert [r.kind for r in out.rewrites] == [RewriteKind.SCALE_INTO_PRODUCER,
                                              RewriteKind.SHIFT_INTO_PRODUCER]
    assert [r.key for r in out.rewrites] == ["truediv", "sub"]
    assert [r.key for r in out.refusals] == ["mul"]
    (sides,) = [facts["sides"] for code, facts in _refused(out) if code is Reason.AFFINE_NOT_FOLDED]
    assert sides["producer"] == Why(Reason.AFFINE_NOT_PER_CHANNEL, {"shape": (5, 1)})
    _same(gm, x, ref)


class Everything(nn.Module):
    """1x1 o padded 3x3 (zero bias) inside a residual, a constant scale/shift, an MLP."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(6, 24, 1), nn.Conv2d(24, 6, 3, padding=1, bias=False)
        nn.init.zeros_(self.a.bias)
        self.register_buffer("s", torch.rand(1, 6, 1, 1) + 0.5)
        self.register_buffer("t", torch.randn(6, 1, 1))
        self.c = nn.Conv2d(6, 6, 3, groups=2)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.b(self.a(x))
        return self.fc2(self.fc1(self.c(x * self.s + self.t).flatten(1)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_all_rules_together(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # TF32 would blur 1e-5
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 6, device=device)
    gm, out, ref = _fold(Everything().to(device), x)
    assert [r.kind for r in out.rewrites] == [
        RewriteKind.PW_O_CONV, RewriteKind.RESIDUAL_INTO_CONV, RewriteKind.SCALE_INTO_PRODUCER,
        RewriteKind.SHIFT_INTO_PRODUCER, RewriteKind.LINEAR_O_LINEAR]
    assert len(_layers(gm, nn.Conv2d)) == 2 and len(_layers(gm, nn.Linear)) == 1
    assert all(p.device.type == device for p in gm.parameters())
    _same(gm, x, ref)


# -- property: random chains ---------------------------------------------------------------------

@st.composite
def _chains(draw):
    """(model, input channels, approximate allowed, border): a random conv chain, with a Linear
    tail when only exact folds are allowed. With approximate folds the chain stays
    convolutional, and `border` bounds how far from the edge of the output a merge of padded
    convs can be wrong: the sum of (k - 1) over the convs."""
    approximate = draw(st.booleans())
    c0 = c = draw(st.integers(1, 5))
    size, layers, border = 10, [], 0
    for i in range(draw(st.integers(1, 5))):
        k = draw(st.sampled_from([1, 3]))
        out = draw(st.integers(1, 12))
        if approximate:   # wide then narrow: 3x3 o padded 3x3 merges that lower FLOPs
            k, out = 3, draw(st.integers(8, 12) if i % 2 == 0 else st.integers(1, 3))
        border += k - 1
        if draw(st.integers(0, 4)) == 0:   # a same-size residual block
            body = nn.Sequential(nn.Conv2d(c, out, k, padding=k // 2), nn.Conv2d(out, c, 1))
            layers.append(Residual(body))
            continue
        pad = draw(st.sampled_from([0, 1])) if k == 3 and size > 4 and not approximate \
            else k // 2
        conv = nn.Conv2d(c, out, k, padding=pad, bias=draw(st.booleans()))
        if draw(st.booleans()) and conv.bias is not None:
            nn.init.zeros_(conv.bias)
        layers += [conv] + ([nn.Identity()] if draw(st.booleans()) else [])
        c, size = out, size + 2 * pad - k + 1
    if not approximate:
        layers.append(nn.Flatten())
        width = c * size * size
        for _ in range(draw(st.integers(0, 3))):
            out = draw(st.integers(1, 24))
            layers.append(nn.Linear(width, out))
            width = out
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Sequential(*layers).double(), c0, approximate, border


@settings(max_examples=30, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_chains())
def test_random_chains_stay_equal_and_never_gain_flops(chain):
    """Exact folds reproduce the output to 1e-9; an approximate merge of padded convs is exact
    everywhere but on a border of the output at most `border` wide."""
    model, channels, approximate, border = chain
    side = 10 if not approximate else 2 * border + 14   # leaves an interior at least 4 wide
    x = torch.randn(2, channels, side, side, dtype=torch.float64)
    before = _flops(egp_fx.trace(model), x)
    gm, out, ref = _fold(model, x, allow_approximate=approximate)
    assert _flops(gm, x) <= before
    assert approximate or all(r.exact for r in out.rewrites)
    with torch.no_grad():
        got = gm(x)
    if approximate:
        inner = (Ellipsis, slice(border, -border or None), slice(border, -border or None))
        got, ref = got[inner], ref[inner]
        assert got.shape[-1] >= 4
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
