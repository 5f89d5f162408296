"""Calibration statistics: planted ground truth, entropies, call counting, bad inputs."""
from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import egp_fx
from egp_fx.errors import CalibrationError, TraceError
from egp_fx.testing.planting import (
    fit_bn_statistics,
    plant_constant,
    plant_dead,
    plant_linear,
    realistic_bn,
)


def _rows(gm):
    return {r.node: r for r in egp_fx.layer_stats(gm)}


def _data(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_resnet18_both_relu_calls_of_a_basic_block():
    torch.manual_seed(0)
    model = realistic_bn(torchvision.models.resnet18())
    data = _data(4, (8, 3, 64, 64))
    plant_dead(model.layer1[0].bn1, [2, 17, 40])                  # first ReLU call
    plant_constant(model.layer1[0].bn2, [5, 6], 1.0)              # second call: z = 1 + x >= 1
    plant_constant(model.layer2[0].bn2, [3, 9], -1.0)             # second call after downsample:
    plant_constant(model.layer2[0].downsample[1], [3, 9], -1.0)   #   z = -1 + -1
    fit_bn_statistics(model, data)
    before = copy.deepcopy(model.state_dict())

    gm = egp_fx.calibrate(model, data, progress=False)
    rows = _rows(gm)

    assert len(rows) == 17
    assert rows["layer1_0_relu"].dead == [2, 17, 40] and rows["layer1_0_relu"].linear == []
    assert rows["layer1_0_relu_1"].linear == [5, 6] and rows["layer1_0_relu_1"].dead == []
    assert rows["layer2_0_relu_1"].dead == [3, 9] and rows["layer2_0_relu_1"].linear == []
    for name, row in rows.items():
        if name not in ("layer1_0_relu", "layer1_0_relu_1", "layer2_0_relu_1"):
            assert row.dead == [] and row.linear == [], name
    assert rows["layer1_0_relu"].samples == 4 * 8 * 16 * 16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_relu6_regions_dead_saturated_linear():
    model = realistic_bn(torchvision.models.mobilenet_v2(width_mult=0.5))
    data = _data(2, (4, 3, 64, 64))
    bn = model.features[1].conv[0][1]                       # depthwise conv's BN, ReLU6 after it
    plant_constant(bn, [0, 3], -1.0)                        # OFF: dead
    plant_constant(bn, [4], 7.0)                            # saturated: constant 6
    plant_linear(bn, [7, 8], 2.5)                           # inside (0, 6): linear
    plant_constant(bn, [9], 2.5)                            # a constant input: constant 2.5
    fit_bn_statistics(model, data)
    gm = egp_fx.calibrate(model, data, progress=False)
    row = _rows(gm)["features_1_conv_0_2"]
    assert (row.kind, row.dead, row.constant, row.linear) == ("relu6", [0, 3], [4, 9], [7, 8])
    st = next(n for n in gm.graph.nodes if n.name == "features_1_conv_0_2").meta["egp"]
    assert [(a.slope, a.offset) for a in st.channel_affine()[8:10]] == [(1.0, 0.0), (0.0, 2.5)]
    assert row.state == "mixed"


def test_gelu_mlp_on_channels_last_tokens():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64)
    fc1 = model.blocks[3].mlp.fc1
    with torch.no_grad():
        fc1.weight[[1, 50, 700]] = 0.0
        fc1.bias[[1, 50, 700]] = -10.0       # GELU beyond -5.5: outputs 0
        fc1.weight[[9, 10]] *= 1e-3
        fc1.bias[[9, 10]] = 10.0             # GELU beyond 5.3: the identity
        fc1.weight[11] = 0.0
        fc1.bias[11] = 10.0                  # a constant input: the constant gelu(10) = 10
    gm = egp_fx.calibrate(model, _data(2, (2, 3, 64, 64)), progress=False)
    row = _rows(gm)["blocks_3_mlp_act"]
    assert row.channel_dim == -1 and row.channels == 768
    assert row.dead == [1, 50, 700] and row.linear == [9, 10] and row.constant == [11]
    assert _rows(gm)["blocks_2_mlp_act"].dead == []


