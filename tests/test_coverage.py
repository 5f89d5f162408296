"""Activation coverage: what runs is analysed, or the node hiding it is named with its reason.

Also the module swaps that make timm's fused norm+activation modules visible (norm_act.py) and
the runtime asserts dropped from fx graphs.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from timm.layers import (
    BatchNormAct2d,
    FrozenBatchNormAct2d,
    GroupNorm1Act,
    GroupNormAct,
    LayerNormAct,
)
from timm.layers.norm_act import convert_sync_batchnorm
from torch import nn

import egp_fx
from egp_fx.capture import COVERAGE_META_KEY, LEAF_MODULES
from egp_fx.capture.fx_trace import WRAPPED_FUNCTIONS
from egp_fx.capture.norm_act import NormAct, split_of
from egp_fx.testing.planting import realistic_bn


class Hidden(nn.Module):
    """Two ReLUs behind a conv: the block a test registers as a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return torch.relu(self.conv(self.act(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.block = Hidden()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.act(self.bn(self.conv(x)))).mean((2, 3)))


def _data(n=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, side, side, generator=g) for _ in range(n)]


@pytest.fixture
def hidden_leaf():
    LEAF_MODULES[Hidden] = "kept whole for this test"
    yield
    del LEAF_MODULES[Hidden]


def test_a_leaf_hiding_activations_is_counted_warned_about_and_in_the_table(hidden_leaf, caplog):
    torch.manual_seed(0)
    model = realistic_bn(Net()).eval()
    with caplog.at_level(logging.WARNING, logger="egp_fx"):
        gm = egp_fx.compress(model, _data(), progress=False)
    report = egp_fx.report_of(gm)
    cov = report.coverage
    assert (cov.run, cov.analysed, cov.unanalysed) == (3, 1, 2)
    [h] = cov.hidden
    assert (h.node, h.path, h.what, h.count, h.kinds) == ("block", "block", "Hidden", 2, {"relu": 2})
    assert h.reason == "Hidden is a registered leaf module (kept whole for this test)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["2 of 3 activation calls that run are not analysed (their units are kept "
                        "as they are): 2 activation call(s) inside block (Hidden) not analysed: "
                        "Hidden is a registered leaf module (kept whole for this test)"]
    table = egp_fx.inspect(gm).table
    rows = {r.node: r for r in table}
    assert rows["block"].category == "not analysed"
    assert rows["block"].reason.startswith("2 activation call(s) inside block (Hidden) not analysed")
    assert table.counts()["not analysed"] == 1
    assert 'class="d-not-analysed"' in table.to_html()
    assert report.to_dict()["coverage"]["unanalysed"] == 2
    assert "not analysed" in report.summary()


def test_compress_of_a_calibrated_graph_warns_again(hidden_leaf, caplog):
    model = Net().eval()
    gm = egp_fx.calibrate(model, _data(), progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="egp_fx"):
        egp_fx.compress(model, _data(), calibrated=gm, progress=False)
    assert sum("activation calls that run are not analysed" in r.getMessage()
               for r in caplog.records) == 1


def test_a_fully_covered_model_gives_no_warning_and_no_table_row(caplog):
    model = Net().eval()
    with caplog.at_level(logging.WARNING, logger="egp_fx"):
        gm = egp_fx.compress(model, _data(), progress=False)
    cov = egp_fx.report_of(gm).coverage
    assert (cov.run, cov.analysed, cov.hidden) == (3, 3, [])
    assert not [r for r in caplog.records if "not analysed" in r.getMessage()]
    assert egp_fx.inspect(gm).table.counts()["not analysed"] == 0
    assert "not analysed" not in egp_fx.report_of(gm).summary()


