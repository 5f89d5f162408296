"""Extending egp_fx touches one place: an activation kind is one entry (activations.register); a
pass is one file (a generator registered with passes.register, its options a dataclass beside
it) and one line in the pipeline (in-tree: its name in passes.DEFAULT_PIPELINE); a target is one
entry (register_target); a benchmark backend is one registered class with its own settings
(register_backend)."""
from __future__ import annotations

import enum
import functools
import operator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx import passes
from egp_fx.bench import BACKENDS, Backend, Prepared, benchmark, register_backend
from egp_fx.cli.app import build_parser
from egp_fx.cli.commands import _compress_options
from egp_fx.ir import activations
from egp_fx.ir.activations import ActivationKind
from egp_fx.ir.regions import Affine, RegionSpec
from egp_fx.passes.base import Candidate, Rewrite, Status
from egp_fx.passes.reasons import Reason
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


# -- the pass's file: its options, its rewrite kind, the generator --------------------------------

class UnitScaleKind(str, enum.Enum):       # a pass outside egp_fx names its own rewrite kinds
    DROP_UNIT_SCALE = "drop_unit_scale"


@dataclass(frozen=True)
class UnitScaleOptions:
    unit_scale_atol: float = passes.option(0.0, "how far from 1 a scale may be and still go")


def _drop(gm, node) -> Rewrite:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)
    return Rewrite("unit_scale", UnitScaleKind.DROP_UNIT_SCALE, node.name, [node.name], True,
                   f"{node.name}: times one")


def unit_scale(gm, ctx):
    """unit_scale: x * s, s a number within unit_scale_atol of 1, becomes x."""
    atol = ctx.options_of(UnitScaleOptions).unit_scale_atol
    for node in list(gm.graph.nodes):
        if node.target is operator.mul and isinstance(node.args[1], float) \
                and abs(node.args[1] - 1.0) <= atol:
            yield Candidate(node.name, functools.partial(_drop, gm, node))


@pytest.fixture
def unit_scale_pass():
    passes.register("unit_scale", options=UnitScaleOptions)(unit_scale)
    yield "unit_scale"
    passes.PASSES.pop("unit_scale")


class Scaled(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.scale = nn.Linear(8, 4), scale

    def forward(self, x):
        return self.fc(x) * self.scale


def test_a_new_pass_is_one_file_and_one_line_in_the_pipeline(unit_scale_pass):
    pipeline = (unit_scale_pass, *passes.DEFAULT_PIPELINE)     # the pass's line in a pipeline
    x = torch.randn(16, 8)
    gm = egp_fx.compress(Scaled(1.0), [x], passes=pipeline, progress=False)
    (rw,) = [r for r in egp_fx.report_of(gm).rewrites if r.pass_name == "unit_scale"]
    assert (rw.kind, rw.status, rw.error) == (UnitScaleKind.DROP_UNIT_SCALE, Status.APPLIED, 0.0)
    assert not [n for n in gm.graph.nodes if n.op == "call_function"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), Scaled(1.0)(x), rtol=0, atol=0)

    # its option is a keyword of compress: verification rolls back a scale that is not one
    gm = egp_fx.compress(Scaled(1.001), [x], passes=pipeline, unit_scale_atol=0.01,
                         progress=False)
    report = egp_fx.report_of(gm)
    assert [r.status for r in report.rewrites if r.pass_name == "unit_scale"] == [
        Status.ROLLED_BACK]
    (refusal,) = [r for r in report.refusals if r.pass_name == "unit_scale"]
    assert (refusal.code, refusal.details["verdict"].code) == (Reason.ROLLED_BACK,
                                                              Reason.BEYOND_TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), Scaled(1.001)(x), rtol=1e-6, atol=1e-6)


def test_a_pass_option_is_a_flag_of_the_command_line(unit_scale_pass):
    argv = ["compress", "m", "--data", "random", "--unit-scale-atol", "0.01",
            "--passes", f"{unit_scale_pass},cleanup"]
    options = _compress_options(build_parser().parse_args(argv))
    assert (options["unit_scale_atol"], options["passes"]) == (0.01, ("unit_scale", "cleanup"))
    options = _compress_options(build_parser().parse_args(argv[:4]))
    assert "unit_scale_atol" not in options and "passes" not in options   # the passes' defaults


def test_an_option_belongs_to_one_pass():
    @dataclass(frozen=True)
    class Clash:
        channel_multiple: int = passes.option(4, "dead_channels has it already")

    with pytest.raises(ValueError, match=r"\['channel_multiple'\] already belong to \['dead_channels'\]"):
        passes.register("clash", options=Clash)(unit_scale)
    assert "clash" not in passes.PASSES


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
