"""Activation kinds beyond the ReLU family: PReLU with per-channel slopes, RReLU in eval mode,
the shrinks, Threshold, and the smooth kinds with float32 margins (ELU, CELU, SELU, Softplus,
Mish); activations that are not kinds are named with their reason.

The planted nets put each unit's pre-activation z = b + 1e-3 w.x in one region of the kind (its
bias b chosen there), or across a boundary (a mixed unit).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import egp_fx
from egp_fx.calibrate.stats import EGP_META_KEY
from egp_fx.capture.coverage import activation_coverage
from egp_fx.ir.batches import Batch
from egp_fx.ir import activations, margins
from egp_fx.ir.ops import Ops, Role

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def _planted(act: nn.Module, biases: list[float], mixed: list[int] = (), seed: int = 0):
    """Linear(8, C) -> act -> Linear(C, 4), unit c at z = biases[c] + small; units in `mixed`
    get full-size weights around z = biases[c]."""
    torch.manual_seed(seed)
    c = len(biases)
    model = nn.Sequential(nn.Linear(8, c), act, nn.Linear(c, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.copy_(torch.tensor(biases))
        for u in mixed:
            model[0].weight[u].normal_(0.0, 3.0)
    return model


def _data(n: int = 64, seed: int = 1):
    return [torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))]


def _stats(gm, kind: str):
    [st] = [n.meta[EGP_META_KEY] for n in gm.graph.nodes if EGP_META_KEY in n.meta]
    assert st.kind == kind
    return st


def _compress_exact(model, data, **kw):
    gm = egp_fx.compress(model, data, progress=False, channel_multiple=1, **kw)
    with torch.no_grad():
        torch.testing.assert_close(gm(data[0]), model(data[0]), **TIGHT)
    return gm, egp_fx.report_of(gm)


# ----------------------------------------------------------------------------- PReLU

def _prelu_net(mixed: list[int] = ()):
    """Units 0-3 stay positive (identity), 4-7 stay negative (their own slope a_c)."""
    model = _planted(nn.PReLU(8), [3.0] * 4 + [-3.0] * 4, mixed)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, -0.5, 0.25, 0.6, 1.5]))
    return model


def test_prelu_one_sided_units_are_linear_with_their_own_slope_and_fold():
    model = _prelu_net()
    data = _data()
    st = _stats(egp_fx.calibrate(model, data, progress=False), "prelu")
    assert st.linear_channels == list(range(8)) and st.dead_channels == []
    affine = st.channel_affine()
    assert [a.slope for a in affine] == pytest.approx([1.0] * 4 + [-0.5, 0.25, 0.6, 1.5], rel=1e-7)
    gm, report = _compress_exact(model, data)
    assert [str(d) for d in report.decisions_by_path()["1"]] == ["linearised"]
    assert (report.after.nonlinear_depth, report.after.weighted_depth) == (0, 1)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.PReLU)
                   for n in gm.graph.nodes)
    # the folded map is W2 diag(s) W1 with s = 1 on the positive side and a_c on the negative
    s = torch.tensor([1.0] * 4 + [-0.5, 0.25, 0.6, 1.5])
    w = model[2].weight @ torch.diag(s) @ model[0].weight
    [lin] = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    torch.testing.assert_close(lin.weight, w, rtol=1e-6, atol=1e-7)


def test_prelu_with_a_mixed_unit_stays():
    model = _prelu_net(mixed=[5])
    gm, report = _compress_exact(model, _data())
    assert [str(d).split(" (")[0] for d in report.decisions_by_path()["1"]] == ["kept"]
    assert report.after.nonlinear_depth == 1
    assert sum(isinstance(m, nn.PReLU) for m in gm.modules()) == 1


def test_prelu_single_slope_conv_net_and_its_aten_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.PReLU(),
                          nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.fill_(-2.0)                  # every unit on the slope side
        model[1].weight.fill_(0.3)
    data = [torch.randn(4, 3, 8, 8)]
    for capture in ("fx", "export"):
        gm, report = _compress_exact(model, data, capture=capture)
        assert report.capture.mode == capture
        assert report.after.nonlinear_depth == 0, capture


def test_functional_prelu_reads_its_weight_from_the_graph():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 2)
            self.slope = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.25]))

        def forward(self, x):
            return self.fc2(F.prelu(self.fc1(x), self.slope))

    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight.mul_(1e-3)
        model.fc1.bias.copy_(torch.tensor([-1.0, -1.0, 1.0, -1.0]))
    data = _data()
    st = _stats(egp_fx.calibrate(model, data, progress=False), "prelu")
    assert [a.slope for a in st.channel_affine()] == [0.5, -1.0, 1.0, 0.25]
    _, report = _compress_exact(model, data)
    assert report.after.nonlinear_depth == 0


def test_dead_prelu_units_narrow_the_slopes_too():
    """A unit whose slope is 0 on the negative side is dead: it goes, and so does its slope."""
    model = _prelu_net(mixed=[0, 1, 2, 3, 5, 6, 7])
    with torch.no_grad():
        model[1].weight[4] = 0.0                   # unit 4 stays negative: a_4 z = 0
    gm, report = _compress_exact(model, _data())
    assert [str(d) for d in report.decisions_by_path()["1"]] == ["narrowed 8 -> 7"]
    [prelu] = [m for m in gm.modules() if isinstance(m, nn.PReLU)]
    torch.testing.assert_close(prelu.weight.detach(), model[1].weight.detach()[[0, 1, 2, 3, 5, 6, 7]])
    assert prelu.num_parameters == 7


def test_prelu_slopes_along_another_axis_than_the_channels_are_named_not_analysed():
    """PReLU(L) on (N, L, C) tokens scales along dim 1, the Linear writes channels on dim -1."""
    model = nn.Sequential(nn.Linear(8, 6), nn.PReLU(5), nn.Linear(6, 2)).eval()
    gm = egp_fx.calibrate(model, [torch.randn(4, 5, 8)], progress=False)
    cov = gm.meta["egp_coverage"]
    assert (cov.run, cov.analysed, cov.unanalysed) == (1, 0, 1)
    assert cov.hidden[0].reason == ("its 5 per-channel slopes run along dim 1, but the layer "
                                    "before it writes its channels along dim 2")


# ----------------------------------------------------------------------------- the other kinds

SLOPE = (1 / 8 + 1 / 3) / 2


@pytest.mark.parametrize("act, biases, mixed, expect", [
    # (dead, constant, linear) channels, and a linear channel's (slope, offset)
    (nn.RReLU(), [-1.0, 1.0, 0.0], [2], ([], [], [0, 1], {0: (SLOPE, 0.0), 1: (1.0, 0.0)})),
    (nn.Threshold(0.5, 2.0), [0.0, 1.0, 0.5], [2], ([], [0], [1], {1: (1.0, 0.0)})),
    (nn.Threshold(0.5, 0.0), [0.0, 1.0, 0.5], [2], ([0], [], [1], {1: (1.0, 0.0)})),
    (nn.Hardshrink(0.5), [0.0, 1.0, -1.0, 0.5], [3], ([0], [], [1, 2], {1: (1.0, 0.0)})),
    (nn.Softshrink(0.5), [0.0, 1.0, -1.0, 0.5], [3], ([0], [], [1, 2],
                                                     {1: (1.0, -0.5), 2: (1.0, 0.5)})),
    (nn.ELU(), [-20.0, 1.0, -1.0], [], ([], [0], [1], {1: (1.0, 0.0)})),
    (nn.CELU(2.0), [-40.0, 1.0, -20.0], [], ([], [0], [1], {1: (1.0, 0.0)})),
    (nn.SELU(), [-20.0, 1.0, -1.0], [], ([], [0], [1], {1: (activations.SELU_SCALE, 0.0)})),
    (nn.Softplus(), [-20.0, 20.0, 0.0], [], ([0], [], [1], {1: (1.0, 0.0)})),
    (nn.Mish(), [-25.0, 10.0, 0.0], [], ([0], [], [1], {1: (1.0, 0.0)})),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_regions_of_each_kind_on_planted_units(act, biases, mixed, expect):
    model = _planted(act, biases, mixed)
    data = _data()
    st = _stats(egp_fx.calibrate(model, data, progress=False), activations.module_kind(act))
    dead, constant, linear, maps = expect
    assert (st.dead_channels, st.constant_channels, st.linear_channels) == (dead, constant, linear)
    affine = st.channel_affine()
    for c, (slope, offset) in maps.items():
        assert (affine[c].slope, affine[c].offset) == pytest.approx((slope, offset), rel=1e-7)
    nonlinear = set(range(len(biases))) - set(dead) - set(constant) - set(linear)
    assert all(affine[c] is None for c in nonlinear)
    _compress_exact(model, data)


def test_saturated_constants_are_what_the_kernels_give():
    """ELU saturates at -alpha, CELU(2) at -2, SELU at -scale*alpha, as float32 computes them."""
    for act, bias, const in ((nn.ELU(), -20.0, -1.0), (nn.CELU(2.0), -40.0, -2.0),
                             (nn.SELU(), -20.0, float(F.selu(torch.tensor(-100.0))))):
        st = _stats(egp_fx.calibrate(_planted(act, [bias, 1.0]), _data(), progress=False),
                    activations.module_kind(act))
        assert st.channel_affine()[0].offset == const


def test_rrelu_in_training_mode_is_named_not_analysed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return F.rrelu(self.fc(x), training=True)

    gm = torch.fx.symbolic_trace(Net().eval())     # random: no capture matches the model
    op = Ops(gm)(next(n for n in gm.graph.nodes if n.name == "rrelu"))
    assert (op.role, op.kind) == (Role.NONLINEAR, "rrelu")
    cov = activation_coverage(gm, Batch((torch.randn(1, 8),)), set())
    [h] = cov.hidden
    assert (cov.run, cov.analysed, h.node, h.kinds) == (1, 0, "rrelu", {"rrelu": 1})
    assert h.reason == "rrelu: in training mode RReLU draws a random slope for every element"


def test_activations_without_exact_regions_are_named_with_their_reason():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.Sigmoid(),
                          nn.Linear(4, 3), nn.Softmax(-1)).eval()
    gm = egp_fx.calibrate(model, _data(), progress=False)
    cov = gm.meta["egp_coverage"]
    assert (cov.run, cov.analysed, cov.unanalysed, cov.others) == (1, 1, 0, 2)
    assert [(h.path, h.what, h.kinds, h.reason) for h in cov.other] == [
        ("3", "Sigmoid", {"sigmoid": 1}, activations.OTHERS["sigmoid"].reason),
        ("5", "Softmax", {"softmax": 1}, activations.OTHERS["softmax"].reason)]
    assert cov.describe().endswith(
        "; 2 call(s) of activations without exact regions: 3 (Sigmoid): smooth: affine nowhere, "
        "and constant only to rounding far in its tails; 5 (Softmax): not element-wise: each "
        "output depends on the whole row")


def test_classifier_names_every_kind_spelling():
    """Module, function, aten and method spellings of the new kinds classify as that kind."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((4,), 0.2))

        def forward(self, x):
            return (F.elu(x) + F.celu(x) + F.selu(x) + F.softplus(x) + F.mish(x)
                    + F.hardshrink(x) + F.softshrink(x) + F.threshold(x, 0.1, 0.0)
                    + F.rrelu(x) + F.prelu(x, self.w) + x.hardshrink())

    gm = torch.fx.symbolic_trace(Net().eval())
    ops = Ops(gm)
    kinds = [ops(n).kind for n in gm.graph.nodes if ops(n).is_activation]
    assert kinds == ["elu", "celu", "selu", "softplus", "mish", "hardshrink", "softshrink",
                     "threshold", "rrelu", "prelu", "hardshrink"]
    ep = torch.export.export(Net().eval(), (torch.randn(2, 4),), strict=False)
    aten_gm = ep.run_decompositions({}).module()
    ops = Ops(aten_gm)
    kinds = {ops(n).kind for n in aten_gm.graph.nodes if ops(n).is_activation}
    assert kinds == {"elu", "celu", "selu", "softplus", "mish", "threshold", "rrelu", "prelu"}