class EveryKind(nn.Module):
    """One call of every activation kind activations.py knows, each spelled as a module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-2.0, 2.0), nn.LeakyReLU(),
                                   nn.GELU(), nn.SiLU(), nn.Hardsigmoid(), nn.Hardswish()])

    def forward(self, x):
        z = self.conv(x)
        return sum(act(z) for act in self.acts)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_every_activation_kind_is_counted_where_it_runs(capture):
    gm = egp_fx.calibrate(EveryKind().eval(), _data(), progress=False, capture_mode=capture)
    cov = gm.meta[COVERAGE_META_KEY]
    assert (cov.run, cov.analysed, cov.hidden) == (8, 8, [])


class PermuteThenView(nn.Module):
    """A view that needs the contiguous() before it (timm's SpaceToDepth, MaxViT's windows)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4 * 16 * 16, 2)

    def forward(self, x):
        z = torch.relu(self.conv(x)).permute(0, 2, 3, 1).contiguous()
        return self.head(z.view(z.shape[0], -1))


def test_shapes_propagate_through_contiguous_before_a_view():
    gm = egp_fx.calibrate(PermuteThenView().eval(), _data(), progress=False, capture_mode="fx")
    assert gm.meta[COVERAGE_META_KEY].run == 1
    assert [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.name == "view"] == \
        [torch.Size([2, 1024])]


def relu_twice(x):      # no leading underscore: fx does not autowrap private names
    return torch.relu(x) + torch.nn.functional.relu(-x)


class WithFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return relu_twice(self.conv(x))


def test_a_wrapped_function_hiding_activations_is_named_with_its_reason():
    WRAPPED_FUNCTIONS[relu_twice] = "control flow on tensor values (test)"
    try:
        gm = egp_fx.calibrate(WithFunction().eval(), _data(1), progress=False)
    finally:
        del WRAPPED_FUNCTIONS[relu_twice]
    cov = gm.meta[COVERAGE_META_KEY]
    [h] = cov.hidden
    assert (cov.run, cov.analysed, h.what, h.count, h.path) == (2, 0, "relu_twice", 2, "")
    assert h.reason == "control flow on tensor values (test)"


class WithEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="relu")
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.encoder(self.proj(x)))


def test_a_torch_nn_module_fx_keeps_whole_is_named():
    torch.manual_seed(0)
    gm = egp_fx.calibrate(WithEncoder().eval(), [torch.randn(5, 2, 8)], capture_mode="fx",
                          progress=False)
    cov = gm.meta[COVERAGE_META_KEY]
    [h] = cov.hidden
    assert (cov.run, cov.analysed, h.path, h.count, h.kinds) == (2, 1, "encoder", 1, {"relu": 1})
    assert h.reason == ("torch.fx keeps torch.nn modules whole "
                        "(torch.nn.modules.transformer.TransformerEncoderLayer)")


def test_through_torch_export_a_leaf_hides_nothing(hidden_leaf):
    gm = egp_fx.calibrate(Net().eval(), _data(), capture_mode="export", progress=False)
    cov = gm.meta[COVERAGE_META_KEY]
    assert (cov.run, cov.analysed, cov.hidden) == (3, 3, [])
    assert {str(n.target) for n in gm.graph.nodes if "egp" in n.meta} == {"aten.relu.default"}


# ---------------------------------------------------------------- norm + activation splits

def _check_split(mod: nn.Module, x: torch.Tensor, norm_type: type, act_type: type) -> NormAct:
    mod.eval()
    with torch.no_grad():
        ref = mod(x)
    new = split_of(mod)
    assert isinstance(new, NormAct) or isinstance(new, norm_type)
    norm = new.norm if isinstance(new, NormAct) else new
    assert type(norm) is norm_type
    if isinstance(new, NormAct):
        assert type(new.act) is act_type and new.act is mod.act
    shared = {t.data_ptr() for t in list(mod.parameters()) + list(mod.buffers())}
    mine = {t.data_ptr() for t in list(norm.parameters()) + list(norm.buffers())}
    assert mine and mine <= shared                  # nothing copied
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref, rtol=1e-6, atol=1e-6)
    return new


def _stats(m):
    realistic_bn(m) if isinstance(m, nn.BatchNorm2d) else None
    return m


