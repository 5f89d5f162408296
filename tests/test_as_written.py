"""Models as people write them: flags in forward, contiguous() before view, trials that fail
quietly, and a compress that finds nothing to remove and says so cheaply."""
from __future__ import annotations

import collections
import enum
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import egp_fx
from egp_fx import passes
from egp_fx.passes.base import Candidate, Rewrite
from egp_fx.passes.reasons import Reason

TIGHT = {"rtol": 1e-6, "atol": 1e-6}


class Mode(enum.Enum):
    PLAIN = "plain"
    NEGATED = "negated"


class Flagged(nn.Module):
    """torchcrepe's shape: forward(self, x, embed=False) with `if embed:`."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, shift=None, embed=False, scale: int = 2, mode=Mode.PLAIN):
        h = F.relu(self.fc1(x))
        if shift is not None:
            h = h + shift
        if embed:
            return h
        if mode is Mode.NEGATED:
            h = -h
        return torch.sigmoid(self.fc2(h)) * scale


def _x(n=16, seed=0):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_bool_flag_with_a_default_is_fixed_and_fx_captures_it():
    model = Flagged().eval()
    gm = egp_fx.compress(model, [_x()], progress=False)
    info = egp_fx.capture_info(gm)
    assert info.mode == "fx" and info.fx_failure is None
    assert info.fixed == {"shift": "None", "embed": "False", "scale": "2",
                          "mode": "<Mode.PLAIN: 'plain'>"}
    assert "embed=False" in egp_fx.report_of(gm).summary()
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(4, 1)), model(_x(4, 1)), **TIGHT)


def test_a_parameter_the_batch_supplies_stays_an_input():
    model = Flagged().eval()
    shift = torch.randn(16, 8)
    gm = egp_fx.compress(model, [((_x(), shift),)], progress=False)
    info = egp_fx.capture_info(gm)
    assert info.mode == "fx" and "shift" not in info.fixed and "embed" in info.fixed
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "shift"]
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(), 2 * shift), model(_x(), 2 * shift), **TIGHT)


def test_torch_export_names_the_fixed_parameters_too():
    model = Flagged().eval()
    gm = egp_fx.compress(model, [_x()], progress=False, capture="export")
    info = egp_fx.capture_info(gm)
    assert info.mode == "export" and info.fixed["embed"] == "False"
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(4, 1)), model(_x(4, 1)), **TIGHT)


class Permuted(nn.Module):
    """facenet's RNet: x.permute(0, 3, 2, 1).contiguous().view(n, -1)."""

    def __init__(self, then: str = "view"):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 4 * 4, 2)
        self.then = then

    def forward(self, x):
        x = F.relu(self.conv(x)).permute(0, 3, 2, 1).contiguous()
        if self.then == "view":
            return self.fc(x.view(-1, 64))
        if self.then == "view(n, -1)":
            return self.fc(x.view(x.shape[0], -1))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("then", ["view", "view(n, -1)"])
def test_contiguous_before_a_view_stays(then):
    model = Permuted(then).eval()
    x = torch.randn(8, 3, 6, 6)
    gm = egp_fx.compress(model, [x], progress=False)
    report = egp_fx.report_of(gm)
    assert report.rolled_back == [] and report.refusals == []
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"].count("contiguous") == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), **TIGHT)


def test_contiguous_that_no_view_needs_goes():
    model = Permuted(then="flatten").eval()
    x = torch.randn(8, 3, 6, 6)
    gm = egp_fx.compress(model, [x], progress=False)
    assert "contiguous" not in [n.target for n in gm.graph.nodes]
    assert [r.kind for r in egp_fx.report_of(gm).applied] == ["drop_noop"]


class DropKind(str, enum.Enum):
    DROP = "drop"


@pytest.fixture
def drop_every_contiguous():
    """A pass that drops contiguous() whatever reads it: its trial breaks the view."""
    def drop(gm, node):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return Rewrite("drop_contiguous", DropKind.DROP, node.name, [node.name], True, "dropped")

    @passes.register("drop_contiguous")
    def run(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "call_method" and node.target == "contiguous":
                yield Candidate(node.name, functools.partial(drop, gm, node))
    yield
    del passes.PASSES["drop_contiguous"]


def test_a_failing_trial_is_one_log_line_naming_the_node_and_no_traceback(
        drop_every_contiguous, capfd, caplog):
    model = Permuted().eval()
    x = torch.randn(8, 3, 6, 6)
    with caplog.at_level(logging.INFO, logger="egp_fx"):
        gm = egp_fx.compress(model, [x], passes=(*passes.DEFAULT_PIPELINE, "drop_contiguous"),
                             progress=False)
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out and "generated forward" not in err + out
    report = egp_fx.report_of(gm)
    assert [r.key for r in report.rolled_back] == ["contiguous"]
    view = ("%view : [num_users=1] = call_method[target=view](args = (%permute, -1, 64), "
            "kwargs = {})")                   # the trial graph's node: it reads the permute
    [refusal] = report.refusals
    assert refusal.code is Reason.ROLLED_BACK
    assert refusal.reason.startswith("rolled back: output raises RuntimeError: view size is not")
    assert refusal.reason.endswith(f" at {view}")
    trials = [r for r in caplog.records if r.getMessage().startswith("trial raises")]
    assert trials and all("\n" not in r.getMessage() and r.exc_info is None for r in trials)
    assert all(r.getMessage().endswith(view) for r in trials)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), **TIGHT)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.drop, self.fc = nn.Dropout(0.1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.drop(F.relu(self.c2(F.relu(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def test_nothing_to_remove_says_so_and_costs_two_calibration_forwards(monkeypatch, caplog):
    """Every unit mixed, a Dropout the only thing to drop: one calibration forward and one
    check over the calibration data, one held-out forward of each of the original and the
    result, and no float64 re-check."""
    torch.manual_seed(0)
    model = Mixed().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(4)]      # 64 samples
    holdout = [torch.randn(16, 3, 10, 10, generator=g) for _ in range(2)]    # 32 samples
    seen = collections.Counter()
    conv2d = F.conv2d

    def counting(x, w, *args, **kwargs):
        if w.shape[1] == 3:                       # the first conv: once per sample forwarded
            seen[(x.dtype, x.shape[-1])] += x.shape[0]
        return conv2d(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counting)
    with caplog.at_level(logging.INFO, logger="egp_fx"):
        gm = egp_fx.compress(model, calib, holdout_loader=holdout, progress=False)
    report = egp_fx.report_of(gm)
    assert [r.kind for r in report.applied] == ["drop_noop"]
    assert report.nothing_removed == ("nothing to remove: all 16 units of the 2 analysed "
                                      "activation calls are mixed; only no-op nodes were dropped")
    assert report.nothing_removed in report.summary().splitlines()
    assert [r.getMessage() for r in caplog.records].count(
        f"compress: {report.nothing_removed}") == 1
    assert seen[(torch.float64, 12)] == seen[(torch.float64, 10)] == 0
    assert seen[(torch.float32, 10)] == 2 * 32
    assert 2 * 64 <= seen[(torch.float32, 12)] <= 2 * 64 + 12    # + capture check, shapes, FLOPs
    assert report.max_error == 0.0 and report.holdout_error == 0.0


def test_something_removed_is_not_called_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].bias[:4] = -100.0                # four dead units
    gm = egp_fx.compress(model, [_x()], progress=False, channel_multiple=1)
    assert egp_fx.report_of(gm).nothing_removed is None
