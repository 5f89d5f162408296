"""Property: on random small graphs with random plants, compress is exact and never adds FLOPs."""
from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import egp_fx
from egp_fx.testing.planting import fit_bn_statistics, plant_constant

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU}
# plant -> BatchNorm output value that puts the unit in one region for every input
PLANT_VALUE = {"dead": -8.0, "on": 2.0, "saturated": 7.0}


class ConvBnAct(nn.Module):
    def __init__(self, cin, cout, k, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(cout)
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.a = ConvBnAct(c, c, 3, act)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(self.a(x)))


class Concat(nn.Module):
    def __init__(self, cin, c, act):
        super().__init__()
        self.left, self.right = ConvBnAct(cin, c, 1, act), ConvBnAct(cin, c, 3, act)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


class RandomNet(nn.Module):
    def __init__(self, blocks, width=6):
        super().__init__()
        layers, c = [], 3
        for kind, act, k in blocks:
            if kind == "conv":
                layers.append(ConvBnAct(c, width, k, act))
                c = width
            elif kind == "residual" and c == width:
                layers.append(Residual(c, act))
            else:
                layers.append(Concat(c, width // 2, act))
                c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1))


block = st.tuples(st.sampled_from(["conv", "residual", "concat"]), st.sampled_from(sorted(ACTS)),
                  st.sampled_from([1, 3]))
plant = st.tuples(st.integers(0, 20), st.sampled_from(sorted(PLANT_VALUE)),
                  st.sets(st.integers(0, 5), min_size=1, max_size=6))


def _plant(model, plants):
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for index, kind, channels in plants:
        bn = bns[index % len(bns)]
        plant_constant(bn, [c % bn.num_features for c in channels], PLANT_VALUE[kind])


# Derandomized: the same examples on every run. With this strategy the first example that catches
# an off-by-one channel offset at a concat (tests/mutants.py, concat-offset-property) is number
# 186; 300 keeps a margin (about 25 s on 2 cores).
@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=1, max_size=4), plants=st.lists(plant, max_size=4),
       seed=st.integers(0, 2**16))
def test_compress_is_exact_and_never_adds_flops(blocks, plants, seed):
    torch.manual_seed(seed)
    model = RandomNet(blocks)
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    fresh = [torch.randn(4, 3, 8, 8, generator=g)]
    _plant(model, plants)
    fit_bn_statistics(model, calib)
    _plant(model, plants)          # statistics fitted: plants hold for every input again
    gm = egp_fx.compress(model, calib, progress=False)
    report = egp_fx.report_of(gm)
    assert report.after.flops <= report.before.flops
    assert not report.rolled_back
    m64, g64 = copy.deepcopy(model).double(), copy.deepcopy(gm).double()
    with torch.no_grad():
        for x in calib + fresh:
            ref, out = m64(x.double()), g64(x.double())
            # the tolerance compress uses: 1e-5 of the output scale, or 10x the original
            # model's own float32 rounding noise where its output nearly cancels
            noise = float((model(x).double() - ref).abs().max())
            scale = float(ref.abs().max())
            torch.testing.assert_close(out, ref, rtol=0, atol=max(1e-5 * scale, 10 * noise, 1e-12))