@pytest.mark.parametrize("make, norm_type, act_type", [
    (lambda: _stats(BatchNormAct2d(8, act_layer=nn.ReLU6)), nn.BatchNorm2d, nn.ReLU6),
    (lambda: convert_sync_batchnorm(_stats(BatchNormAct2d(8, act_layer=nn.SiLU))),
     nn.BatchNorm2d, nn.SiLU),
    (lambda: FrozenBatchNormAct2d(8, act_layer=nn.GELU), nn.BatchNorm2d, nn.GELU),
    (lambda: GroupNormAct(8, num_groups=4, act_layer=nn.Hardswish), nn.GroupNorm, nn.Hardswish),
    (lambda: GroupNorm1Act(8, act_layer=nn.ReLU), nn.GroupNorm, nn.ReLU),
    (lambda: torchvision.ops.FrozenBatchNorm2d(8), nn.BatchNorm2d, None),
], ids=["BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "GroupNormAct",
        "GroupNorm1Act", "FrozenBatchNorm2d"])
def test_norm_act_split_computes_the_same_with_the_same_tensors(make, norm_type, act_type):
    torch.manual_seed(0)
    mod = make()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(mod, name, None)
            if t is not None:
                t.copy_(torch.randn_like(t))
    _check_split(mod, torch.randn(2, 8, 5, 5), norm_type, act_type)


def test_layer_norm_act_split():
    mod = LayerNormAct(8, act_layer=nn.GELU)
    _check_split(mod, torch.randn(2, 3, 8), nn.LayerNorm, nn.GELU)


def test_what_is_not_split():
    class Mine(BatchNormAct2d):                     # a subclass may compute something else
        pass

    assert split_of(Mine(8)) is None
    assert split_of(BatchNormAct2d(8).train()) is None
    fast = GroupNormAct(8, num_groups=4)
    fast._fast_norm = True
    assert split_of(fast) is None
    assert split_of(nn.BatchNorm2d(8).eval()) is None


def test_split_leaves_the_model_alone_and_folds_frozen_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNormAct2d(8, act_layer=nn.ReLU),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].bias.copy_(torch.randn(8))
        model[1].bias[[1, 5]] = -30.0
        model[1].weight[[1, 5]] = 0.0
    gm = egp_fx.compress(model, _data(), channel_multiple=1, progress=False)
    assert isinstance(model[1], FrozenBatchNormAct2d)           # the caller's model untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert [m.weight.shape[0] for m in gm.modules() if isinstance(m, nn.Conv2d)] == [6, 4]
    with torch.no_grad():
        for x in _data(seed=3):
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- asserts in fx graphs

class Asserting(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.in_place = in_place

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, f"expected 4D input (got {y.ndim}D input)")
        z = self.bn(y)
        if self.in_place:
            z.relu_()                               # in place, result unused: must stay
            return z
        return torch.relu(z)


def test_asserts_are_dropped_so_batch_norm_folds():
    torch.manual_seed(0)
    model = realistic_bn(Asserting(in_place=False)).eval()
    x = _data(1)[0]
    gm = egp_fx.trace(model, x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.relu]
    small = egp_fx.compress(model, [x], progress=False)
    assert [rw.kind for rw in egp_fx.report_of(small).applied if rw.pass_name == "fold_bn"] \
        == ["fold_bn"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


def test_dropping_asserts_keeps_in_place_ops_whose_result_is_unused():
    model = realistic_bn(Asserting(in_place=True)).eval()
    x = _data(1)[0]
    gm = egp_fx.trace(model, x)
    assert not [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["relu_"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class PermuteView(nn.Module):
    """conv -> permute -> reshape, as timm's cpubone attention writes its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)                                     # N, 4, H, W
        n, c, h, w = y.shape
        y = y.view(n, c, h * w).permute(0, 2, 1).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return self.act(y)


def test_export_graph_has_reshape_not_view_and_runs_on_a_batch_of_one():
    torch.manual_seed(0)
    model = PermuteView().eval()
    gm = egp_fx.trace(model, torch.randn(2, 3, 4, 4), capture="export")
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "aten.view.default" not in targets and "aten._unsafe_view.default" not in targets
    assert "aten.reshape.default" in targets
    for batch in (1, 3):
        x = torch.randn(batch, 3, 4, 4)
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))
