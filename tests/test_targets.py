"""Widths chosen for the hardware: the target's multiple, channel_multiple overriding it, and
the width picked by measurement when cost="latency"; the registry's entries and their timers,
which measure through the benchmark's session and timing code (egp_fx.runtime)."""
from __future__ import annotations

import logging
import math
import statistics

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx.bench import BACKENDS
from egp_fx.passes.dead_channels import candidate_widths
from egp_fx.passes.reasons import Reason
from egp_fx.pipeline import latency, timers
from egp_fx.pipeline.targets import TARGETS, Target, register_target
from egp_fx.runtime import timing


def mlp(dead: int, width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 8)).eval()
    with torch.no_grad():
        model[0].weight[:dead] = 0.0
        model[0].bias[:dead] = -1.0
    return model


X = [torch.randn(64, 32, generator=torch.Generator().manual_seed(1))]


def _width(gm) -> int:
    return next(lay.out_channels for n in gm.graph.nodes
                if (lay := egp_fx.ir.layer.layer_of(gm, n)) is not None and lay.path == "0")


@pytest.mark.parametrize("target, width, multiple",
                         [("ort-cpu", 160, 16), ("cuda", 192, 64), ("generic", 152, 8)])
def test_the_target_sets_the_width_multiple(target, width, multiple):
    gm = egp_fx.compress(mlp(104), X, target=target, progress=False)    # 152 live units
    assert _width(gm) == width and egp_fx.report_of(gm).target == target
    kept = [dict(r.details) for r in egp_fx.report_of(gm).refusals
            if r.code is Reason.DC_KEPT_FOR_MULTIPLE]
    assert kept == ([{"kept": width - 152, "removable": 104, "multiple": multiple}]
                    if width > 152 else [])


def test_channel_multiple_overrides_the_target():
    gm = egp_fx.compress(mlp(100), X, target="cuda", channel_multiple=1, progress=False)
    assert _width(gm) == 156
    gm = egp_fx.compress(mlp(100), X, target="generic", channel_multiple=64, progress=False)
    assert _width(gm) == 192


def test_candidate_widths():
    assert candidate_widths(256, 156) == [160, 192, 256]
    assert candidate_widths(256, 250) == [256]


def _stub(fast: set[int]):
    """Latency 1 ms for a pair whose hidden width is in `fast`, 2 ms otherwise."""
    seen = []

    def latency(module, x):
        width = module[0].out_features if isinstance(module, nn.Sequential) else -1
        seen.append(width)
        return 1e-3 if width in fast else 2e-3
    return latency, seen


def test_latency_picks_the_fastest_width_and_says_why():
    latency, seen = _stub({192})
    gm = egp_fx.compress(mlp(100), X, cost="latency", latency_fn=latency, progress=False)
    assert _width(gm) == 192
    assert sorted(set(seen)) == [160, 192, 256]      # every candidate timed once
    (why,) = [r.why for r in egp_fx.report_of(gm).refusals if r.key == "_1"]
    assert why.code is Reason.DC_KEPT_FOR_SPEED
    assert (why.details["kept"], why.details["removable"]) == (192 - 156, 100)
    assert why.details["times"] == {160: 2e-3, 192: 1e-3, 256: 2e-3}
    with torch.no_grad():
        torch.testing.assert_close(gm(X[0]), mlp(100)(X[0]), rtol=1e-5, atol=1e-6)


def test_a_narrowing_that_measures_slower_is_not_applied():
    latency, _ = _stub({256})
    gm = egp_fx.compress(mlp(100), X, cost="latency", latency_fn=latency, progress=False)
    assert _width(gm) == 256
    report = egp_fx.report_of(gm)
    assert not [r for r in report.applied if r.kind == "narrow_channels"]
    assert [r.code for r in report.refusals if r.key == "_1"] == [Reason.DC_ALL_SLOWER]


# ----------------------------------------------------------------------------- the registry

def test_the_registry_names_multiple_backend_and_timer():
    assert {name: (t.channel_multiple, t.backend, t.timer) for name, t in TARGETS.items()} == {
        "ort-cpu": (16, "ort-cpu", timers.ort_cpu_timer),
        "cuda": (64, "torch-cuda", timers.cuda_timer),
        "generic": (8, "torch-cpu", timers.torch_cpu_timer)}
    assert all(t.backend in BACKENDS for t in TARGETS.values())


def test_timer_for_reads_the_entry_and_falls_back_without_a_gpu(caplog):
    assert latency.timer_for("ort-cpu") is timers.ort_cpu_timer
    assert latency.timer_for("generic") is timers.torch_cpu_timer
    with caplog.at_level(logging.WARNING, logger="egp_fx.pipeline.latency"):
        cuda = latency.timer_for("cuda")
    if torch.cuda.is_available():
        assert cuda is timers.cuda_timer and not caplog.records
    else:
        assert cuda is timers.torch_cpu_timer
        assert [r.getMessage() for r in caplog.records] == [
            "target 'cuda' cannot be timed here (no GPU): layers are timed with torch on the CPU"]


def test_a_target_needs_a_positive_multiple():
    with pytest.raises(ValueError, match="channel_multiple must be >= 1"):
        register_target(Target("zero", 0, "torch-cpu", timers.torch_cpu_timer, "none"))
    assert "zero" not in TARGETS


def test_a_timer_is_the_median_of_the_benchmark_loop(monkeypatch):
    """The timer's calls run through runtime.timing.measure_cell: WARMUP untimed calls, then
    REPEATS timed ones, their median in seconds (a fake clock each call advances)."""
    now = [0.0]
    timed = [(k * 7 % 20 + 1) * 1e-3 for k in range(timers.REPEATS)]     # 1..20 ms, shuffled
    steps = iter([5.0] * timers.WARMUP + timed)

    class Tick(nn.Module):
        def forward(self, x):
            now[0] += next(steps)
            return x

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    assert timers.torch_cpu_timer(Tick(), torch.zeros(1)) == pytest.approx(
        statistics.median(timed), rel=1e-9, abs=0)
    assert next(steps, None) is None                          # every step taken, none more


@pytest.mark.parametrize("timer", [timers.ort_cpu_timer, timers.torch_cpu_timer])
def test_the_cpu_timers_measure_a_layer(timer):
    seconds = timer(nn.Linear(32, 16), torch.randn(4, 32))
    assert math.isfinite(seconds) and 0 < seconds < 1
