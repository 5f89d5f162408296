"""timm as users run it: every activation seen, fused norm+act modules compressed exactly.

The families that hid all or part of their activations inside timm's fused norm+activation
modules (BatchNormAct2d, ...) run here as tiny members of the same model classes
(timm_models.py), with dead units planted before every activation
(egp_fx.testing.planting.plant_dead_units: every 4th channel of the BatchNorm or layer writing
its input is constant). Each must
- analyse every activation call that runs (a dispatch-level count on the model itself),
- compress exactly on the calibration data (float64 check; random weights leave some units
  dead on these few samples only, so other inputs may differ),
- shrink: fewer parameters, and a planted activation narrowed by exactly its planted channels.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from timm_models import FAMILIES
from torch import nn

import egp_fx
from egp_fx.capture.coverage import ActivationCounter
from egp_fx.testing.planting import (
    fit_bn_statistics,
    plant_dead_units,
    plant_norm_act,
    realistic_bn,
)


def _data(n, side, seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, side, side, generator=g) for _ in range(n)]


def _assert_same_function(model, gm, batches, tol=1e-5):
    """Outputs equal within tol of the output scale, in float64 (on copies) and, 10x looser,
    in float32 as deployed (as tests/test_compress.py)."""
    for dtype, t in ((torch.float64, tol), (torch.float32, 10 * tol)):
        m, g = copy.deepcopy(model).to(dtype), copy.deepcopy(gm).to(dtype)
        with torch.no_grad():
            for x in batches:
                ref, out = m(x.to(dtype)), g(x.to(dtype))
                torch.testing.assert_close(out, ref, rtol=0, atol=t * float(ref.abs().max()))


def _run_count(model, x) -> int:
    counter = ActivationCounter()
    with torch.no_grad(), counter:
        model(x[:1])
    return counter.total


def _planted(family: str, by_modules: bool = False):
    factory, side = FAMILIES[family]
    torch.manual_seed(0)
    model = realistic_bn(factory().eval())
    calib = _data(2, side)
    planted = plant_norm_act(model) if by_modules else plant_dead_units(model, calib[0])
    fit_bn_statistics(model, calib)          # planted channels stay constant (scale 0)
    return model, calib, planted


def _narrowed(report, path) -> list[str]:
    return [str(d) for d in report.decisions_by_path().get(path, [])]


# family: (activation calls, capture, planted activation -> its decision)
EXPECTED = {
    "mobilenetv2": (35, "fx", {"bn1.act": "narrowed 16 -> 12",
                               "blocks.2.1.bn1.act": "narrowed 96 -> 72",
                               "blocks.4.1.bn1.act": "narrowed 192 -> 144"}),
    "densenet": (11, "fx", {"features.denseblock1.denselayer2.norm2.act": "narrowed 32 -> 24",
                            "features.denseblock2.denselayer1.norm2.act": "narrowed 32 -> 24"}),
    "resnetv2": (7, "fx", {"stages.0.blocks.0.norm2.act": "narrowed 8 -> 6",
                           "stages.1.blocks.0.norm3.act": "narrowed 16 -> 12"}),
    "darknet": (7, "fx", {"stem.conv1.bn.act": "narrowed 16 -> 12",
                          "stages.1.blocks.0.conv1.bn.act": "narrowed 32 -> 24"}),
    "dpn": (18, "fx", {"features.conv2_1.c3x3_b.bn.act": "narrowed 16 -> 12",
                       "features.conv5_1.c1x1_c.bn.act": "narrowed 128 -> 96"}),
    "mobilevit": (10, "export", {"stages.0.0.conv1_1x1.bn.act": "narrowed 16 -> 12",
                                 "stages.1.1.transformer.0.mlp.act": "narrowed 32 -> 24"}),
    "efficientnet": (11, "fx", {"blocks.1.0.bn1.act": "narrowed 64 -> 48",
                                "bn2.act": "narrowed 256 -> 192"}),
    "regnety": (17, "fx", {"stem.bn.act": "narrowed 32 -> 24",
                           "s4.b1.se.act": "narrowed 8 -> 6"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_sees_every_activation_and_compresses_planted_units_exactly(family):
    calls, capture, decisions = EXPECTED[family]
    model, calib, planted = _planted(family, by_modules=capture == "export")   # one export
    assert _run_count(model, calib[0]) == calls
    params = sum(p.numel() for p in model.parameters())

    gm = egp_fx.compress(model, calib, channel_multiple=1, progress=False)

    report = egp_fx.report_of(gm)
    assert report.capture.mode == capture
    assert (report.coverage.run, report.coverage.analysed, report.coverage.hidden) == (calls, calls, [])
    _assert_same_function(model, gm, calib)
    assert sum(p.numel() for p in gm.parameters()) < params
    assert report.after.params < report.before.params and report.after.flops < report.before.flops
    for path, decision in decisions.items():
        assert _narrowed(report, path) == [decision], path
    assert len(planted) >= len(decisions)


def test_norm_act_modules_become_a_batchnorm_and_an_activation_in_the_graph():
    model, calib, _ = _planted("mobilenetv2")
    gm = egp_fx.trace(model, calib[0])
    called = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert called.count(nn.BatchNorm2d) == 52 and called.count(nn.ReLU6) == 35
    assert not any(n.target in (torch._assert, torch._assert_async) for n in gm.graph.nodes)
    assert egp_fx.capture_info(gm).notes == ["52 BatchNormAct2d as norm + activation modules"]


def _torchvision_weights_in_timm(tv: nn.Module, tm: nn.Module) -> None:
    """Copy torchvision's mobilenet_v2 state into timm's mobilenetv2_100 (same layers, same
    order: stem, blocks (pw, dw, pwl), head, classifier)."""
    src, dst = tv.state_dict(), tm.state_dict()
    assert len(src) == len(dst)
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        assert vs.shape == vd.shape, (ks, kd)
    tm.load_state_dict(dict(zip(dst, src.values())))


def test_timm_mobilenetv2_loses_what_torchvision_mobilenet_v2_loses_for_the_same_plant():
    torch.manual_seed(0)
    tv = realistic_bn(torchvision.models.mobilenet_v2(num_classes=10).eval())
    tm = timm.create_model("mobilenetv2_100", num_classes=10).eval()
    calib = _data(2, 32)
    planted = plant_dead_units(tv, calib[0])
    fit_bn_statistics(tv, calib)
    _torchvision_weights_in_timm(tv, tm)
    with torch.no_grad():
        assert torch.equal(tm(calib[0]), tv(calib[0]))
    assert len(planted) == 35

    small = {name: egp_fx.compress(m, calib, progress=False) for name, m in
             (("timm", tm), ("torchvision", tv))}

    removed = {name: 1 - egp_fx.report_of(g).after.params / egp_fx.report_of(g).before.params
               for name, g in small.items()}
    assert removed["timm"] == removed["torchvision"]
    assert removed["timm"] > 0.2
    widths = {name: [tuple(m.weight.shape) for m in g.modules() if isinstance(m, nn.Conv2d)]
              for name, g in small.items()}
    assert widths["timm"] == widths["torchvision"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small["timm"].modules())   # all folded
    _assert_same_function(tm, small["timm"], calib)


ISSUE_SAMPLE = ["mobilenetv2_100", "densenet121", "inception_v3", "resnetv2_50", "darknet53",
                "dpn68", "ese_vovnet19b_dw", "mobilenetv4_conv_small", "mobilevit_xs",
                "efficientnet_b0", "mobilenetv3_large_100", "cspresnet50", "regnety_016",
                "lcnet_050", "tinynet_a", "nfnet_l0", "gernet_s", "tresnet_m", "rexnet_100",
                "skresnet18", "coatnet_0_rw_224", "maxvit_tiny_rw_224", "efficientvit_b0",
                "ghostnet_100", "xception41"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ISSUE_SAMPLE)
def test_every_activation_that_runs_is_analysed(name):
    model = timm.create_model(name, pretrained=False).eval()
    side = 64 if name not in ("inception_v3", "coatnet_0_rw_224", "maxvit_tiny_rw_224") else \
        model.pretrained_cfg["input_size"][-1]
    x = _data(1, side, batch=2)[0]
    gm = egp_fx.calibrate(model, [x], progress=False)
    cov = gm.meta["egp_coverage"]
    assert cov.hidden == []
    assert cov.analysed == cov.run == _run_count(model, x)
