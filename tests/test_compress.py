"""compress(): planted models end to end -- exact outputs, the expected structure, no mutation."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import egp_fx
from egp_fx.deploy.onnx import export_onnx
from egp_fx.errors import CompressError
from egp_fx.ir.layer import Layer, layer_of
from egp_fx.ir.ops import Ops, Role
from egp_fx.passes.reasons import Reason
from egp_fx.testing.planting import (
    fit_bn_statistics,
    plant_constant,
    plant_dead,
    plant_linear,
    plant_zero_branch,
    realistic_bn,
)


def _data(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _assert_same_function(model, gm, batches, tol=1e-5):
    """Outputs equal to within tol relative to the output scale, on every batch.

    Checked in float64 on copies, so float32 rounding through deep nets does not blur the check;
    and in float32 as deployed with a tolerance 10x looser.
    """
    for dtype, t in ((torch.float64, tol), (torch.float32, 10 * tol)):
        m, g = copy.deepcopy(model).to(dtype), copy.deepcopy(gm).to(dtype)
        with torch.no_grad():
            for x in batches:
                ref, out = m(x.to(dtype)), g(x.to(dtype))
                scale = float(ref.abs().max())
                torch.testing.assert_close(out, ref, rtol=0, atol=t * scale)


def _assert_exports(gm, x, tmp_path):
    """The compressed module exports to ONNX and onnxruntime agrees with torch (batch of 2).

    Tolerance: 1e-4 of the output scale (onnxruntime and torch round differently through a
    50-layer random network; the same holds for the uncompressed model).
    """
    with torch.no_grad():
        scale = max(float(gm(x[:2]).abs().max()), 1e-3)
    res = export_onnx(gm, tmp_path / "compressed.onnx", x[:2])
    assert res.path.exists() and res.max_rel_err <= 1e-4 and res.max_abs_err <= 1e-4 * scale


def _modules_called(gm, cls):
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


def _layers(gm) -> dict[str, Layer]:
    """Module path -> Layer view of every conv/linear call, whatever the capture."""
    return {lay.path: lay for n in gm.graph.nodes if (lay := layer_of(gm, n)) is not None}


def _norms(gm) -> int:
    ops = Ops(gm)
    return sum(ops(n).role is Role.NORM for n in gm.graph.nodes)


def _decided(report, path) -> list[str]:
    return [str(d) for d in report.decisions_by_path().get(path, [])]


CAPTURES = pytest.mark.parametrize("capture", ["auto", "export"])


def _unchanged(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@CAPTURES
def test_resnet18_dead_blocks_dead_channels_linear_relus(tmp_path, capture):
    torch.manual_seed(0)
    model = realistic_bn(torchvision.models.resnet18(num_classes=10))
    calib, fresh = _data(3, (8, 3, 64, 64)), _data(2, (8, 3, 64, 64), seed=1)
    plant_zero_branch(model.layer1[1])                       # dead blocks: branch adds 0
    plant_zero_branch(model.layer3[1])
    plant_dead(model.layer2[0].bn1, range(1, 41, 2))         # 20 dead channels: 16 removed
    plant_constant(model.layer4[1].bn2, range(512), 1.0)     # relu(x + 1), x >= 0: linear ReLU
    fit_bn_statistics(model, calib)
    state = copy.deepcopy(model.state_dict())

    gm = egp_fx.compress(model, calib, capture=capture, progress=False)
    report = egp_fx.report_of(gm)

    assert report.capture.mode == ("fx" if capture == "auto" else "export")
    _assert_same_function(model, gm, calib + fresh)
    _assert_exports(gm, calib[0], tmp_path)
    assert _unchanged(model, state)
    convs = [p for p, lay in _layers(gm).items() if not lay.is_linear]
    assert not [c for c in convs if c.startswith(("layer1.1.", "layer3.1.", "layer4.1."))]
    assert len(convs) == 20 - 6
    layers = _layers(gm)
    assert layers["layer2.0.conv1"].out_channels == 112    # a multiple of 16
    assert layers["layer2.0.conv2"].in_channels == 112
    assert _norms(gm) == 0
    assert "narrowed 128 -> 112" in _decided(report, "layer2.0.relu")
    assert _decided(report, "layer4.1.relu") == ["removed (input is non-negative)"]
    assert (report.before.weighted_depth, report.after.weighted_depth) == (18, 12)
    assert (report.before.nonlinear_depth, report.after.nonlinear_depth) == (17, 11)
    assert report.after.params < report.before.params and report.after.flops < report.before.flops
    assert report.max_error <= 1e-5 and not report.rolled_back


def test_resnet50_bottlenecks(tmp_path):
    torch.manual_seed(0)
    model = realistic_bn(torchvision.models.resnet50(num_classes=10))
    calib = _data(2, (4, 3, 64, 64))
    block = model.layer2[1]
    plant_dead(block.bn1, range(block.bn1.num_features))      # whole bottleneck dead ...
    plant_constant(block.bn3, range(block.bn3.num_features), 0.0)   # ... adding exactly 0
    plant_dead(model.layer3[0].bn2, range(0, 32, 2))          # 3x3 -> relu -> 1x1 conv3
    fit_bn_statistics(model, calib)
    state = copy.deepcopy(model.state_dict())

    gm = egp_fx.compress(model, calib, progress=False)

    _assert_same_function(model, gm, calib + _data(1, (4, 3, 64, 64), seed=3))
    _assert_exports(gm, calib[0], tmp_path)
    assert _unchanged(model, state)
    assert not [c for c in _modules_called(gm, nn.Conv2d) if c.startswith("layer2.1.")]
    assert gm.get_submodule("layer3.0.conv2").out_channels == 240
    assert gm.get_submodule("layer3.0.conv3").in_channels == 240
    report = egp_fx.report_of(gm)
    assert (report.before.weighted_depth, report.after.weighted_depth) == (50, 47)
    assert not report.rolled_back


@CAPTURES
def test_mobilenet_v2_relu6_through_depthwise(tmp_path, capture):
    torch.manual_seed(0)
    model = realistic_bn(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10))
    calib = _data(2, (4, 3, 64, 64))
    expand_bn = model.features[2].conv[0][1]                  # 1x1 expand -> BN -> ReLU6 -> dw 3x3
    plant_dead(expand_bn, [0, 1, 2, 10, 11, 12, 20, 30, 31, 32, 33, 34, 40, 41, 42, 47])
    fit_bn_statistics(model, calib)
    c = expand_bn.num_features

    gm = egp_fx.compress(model, calib, capture=capture, progress=False)

    _assert_same_function(model, gm, calib + _data(1, (4, 3, 64, 64), seed=4))
    _assert_exports(gm, calib[0], tmp_path)
    layers = _layers(gm)
    assert layers["features.2.conv.0.0"].out_channels == c - 16
    dw = layers["features.2.conv.1.0"]
    assert dw.groups == dw.in_channels == dw.out_channels == c - 16
    assert layers["features.2.conv.2"].in_channels == c - 16
    assert not egp_fx.report_of(gm).rolled_back


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8).eval()


@CAPTURES
def test_vit_mlp_dead_units_shrink_fc1_and_fc2(tmp_path, capture):
    model = _vit()
    fc1 = model.blocks[2].mlp.fc1
    with torch.no_grad():
        fc1.weight[list(range(3, 768, 48))] = 0.0              # 16 units
        fc1.bias[list(range(3, 768, 48))] = -10.0
    calib = _data(2, (4, 3, 32, 32))
    gm = egp_fx.compress(model, calib, capture=capture, progress=False)
    _assert_same_function(model, gm, calib + _data(1, (4, 3, 32, 32), seed=5))
    _assert_exports(gm, calib[0], tmp_path)
    layers = _layers(gm)
    assert layers["blocks.2.mlp.fc1"].out_channels == 752
    assert layers["blocks.2.mlp.fc2"].in_channels == 752
    report = egp_fx.report_of(gm)
    assert _decided(report, "blocks.2.mlp.act") == ["narrowed 768 -> 752"]
    assert not report.rolled_back and report.max_error <= 1e-5


@CAPTURES
def test_vit_mlp_with_all_units_linear_becomes_one_linear(tmp_path, capture):
    model = _vit()
    fc1 = model.blocks[4].mlp.fc1
    with torch.no_grad():   # LayerNorm output is bounded: |W x| <= 2.7 < 20 - 5.3
        fc1.weight.copy_(torch.randn_like(fc1.weight).clamp(-1, 1) * 1e-3)
        fc1.bias.fill_(20.0)
    calib = _data(2, (4, 3, 32, 32))
    gm = egp_fx.compress(model, calib, capture=capture, progress=False)
    _assert_same_function(model, gm, calib + _data(1, (4, 3, 32, 32), seed=6), tol=1e-5)
    _assert_exports(gm, calib[0], tmp_path)
    block4 = [lay for p, lay in _layers(gm).items() if p.startswith("blocks.4.mlp")]
    assert len(block4) == 1
    assert block4[0].is_linear and tuple(block4[0].weight.shape) == (192, 192)
    report = egp_fx.report_of(gm)
    assert _decided(report, "blocks.4.mlp.act") == ["linearised"]
    assert not report.rolled_back and report.max_error <= 1e-5


def test_swin_dead_mlp_units_through_torch_export(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    fc1 = model.features[1][0].mlp[0]                        # Linear 96 -> 384, GELU after it
    with torch.no_grad():
        fc1.weight[list(range(0, 384, 12))] = 0.0           # 32 units far below GELU's margin
        fc1.bias[list(range(0, 384, 12))] = -10.0
    calib = _data(2, (2, 3, 64, 64))
    gm = egp_fx.compress(model, calib, capture="export", progress=False)
    _assert_same_function(model, gm, calib + _data(1, (2, 3, 64, 64), seed=9))
    layers = _layers(gm)
    assert layers["features.1.0.mlp.0"].out_channels == 352
    assert layers["features.1.0.mlp.3"].in_channels == 352
    assert _decided(egp_fx.report_of(gm), "features.1.0.mlp.1") == ["narrowed 384 -> 352"]


class _Custom(nn.Module):
    """Functional activations, a reused ReLU, a concat and a LeakyReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.bn_c = nn.BatchNorm2d(8)
        self.leaky = nn.LeakyReLU(0.1)
        self.d = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.relu(self.bn_a(self.a(x)))
        b = F.relu(self.bn_b(self.b(x)))
        y = torch.cat([a, b], dim=1)
        y = self.leaky(self.bn_c(self.c(y)))
        y = self.relu(self.d(y))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_custom_net_functional_reused_concat_leaky(tmp_path):
    torch.manual_seed(0)
    model = realistic_bn(_Custom())
    calib = _data(2, (4, 3, 16, 16))
    plant_dead(model.bn_a, [1])             # through the concat: c loses input channel 1
    plant_dead(model.bn_b, [0, 7])          # c loses input channels 8 and 15
    plant_linear(model.bn_c, range(8), -2.0)     # LeakyReLU all on its negative side: 0.1*z
    fit_bn_statistics(model, calib)
    model.eval()
    gm = egp_fx.compress(model, calib, channel_multiple=1, progress=False)
    _assert_same_function(model, gm, calib + _data(1, (4, 3, 16, 16), seed=7))
    _assert_exports(gm, calib[0], tmp_path)
    decisions = egp_fx.report_of(gm).decisions()
    assert str(decisions["relu"]) == "narrowed 8 -> 7" and str(decisions["relu_1"]) == "narrowed 8 -> 6"
    assert str(decisions["leaky"]) == "linearised"
    assert gm.get_submodule("a").out_channels == 7 and gm.get_submodule("b").out_channels == 6
    assert not egp_fx.report_of(gm).rolled_back