class _Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_leaky_relu_stuck_on_its_negative_side_is_linear_not_dead():
    model = _Leaky()
    data = _data(2, (4, 3, 16, 16))
    plant_linear(model.bn, [1, 6], -2.0)
    fit_bn_statistics(model, data)
    gm = egp_fx.calibrate(model, data, progress=False)
    row = _rows(gm)["act"]
    assert row.dead == [] and row.linear == [1, 6]
    st = next(n for n in gm.graph.nodes if n.name == "act").meta["egp"]
    assert st.region_of_channel()[[1, 6]].tolist() == [0, 0]
    assert st.channel_affine()[1].slope == pytest.approx(0.2)


def _h(p):
    p = min(max(p, 1e-5), 1 - 1e-5)
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_entropies_against_a_hand_computed_example():
    batch1 = torch.tensor([[1.0, 2.0, 1.0], [-1.0, 3.0, -1.0], [2.0, 1.0, -1.0], [-3.0, 5.0, -2.0]])
    batch2 = torch.ones(4, 3)                     # every channel ON: this batch's EGP entropy is 0
    gm = egp_fx.calibrate(nn.Sequential(nn.ReLU()), [batch1, batch2], progress=False)
    st = next(n for n in gm.graph.nodes if "egp" in n.meta).meta["egp"]
    # channel p_on over both batches: 6/8, 8/8, 5/8
    assert st.p_on.tolist() == [0.75, 1.0, 0.625]
    # EGP: batch 1 mixes channels 0 (p=1/2) and 2 (p=1/4); batch 2 mixes none
    egp = ((_h(0.5) + _h(0.25)) / 2 + 0.0) / 2
    easier = (_h(0.75) + _h(1.0) + _h(0.625)) / 3
    assert st.egp_entropy == pytest.approx(egp, abs=1e-12)
    assert st.easier_entropy == pytest.approx(easier, abs=1e-12)
    assert st.egp_entropy != pytest.approx(st.easier_entropy, abs=1e-3)
    assert st.zmin.tolist() == [-3.0, 1.0, -2.0] and st.zmax.tolist() == [2.0, 5.0, 1.0]


