"""Extending egp_fx touches one place: an activation kind is one entry (activations.register), a
pass is one decorated generator (passes.register), a target is one entry (register_target), a
benchmark backend is one registered class with its own settings (register_backend)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx import passes
from egp_fx.bench import BACKENDS, Backend, Prepared, benchmark, register_backend
from egp_fx.cli.app import build_parser
from egp_fx.ir import activations
from egp_fx.ir.activations import ActivationKind
from egp_fx.ir.regions import Affine, RegionSpec
from egp_fx.passes.base import Candidate, Rewrite
from egp_fx.pipeline.targets import TARGETS, Target, register_target


class ShiftedReLU(nn.Module):
    """max(z - 1, 0): a ReLU-like unit egp_fx does not know out of the box."""

    def forward(self, z):
        return torch.clamp(z - 1.0, min=0.0)


@pytest.fixture
def shifted_relu_kind():
    kind = ActivationKind(
        "shifted_relu", (ShiftedReLU,),
        regions=lambda p, m: RegionSpec("shifted_relu", 1.0, 1.0, True, Affine(0.0, 0.0), None,
                                        Affine(1.0, -1.0)))
    activations.register(kind)
    yield kind
    activations.unregister("shifted_relu")


def test_a_new_activation_kind_is_one_entry(shifted_relu_kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), ShiftedReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].bias[16:] = 1.0                 # z = 1 + w x: mixed around the kink at 1
        model[0].weight[:16] = 0.0
        model[0].bias[:16] = 0.5                 # z = 0.5 < 1: OFF for every input
    x = torch.randn(16, 8)
    gm = egp_fx.compress(model, [x], channel_multiple=1, progress=False)
    (row,) = egp_fx.layer_stats(egp_fx.pipeline.report.original_of(gm))
    assert (row.kind, len(row.dead)) == ("shifted_relu", 16)
    assert str(egp_fx.report_of(gm).decisions_by_path()["1"][0]) == "narrowed 32 -> 16"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_hardsigmoid_is_piecewise_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Hardsigmoid(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.uniform_(-1.0, 1.0)        # every unit in the linear middle: z/6 + 1/2
    x = torch.randn(16, 8)
    gm = egp_fx.compress(model, [x], progress=False)
    report = egp_fx.report_of(gm)
    assert [str(d) for d in report.decisions_by_path()["1"]] == ["linearised"]
    assert report.after.nonlinear_depth == 0 and report.after.weighted_depth == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def _double(gm, node):
    with gm.graph.inserting_after(node):
        twice = gm.graph.call_function(torch.add, (node, node))
    node.replace_all_uses_with(twice, delete_user_cb=lambda u: u is not twice)
    return Rewrite("doubling", "double", node.name, [node.name], True, "x + x")


def test_a_new_pass_is_one_decorated_generator():
    @passes.register("doubling", positions=(95,))
    def doubling(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "output":
                yield Candidate("out", functools.partial(_double, gm, node.args[0]))

    try:
        assert passes.default_pipeline()[-1] == "doubling"
        model = nn.Sequential(nn.Linear(4, 4)).eval()
        x = torch.randn(3, 4)
        gm = egp_fx.compress(model, [x], tolerance=1e-5, progress=False)
        report = egp_fx.report_of(gm)   # the doubling changes the output: rolled back, named
        assert [(r.pass_name, r.status.value) for r in report.rewrites
                if r.pass_name == "doubling"] == [("doubling", "rolled back")]
    finally:
        passes.PASSES.pop("doubling")
    assert "doubling" not in passes.default_pipeline()


# ----------------------------------------------------------------------------- a target

def npu_timer(module, x):
    """A made-up accelerator (a stub device): a pair whose hidden width is 192 is fastest."""
    width = module[0].out_features if isinstance(module, nn.Sequential) else -1
    NPU_TIMED.append(width)
    return 1e-3 if width == 192 else 2e-3


NPU_TIMED: list[int] = []


@pytest.fixture
def npu_target():
    target = register_target(Target("npu", 32, "torch-cpu", npu_timer, "blocks of 32 lanes"))
    yield target
    TARGETS.pop("npu")


def _hidden_width(gm) -> int:
    return next(lay.out_channels for n in gm.graph.nodes
                if (lay := egp_fx.ir.layer.layer_of(gm, n)) is not None and lay.path == "0")


def test_a_new_target_is_one_entry(npu_target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    with torch.no_grad():                        # 116 dead units, 140 live
        model[0].weight[:116] = 0.0
        model[0].bias[:116] = -1.0
    x = [torch.randn(64, 32, generator=torch.Generator().manual_seed(1))]
    gm = egp_fx.compress(model, x, target="npu", progress=False)
    assert _hidden_width(gm) == 160 and egp_fx.report_of(gm).target == "npu"   # 140 -> 32 * 5
    NPU_TIMED.clear()
    gm = egp_fx.compress(model, x, target="npu", cost="latency", progress=False)
    assert _hidden_width(gm) == 192                                   # its timer decided
    assert sorted(set(NPU_TIMED)) == [144, 160, 192, 256]
    args = build_parser().parse_args(["compress", "m", "--data", "random", "--target", "npu"])
    assert args.target == "npu"                                       # the command line reads it
    with torch.no_grad():
        torch.testing.assert_close(gm(x[0]), model(x[0]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a bench backend

@dataclass(frozen=True)
class LoopedSettings:
    """The options of the "looped" backend: `loops` calls of the model per timed call."""
    loops: int = 1

    def __post_init__(self):
        if self.loops < 1:
            raise ValueError("loops must be >= 1")


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.fixture
def looped_backend():
    @register_backend
    class Looped(Backend):
        name = "looped"
        Settings = LoopedSettings

        def variants(self):
            return (f"x{self.settings.loops}",)

        def prepare(self, name, model, variant):
            return Prepared(model, f"called {self.settings.loops} times per timed call")

        def runner(self, prepared, batch):
            return lambda: [batch(prepared.handle) for _ in range(self.settings.loops)]

    yield Looped
    del BACKENDS["looped"]


def test_a_new_bench_backend_is_one_class_with_its_own_settings(looped_backend):
    model = Counting()
    res = benchmark({"m": model}, torch.randn(1, 4), backends=["looped"], loops=3, repeats=4,
                    warmup=1, batch_sizes=(2,))
    assert [(r.model, r.backend, r.variant, r.batch_size, r.prepared) for r in res.rows] == \
        [("m", "looped", "x3", 2, "called 3 times per timed call")]
    assert model.calls == 3 * (1 + 1 + 4)     # 3 calls per probe, warm-up and timed call
    with pytest.raises(ValueError, match="loops must be >= 1"):
        benchmark({"m": model}, torch.randn(1, 4), backends=["torch-cpu"], loops=0)
    with pytest.raises(TypeError, match=r"unknown options \['loopz'\]"):
        benchmark({"m": model}, torch.randn(1, 4), backends=["looped"], loopz=3)