# ----------------------------------------------------------------------------- margins

def _paths(fn, z):
    strided = torch.empty(2 * len(z))[::2]
    strided.copy_(z)
    return fn(z), fn(strided)


def _beyond(x: float, n: int) -> torch.Tensor:
    """x and the n - 1 float32 values after it, away from zero."""
    i = int(torch.tensor([x], dtype=torch.float32).view(torch.int32))
    return torch.arange(i, i + n, dtype=torch.int32).view(torch.float32)


SMOOTH = [("elu", lambda z: F.elu(z), *activations.ELU_TAILS[(1.0, 1.0, 1.0)][::-1], None),
          ("selu", lambda z: F.selu(z),
           *activations.ELU_TAILS[(activations.SELU_ALPHA, activations.SELU_SCALE, 1.0)][::-1],
           None),
          ("softplus", lambda z: F.softplus(z), 0.0, *activations.SOFTPLUS_MARGINS[(1.0, 20.0)]),
          ("mish", F.mish, 0.0, *activations.MISH_MARGINS)]


@pytest.mark.parametrize("name, fn, const, lo, hi", SMOOTH, ids=[s[0] for s in SMOOTH])
def test_margins_hold_beyond_and_are_tight(name, fn, const, lo, hi):
    """Beyond each margin the map holds for 2^16 float32 values in both CPU loops; the float32
    just inside it breaks it in one of them."""
    tol = margins.ROUNDOFF * max(1.0, abs(const))
    far = _beyond(lo, 2 ** 16)
    assert all(bool(((y.double() - const).abs() <= tol).all()) for y in _paths(fn, far))
    inside = _beyond(margins._next(lo, 0.0), 1024)    # the first in the vectorised body
    assert any(bool((y[0].double() - const).abs() > tol) for y in _paths(fn, inside))
    if hi is not None:
        far = _beyond(hi, 2 ** 16)
        assert all(bool((y == far).all()) for y in _paths(fn, far))
        inside = _beyond(margins._next(hi, 0.0), 1024)
        assert any(bool(y[0] != inside[0]) for y in _paths(fn, inside))


@pytest.mark.slow
def test_default_margins_are_what_the_scan_finds_and_hold_exhaustively():
    assert margins.elu_tail(1.0, 1.0, 1.0) == activations.ELU_TAILS[(1.0, 1.0, 1.0)]
    key = (activations.SELU_ALPHA, activations.SELU_SCALE, 1.0)
    assert margins.elu_tail(*key) == activations.ELU_TAILS[key]
    assert margins.softplus_margins(1.0, 20.0) == activations.SOFTPLUS_MARGINS[(1.0, 20.0)]
    assert margins.mish_margins() == activations.MISH_MARGINS
    for _, fn, const, lo, hi in SMOOTH:       # every float32 in [-64, lo] and [hi, 64]
        tol = margins.ROUNDOFF * max(1.0, abs(const))
        for chunk in margins._between(lo, -64.0).split(2 ** 22):
            assert all(bool(((y.double() - const).abs() <= tol).all())
                       for y in _paths(fn, chunk))
        if hi is not None:
            for chunk in margins._between(hi, 64.0).split(2 ** 22):
                assert all(bool((y == chunk).all()) for y in _paths(fn, chunk))