class _Calls(nn.Module):
    """Every way of calling ReLU; one module object called twice."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.l1(x))
        x = self.act(self.l2(x))
        x = F.relu(x - 0.1)
        x = torch.relu(x - 0.1)
        x = (x - 0.1).relu()
        x = F.relu(x - 0.1, inplace=True)
        return self.inplace(x - 0.1)


def test_every_activation_call_is_its_own_layer():
    rows = egp_fx.layer_stats(egp_fx.calibrate(_Calls(), _data(2, (5, 6)), progress=False))
    assert len(rows) == 7
    assert [r.node for r in rows][:2] == ["act", "act_1"]
    assert all(r.kind == "relu" and r.channels == 6 for r in rows)


@pytest.mark.parametrize("name,count,kind", [
    ("resnet18", 17, "relu"), ("resnet50", 49, "relu"), ("mobilenet_v2", 35, "relu6"),
    ("vgg11", 10, "relu"), ("convnext_tiny", 18, "gelu"),
])
def test_trace_torchvision_models(name, count, kind):
    gm = egp_fx.trace(torchvision.models.get_model(name))
    mods = dict(gm.named_modules())
    from egp_fx.ir.ops import activation_kind
    kinds = [activation_kind(n, mods) for n in gm.graph.nodes]
    assert sum(k == kind for k in kinds) == count
    assert not gm.training


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"])
def test_trace_timm_transformers(name):
    gm = egp_fx.trace(timm.create_model(name))
    acts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("mlp.act")]
    assert len(acts) == 12


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.inner = _Branchy()

    def forward(self, x):
        return self.inner(self.stem(x))


def test_untraceable_module_is_named():
    with pytest.raises(TraceError, match=r"module 'inner' \(_Branchy\)"):
        egp_fx.trace(_Outer())
    egp_fx.register_leaf_module(_Branchy, "flow control on the input's sign")
    try:
        assert any(n.target == "inner" for n in egp_fx.trace(_Outer()).graph.nodes)
    finally:
        egp_fx.capture.LEAF_MODULES.pop(_Branchy)


def test_empty_loader():
    with pytest.raises(CalibrationError, match="no batches"):
        egp_fx.calibrate(_Leaky(), [], progress=False)


def test_nan_in_inputs():
    bad = torch.randn(2, 3, 8, 8)
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(CalibrationError, match="batch 1 holds 1 NaN/Inf"):
        egp_fx.calibrate(_Leaky(), [torch.randn(2, 3, 8, 8), bad], progress=False)


def test_shape_rejected_names_the_node():
    with pytest.raises(CalibrationError, match=r"batch 0 \(inputs \(2, 5, 8, 8\)\).*at node conv \(call_module conv\)"):
        egp_fx.calibrate(_Leaky(), [torch.randn(2, 5, 8, 8)], progress=False)


def test_training_mode_model_is_calibrated_in_eval_on_a_copy(caplog):
    model = _Leaky().train()
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING):
        gm = egp_fx.calibrate(model, _data(2, (4, 3, 8, 8)), progress=False)
    assert "training mode" in caplog.text
    assert model.training and not gm.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loader_shapes_tuples_and_dicts():
    x = _data(1, (4, 3, 8, 8))[0]
    ref = egp_fx.layer_stats(egp_fx.calibrate(_Leaky(), [x], progress=False)).to_dicts()
    as_tuple = egp_fx.calibrate(_Leaky(), [(x, torch.zeros(4))], progress=False)
    as_dict = egp_fx.calibrate(_Leaky(), [{"image": x}], input_key="image", progress=False)
    torch.manual_seed(0)
    assert egp_fx.layer_stats(as_tuple)[0].samples == ref[0]["samples"] == 4 * 64
    assert egp_fx.layer_stats(as_dict)[0].samples == 4 * 64
    with pytest.raises(CalibrationError, match="unexpected keyword argument 'image'.*pass input_key="):
        egp_fx.calibrate(_Leaky(), [{"image": x}], progress=False)


def test_layer_table_prints_and_converts_to_json():
    table = egp_fx.layer_stats(egp_fx.calibrate(_Leaky(), _data(1, (2, 3, 8, 8)), progress=False))
    text = str(table)
    assert text.splitlines()[0].split()[:4] == ["node", "module", "kind", "ch"]
    (row,) = json.loads(table.to_json())
    assert set(row) >= {"node", "kind", "channels", "dead", "linear", "egp_entropy",
                        "easier_entropy", "state"}
    assert row["node"] == "act" and row["channels"] == 8


def test_counts_match_a_direct_computation_on_a_large_batch():
    """More than 255 samples per batch (the uint8 count is chunked) and odd sizes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU6())
    x = torch.randn(300, 3, 5, 7)
    st = next(n for n in egp_fx.calibrate(model, [x, x[:7]], progress=False).graph.nodes
              if "egp" in n.meta).meta["egp"]
    with torch.no_grad():
        z = torch.cat([conv(x), conv(x[:7])])
    assert st.n == 307 * 35
    assert st.on.tolist() == (z > 0).sum((0, 2, 3)).tolist()
    assert st.low.tolist() == (z <= 0).sum((0, 2, 3)).tolist()
    assert st.high.tolist() == (z >= 6).sum((0, 2, 3)).tolist()
    assert st.zmin.tolist() == z.amin((0, 2, 3)).tolist()
    assert st.zmax.tolist() == z.amax((0, 2, 3)).tolist()