class _ConcatLive(nn.Module):
    """Two branches concatenated, then a live 1x1 and 3x3 conv that read every channel."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.c, self.bn_c = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.d = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], dim=1)
        z = torch.cat([F.relu(self.bn_c(self.c(y))), self.d(y)], dim=1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def test_concat_offsets_reach_live_channel_sensitive_consumers(tmp_path):
    """Dead channels on both sides of a concat leave exactly their columns of both readers."""
    torch.manual_seed(0)
    model = realistic_bn(_ConcatLive())
    calib = _data(2, (4, 3, 12, 12))
    plant_dead(model.bn_a, [0, 5])
    plant_dead(model.bn_b, [2, 3, 7])
    fit_bn_statistics(model, calib)
    with torch.no_grad():
        reference = model.c.weight.detach().clone(), model.d.weight.detach().clone()
    gm = egp_fx.compress(model, calib, channel_multiple=1, progress=False)
    report = egp_fx.report_of(gm)
    _assert_same_function(model, gm, calib + _data(1, (4, 3, 12, 12), seed=8), tol=1e-6)
    kept = [1, 2, 3, 4, 6, 7, 8, 9, 12, 13, 14]
    assert gm.get_submodule("c").in_channels == gm.get_submodule("d").in_channels == 11
    bn_scale = model.bn_c.weight / torch.sqrt(model.bn_c.running_var + model.bn_c.eps)
    torch.testing.assert_close(gm.get_submodule("c").weight.detach(),
                               reference[0][:, kept] * bn_scale.detach().view(-1, 1, 1, 1),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gm.get_submodule("d").weight.detach(), reference[1][:, kept],
                               rtol=0, atol=0)
    assert not report.rolled_back


def test_nothing_planted_changes_only_batchnorm_folding():
    torch.manual_seed(0)
    model = realistic_bn(torchvision.models.resnet18(num_classes=10))
    calib = _data(2, (8, 3, 64, 64))
    fit_bn_statistics(model, calib)
    gm = egp_fx.compress(model, calib, progress=False)
    report = egp_fx.report_of(gm)
    assert {r.kind for r in report.applied} == {"fold_bn"} and not report.rolled_back
    assert len(report.applied) == 20
    assert report.after.weighted_depth == report.before.weighted_depth == 18
    assert report.after.nonlinear_depth == 17
    _assert_same_function(model, gm, calib)


class _Two3x3(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)     # 4 -> 16 -> 4: a merged 5x5 4 -> 4 conv
        self.bn = nn.BatchNorm2d(16)                 # has fewer FLOPs than the pair
        self.c2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


def _two3x3():
    torch.manual_seed(0)
    model = _Two3x3()
    with torch.no_grad():
        model.c1.weight.abs_()
        model.bn.weight.fill_(1e-3)
        model.bn.bias.fill_(5.0)        # every pre-activation ~5: the ReLU is linear
    return model.eval()


def test_approximate_fold_only_when_asked():
    model = _two3x3()
    calib = [torch.rand(2, 4, 8, 8) for _ in range(2)]
    exact = egp_fx.report_of(egp_fx.compress(model, calib, progress=False))
    assert exact.after.weighted_depth == 2 and exact.after.nonlinear_depth == 0
    assert [(r.code, r.details["what"]) for r in exact.refusals
            if r.code is Reason.CHAIN_APPROXIMATE] == [(Reason.CHAIN_APPROXIMATE, "3x3 o 3x3 -> 5x5")]
    gm = egp_fx.compress(model, calib, allow_approximate=True, approx_tolerance=1.0,
                         progress=False)
    approx = egp_fx.report_of(gm)
    merged = [r for r in approx.applied if not r.exact]
    assert [r.kind for r in merged] == ["kxk_o_kxk"] and approx.after.weighted_depth == 1
    with torch.no_grad():   # the error recorded is the error of the merged model, measured here
        worst = max(float((gm(x) - model(x)).abs().max()) for x in calib)
        scale = max(float(model(x).abs().max()) for x in calib)
    assert 1e-4 < worst / scale < 1.0
    assert merged[0].error == pytest.approx(worst / scale, rel=1e-3)
    assert approx.max_error == pytest.approx(worst / scale, rel=1e-3)
    tight = egp_fx.report_of(egp_fx.compress(model, calib, allow_approximate=True,
                                             approx_tolerance=worst / scale / 2, progress=False))
    assert [r.status for r in tight.rewrites if not r.exact] == ["rolled back"]
    assert tight.after.weighted_depth == 2


def test_rewrite_beyond_tolerance_is_rolled_back():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x)))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.l1.weight[2] = torch.tensor([1.0, 1.0, 1.0, 1.0])
        model.l1.bias[2] = 0.0
    calib = [-torch.rand(8, 4)]               # unit 2 never fires here ...
    holdout = [torch.rand(8, 4)]              # ... but does here
    gm = egp_fx.compress(model, calib, holdout_loader=holdout, progress=False)
    report = egp_fx.report_of(gm)
    assert [r.key for r in report.rolled_back if r.kind == "narrow_channels"] == ["relu"]
    assert [r.key for r in report.refusals if r.code is Reason.ROLLED_BACK] == ["relu"]
    (entry,) = [r for r in report.to_dict()["refusals"] if r["code"] == "rolled_back"]
    verdict = entry["details"]["verdict"]               # JSON: the code, the facts and the text
    assert (verdict["code"], verdict["details"]["bound"]) == ("beyond_tolerance", 1e-5)
    assert entry["reason"] == "rolled back: " + verdict["text"]
    assert entry["reason"].startswith("rolled back: output error ")
    assert gm.get_submodule("l1").out_features == 6
    _assert_same_function(model, gm, calib + holdout)


def test_dead_channels_keep_widths_a_multiple_of_sixteen():
    model = _Leakyless()
    plant_dead(model.bn, [0, 1, 2])                    # 32 -> 29 would be padded back to 32
    calib = _data(2, (2, 3, 8, 8))
    kept = egp_fx.report_of(egp_fx.compress(model, calib, progress=False))
    assert [r.details for r in kept.refusals if r.code is Reason.DC_ABOVE_MULTIPLE] == [
        {"removable": 3, "multiple": 16}]
    assert not [r for r in kept.applied if r.kind == "narrow_channels"]
    plant_dead(model.bn, range(3, 17))                 # 17 dead: 32 -> 16, one dead one kept
    gm = egp_fx.compress(model, calib, progress=False)
    assert gm.get_submodule("conv").out_channels == 16
    assert str(egp_fx.report_of(gm).decisions()["relu"]) == "narrowed 32 -> 16"
    exact = egp_fx.compress(model, calib, channel_multiple=1, progress=False)
    assert exact.get_submodule("conv").out_channels == 15


class _Leakyless(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.relu = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()
        self.head = nn.Conv2d(32, 4, 1)
        self.eval()

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))


def test_unknown_pass_and_bad_cost_model():
    with pytest.raises(CompressError, match="unknown pass"):
        egp_fx.compress(_two3x3(), [torch.rand(1, 4, 8, 8)], passes=("nope",), progress=False)
    with pytest.raises(CompressError, match="cost must be 'flops' or 'latency'"):
        egp_fx.compress(_two3x3(), [torch.rand(1, 4, 8, 8)], cost="time", progress=False)
    with pytest.raises(CompressError, match="unknown target"):
        egp_fx.compress(_two3x3(), [torch.rand(1, 4, 8, 8)], target="tpu", progress=False)
