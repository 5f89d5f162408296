"""Capture: torch.fx first, torch.export when fx cannot; checked against the model, never a silent
change of what it computes; one error naming both failures; the model's tensors shared."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx.errors import CalibrationError, TraceError
from egp_fx.ir.layer import layer_of
from egp_fx.ir.ops import Ops, Role


class FxSeesSomethingElse(nn.Module):
    """Computes x * 2 when fx traces it and x otherwise: an fx capture that would silently
    change the function."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        plain_fx = torch.fx._symbolic_trace.is_fx_tracing() and not torch.compiler.is_exporting()
        return y * 2 if plain_fx else torch.relu(y)


class Branchy(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it, torch.export can't either."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return torch.relu(y)
        return -y


class ShapeLoop(nn.Module):
    """Python control flow on a shape: fx cannot trace it (a Proxy has no length), export can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(len(x)):
            x = x + 0
        return torch.relu(self.lin(x))


def test_a_capture_that_differs_is_never_used():
    x = torch.randn(3, 4)
    model = FxSeesSomethingElse().eval()
    gm = egp_fx.trace(model, x)
    info = egp_fx.capture_info(gm)
    assert info.mode == "export" and "output differs from the model's" in info.fx_failure
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    with pytest.raises(TraceError, match="output differs"):
        egp_fx.trace(model, x, capture="fx")


def test_neither_capture_gives_one_error_naming_both():
    with pytest.raises(TraceError) as info:
        egp_fx.trace(Branchy(), torch.randn(2, 4))
    text = str(info.value)
    assert "neither capture can handle Branchy" in text
    assert "torch.fx cannot trace module '<top level>' (Branchy)" in text
    assert "torch.export failed" in text and "data-dependent control flow" in text


def test_auto_falls_back_to_export_and_says_why():
    x = torch.randn(3, 4)
    model = ShapeLoop().eval()
    gm = egp_fx.trace(model, x)
    info = egp_fx.capture_info(gm)
    assert info.mode == "export" and "torch.fx cannot trace" in info.fx_failure
    assert "captured with torch.export (torch.fx could not" in info.describe()
    ops = Ops(gm)
    assert [ops(n).kind for n in gm.graph.nodes if ops(n).role is Role.ACTIVATION] == ["relu"]
    with torch.no_grad():   # the batch dim stays dynamic
        for n in (1, 5):
            z = torch.randn(n, 4)
            torch.testing.assert_close(gm(z), model(z), rtol=0, atol=0)


def test_export_needs_an_example_and_fx_mode_does_not_fall_back():
    with pytest.raises(TraceError, match="needs an example batch"):
        egp_fx.trace(nn.Linear(2, 2), capture="export")
    with pytest.raises(TraceError, match="torch.fx cannot trace"):
        egp_fx.trace(ShapeLoop(), torch.randn(2, 4), capture="fx")
    with pytest.raises(TraceError, match="capture must be one of"):
        egp_fx.trace(nn.Linear(2, 2), capture="jit")


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_capture_shares_the_model_tensors_and_leaves_it_alone(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    gm = egp_fx.trace(model, torch.randn(3, 4), capture=mode)
    layers = [lay for n in gm.graph.nodes if (lay := layer_of(gm, n)) is not None]
    assert [lay.path for lay in layers] == ["0", "2"]
    assert layers[0].weight.data_ptr() == model[0].weight.data_ptr()   # nothing copied
    assert model.training and not gm.training                          # the model stays as it was


def test_a_batch_the_model_rejects_is_a_calibration_error_not_a_trace_error():
    with pytest.raises(CalibrationError, match=r"batch 0 \(inputs \(2, 5\)\) was rejected"):
        egp_fx.trace(nn.Linear(4, 2), torch.randn(2, 5))


def test_dict_batches_are_keyword_calls_and_input_key_selects_one():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, left, right):
            return torch.relu(self.a(left)) + self.b(right)

    model = TwoInputs().eval()
    batch = {"left": torch.randn(2, 4), "right": torch.randn(2, 4), "label": torch.zeros(2)}
    gm = egp_fx.calibrate(model, [batch], progress=False)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["left", "right"]
    with torch.no_grad():
        torch.testing.assert_close(gm(left=batch["left"], right=batch["right"]),
                                   model(batch["left"], batch["right"]))
    single = egp_fx.calibrate(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), [batch],
                              input_key="left", progress=False)
    assert egp_fx.layer_stats(single)[0].samples == 2 * 4 // 4


def test_tanh_gelu_written_out_becomes_one_gelu_call():
    transformers = pytest.importorskip("transformers")
    act = transformers.activations.NewGELUActivation()
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2)).eval()
    x = torch.randn(5, 4)
    gm = egp_fx.trace(model, x)
    ops = Ops(gm)
    acts = [ops(n) for n in gm.graph.nodes if ops(n).role is Role.ACTIVATION]
    assert [(a.kind, a.params["approximate"]) for a in acts] == [("gelu", "tanh")]
    assert "NewGELUActivation as GELU(approximate='tanh')" in egp_fx.capture_info(gm).describe()
    assert isinstance(model[1], transformers.activations.NewGELUActivation)   # model untouched
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
