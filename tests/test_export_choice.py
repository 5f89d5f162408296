"""The deliverable is never slower: export_onnx keeps the exporter measured fastest, a
torch.export capture exports through TorchScript at any batch size, and the command line writes
the faster of compressed and original, saying why. Timings are injected (fake timers), so every
choice here is deterministic."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import egp_fx.deploy.latency as latency
from egp_fx import cli
from egp_fx.bench import benchmark
from egp_fx.capture import capture
from egp_fx.deploy.default_form import default_exporter, export_default_form
from egp_fx.deploy.deliverable import Reason, compare, reason_for, render
from egp_fx.deploy.inputs import InputSpec
from egp_fx.deploy.onnx import Choice, ExportResult, _fastest, export_onnx
from egp_fx.deploy.traced_sizes import traced_sizes
from egp_fx.ir.batches import Batch
from egp_fx.pipeline.measures import Totals


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


class Timer:
    """A fake timer: seconds per call by file key, optionally per batch size; records calls."""

    def __init__(self, seconds: dict, per_batch: dict | None = None):
        self.seconds, self.per_batch, self.calls = seconds, per_batch or {}, []

    def __call__(self, files, batch, names):
        self.calls.append((tuple(files), batch.size, tuple(names)))
        table = self.per_batch.get(batch.size, self.seconds)
        return {k: table[k] for k in files}


def ort_out(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# ------------------------------------------------------------------ the exporter is measured

def test_the_exporter_measured_fastest_is_kept(tmp_path):
    fast, slow = "dynamo", "torchscript"      # the second in the default order wins
    timer = Timer({fast: 1e-3, slow: 2e-3})
    result = export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), timer=timer,
                         latency_batches=(1, 4))
    assert result.exporter == fast and result.choice is Choice.FASTEST
    assert [(t.exporter, t.passed) for t in result.trials] == [("torchscript", True),
                                                               ("dynamo", True)]
    trial = {t.exporter: t for t in result.trials}
    assert trial[fast].latency_ms == {1: 1.0, 4: 1.0} and trial[slow].latency_ms == {1: 2.0, 4: 2.0}
    assert result.latency_ms(4) == 1.0
    # every file timed side by side, once per batch size, on the example's sample repeated
    assert timer.calls == [(("torchscript", "dynamo"), 1, ("input",)),
                           (("torchscript", "dynamo"), 4, ("input",))]
    assert result.opset == trial[fast].opset
    names = {"torchscript": "/", "dynamo": "node_"}     # the two exporters name nodes apart
    nodes = [n.name for n in onnx.load(str(result.path)).graph.node]
    assert any(n.startswith(names[fast]) for n in nodes), nodes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert f"{fast} (fastest on ort-cpu: batch 1:" in result.describe_choice()


def test_the_choice_weighs_every_batch_size_alike():
    """torchscript 10% faster at batch 1, dynamo 2x faster at batch 32: dynamo wins (mean of
    the log ratios); equal times go to the first exporter in the order."""
    order = ["torchscript", "dynamo"]
    assert _fastest({1: {"torchscript": 1.0, "dynamo": 1.1},
                     32: {"torchscript": 2.0, "dynamo": 1.0}}, order) == "dynamo"
    assert _fastest({1: {"torchscript": 1.0, "dynamo": 1.3},
                     32: {"torchscript": 1.2, "dynamo": 1.0}}, order) == "torchscript"
    assert _fastest({1: {"torchscript": 1.0, "dynamo": 1.0}}, order) == "torchscript"
    assert _fastest({1: {"torchscript": 1.0, "dynamo": 1.0}}, order[::-1]) == "dynamo"


def test_exporters_forces_one_and_nothing_is_timed(tmp_path):
    timer = Timer({"torchscript": 1.0, "dynamo": 1e-3})
    result = export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8),
                         exporters=("torchscript",), timer=timer)
    assert result.exporter == "torchscript" and result.choice is Choice.ONE_TRIED
    assert timer.calls == [] and [t.exporter for t in result.trials] == ["torchscript"]
    assert result.trials[0].latency_ms == {}
    first = export_onnx(small(), tmp_path / "f.onnx", torch.randn(1, 3, 8, 8), choose="first",
                        timer=timer)
    assert first.choice is Choice.FIRST and len(first.trials) == 1 and timer.calls == []
    with pytest.raises(ValueError, match="choose"):
        export_onnx(small(), tmp_path / "x.onnx", torch.randn(1, 3, 8, 8), choose="fastest")


def test_a_static_batch_is_timed_at_the_example_only(tmp_path):
    timer = Timer({"torchscript": 2.0, "dynamo": 1.0})
    result = export_onnx(small(), tmp_path / "m.onnx", torch.randn(3, 3, 8, 8),
                         dynamic_batch=False, timer=timer)
    assert [c[1] for c in timer.calls] == [3] and result.exporter == "dynamo"


def test_a_timer_that_fails_keeps_the_first_that_passed(tmp_path):
    def broken(files, batch, names):
        raise RuntimeError("no such provider")
    result = export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), timer=broken)
    assert result.choice is Choice.UNTIMED and result.exporter == "torchscript"


def test_the_default_timer_times_files_side_by_side(tmp_path):
    a = export_onnx(small(), tmp_path / "a.onnx", torch.randn(1, 3, 8, 8),
                    exporters=("torchscript",)).path
    seconds = latency.ort_cpu_latency({"a": a, "b": a}, Batch((torch.randn(2, 3, 8, 8),)),
                                      ["input"], budget_s=0.05)
    assert set(seconds) == {"a", "b"}
    assert all(0 < s < 0.1 for s in seconds.values())


# ------------------------------------------------------- torch.export captures via TorchScript

class BatchReshape(nn.Module):
    """CREPE's ending: conv on (N, 1, L, 1), then permute and reshape(-1, features), captured
    with torch.export as a model torch.fx cannot trace would be."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, (8, 1), stride=(4, 1))
        self.fc = nn.Linear(4 * 8, 5)

    def forward(self, x, embed=False):
        x = F.relu(self.conv(F.pad(x[:, None, :, None], (0, 0, 2, 2))))
        if embed:
            return x
        return self.fc(x.permute(0, 2, 1, 3).reshape(-1, 4 * 8))


class TwoSizes(nn.Module):
    """Two symbolic entries in one view, and an expand to the batch size."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.register_buffer("bias", torch.arange(6.0))

    def forward(self, x, flag=False):
        if flag:
            return x
        n, t = x.shape[0], x.shape[1]
        y = self.proj(x).view(n, t, 2, 3).sum(-1)
        return y + self.bias[:2].expand(n, 2)[:, None, :]


@pytest.mark.parametrize("make,shape", [(BatchReshape, (32,)), (TwoSizes, (5, 6))],
                         ids=["reshape-minus-one", "view-and-expand"])
def test_torchscript_exports_a_torch_export_capture_at_any_batch(tmp_path, make, shape):
    model = make().eval()
    gm = capture(model, Batch((torch.randn(2, *shape),)), mode="export")
    assert gm.meta["egp_capture"].mode == "export"
    result = export_onnx(gm, tmp_path / "m.onnx", torch.randn(2, *shape),
                         exporters=("torchscript",))
    assert result.exporter == "torchscript"
    for batch in (1, 5):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(torch.from_numpy(ort_out(result.path, x)), want,
                                   rtol=1e-5, atol=1e-5)


def test_a_single_symbolic_entry_becomes_minus_one(tmp_path):
    gm = capture(BatchReshape().eval(), Batch((torch.randn(2, 32),)), mode="export")
    assert traced_sizes(gm) >= 1
    reshapes = [n for n in gm.graph.nodes if n.target is torch.reshape]
    assert [list(n.args[1]) for n in reshapes] == [[-1, 32]]
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    path = tmp_path / "m.onnx"
    export_onnx(gm, path, torch.randn(2, 32), exporters=("torchscript",))
    shapes = [onnx.numpy_helper.to_array(t).tolist() for t in onnx.load(str(path)).graph.initializer
              if t.data_type == onnx.TensorProto.INT64 and t.dims == [2]]
    consts = [onnx.numpy_helper.to_array(a.t).tolist() for n in onnx.load(str(path)).graph.node
              if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    assert [-1, 32] in shapes + consts and [2, 32] not in shapes + consts


def test_an_fx_graph_is_left_alone(tmp_path):
    import torch.fx as fx
    gm = fx.symbolic_trace(small())
    assert traced_sizes(gm) == 0


# ------------------------------------------------------------- one description of the inputs

def test_one_input_spec_names_and_axes_for_both_formats():
    pos = InputSpec.of(Batch((torch.zeros(2, 3), torch.zeros(2, 4, 5))))
    assert pos.names() == ["input_0", "input_1"] and pos.names("program") == ["args[0]", "args[1]"]
    assert pos.axes == ({0: "batch"}, {0: "batch"})
    assert pos.dynamic_axes({"output": 2}) == {"input_0": {0: "batch"}, "input_1": {0: "batch"},
                                               "output": {0: "batch"}}
    kw = InputSpec.of(Batch(kwargs={"input_ids": torch.zeros(2, 7, dtype=torch.long),
                                    "pixel_values": torch.zeros(2, 3, 4, 4)}))
    assert kw.names() == kw.names("program") == ["input_ids", "pixel_values"]
    assert kw.axes == ({0: "batch", 1: "sequence"}, {0: "batch"})
    assert kw.dynamic_shapes("B", "S") == {"input_ids": {0: "B", 1: "S"}, "pixel_values": {0: "B"}}
    assert kw.dynamic_shapes("B", "S", flat=True) == ({0: "B", 1: "S"}, {0: "B"})
    static = InputSpec.of(Batch((torch.zeros(1, 3),)), dynamic_batch=False)
    assert static.dynamic_axes({"output": 2}) is None and static.dynamic_shapes("B", "S") is None
    one = Batch((torch.ones(1, 3),))
    assert pos.exportable(one).size == 2 and static.exportable(one).size == 1


def test_saving_and_onnx_name_the_same_axes(tmp_path):
    import egp_fx
    model, x = small(), torch.randn(1, 3, 8, 8)
    saved = egp_fx.save(model, tmp_path / "m.pt2", x)
    result = export_onnx(model, tmp_path / "m.onnx", x, exporters=("torchscript",))
    dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert saved.dynamic == {"args[0]": {0: dim.dim_param}} == {"args[0]": {0: "batch"}}


# ----------------------------------------------------- the default form, and the deliverable

def test_the_default_form_is_what_torch_onnx_export_gives(tmp_path):
    result = export_default_form(small(), tmp_path / "d.onnx", torch.randn(1, 3, 8, 8))
    assert result.exporter == default_exporter() == "dynamo"    # torch 2.14's default
    assert result.choice is Choice.DEFAULT_FORM and result.max_rel_err <= 1e-5
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = small()(x)
    torch.testing.assert_close(torch.from_numpy(ort_out(result.path, x)), want, rtol=1e-5,
                               atol=1e-5)


def _result(path, exporter) -> ExportResult:
    return ExportResult(path, 20, exporter, 0.0, 0.0, inputs=["input"])


def _report(before: tuple[int, int], after: tuple[int, int]):
    from egp_fx.pipeline.report import CompressReport
    return CompressReport(Totals(before[0], before[1], 3, 2, 10),
                          Totals(after[0], after[1], 3, 2, 10), 1e-5)


def test_compare_says_slower_with_the_reason(tmp_path):
    a, b = _result(tmp_path / "a.onnx", "torchscript"), _result(tmp_path / "b.onnx", "dynamo")
    timer = Timer({"original": 1.0, "compressed": 1.25})
    v = compare(a, b, torch.randn(1, 3), report=_report((100, 1000), (100, 1000)), timer=timer,
                latency_batches=(1, 8))
    assert v.slower and v.reason is Reason.NOTHING_REMOVED
    assert v.speed == {1: 0.8, 8: 0.8} and v.latency_ms[8] == {"original": 1e3, "compressed": 1.25e3}
    assert v.facts == {"original_exporter": "torchscript", "compressed_exporter": "dynamo",
                       "params_before": 100, "params_after": 100, "flops_before": 1000,
                       "flops_after": 1000}
    assert "compress removed nothing" in v.message() and "0.80x at batch 1" in v.message()
    fine = compare(a, b, torch.randn(1, 3), timer=Timer({"original": 1.0, "compressed": 1.01}))
    assert not fine.slower and fine.reason is None and fine.message() is None


def test_reasons():
    removed = _report((100, 1000), (60, 500))
    assert reason_for(removed, ("torchscript", "torchscript"))[0] is Reason.NARROWED_SLOWER
    assert reason_for(removed, ("torchscript", "dynamo"))[0] is Reason.EXPORT_FORM
    assert reason_for(removed)[0] is Reason.NARROWED_SLOWER
    assert reason_for(None, ("torchscript", "dynamo"))[0] is Reason.EXPORT_FORM
    assert reason_for(None, ("dynamo", "dynamo"))[0] is Reason.UNKNOWN
    assert reason_for(_report((5, 9), (5, 9)))[0] is Reason.NOTHING_REMOVED
    for reason, facts in (reason_for(removed), reason_for(_report((5, 9), (5, 9))),
                          reason_for(None, ("torchscript", "dynamo"))):
        assert render(reason, facts)


def test_bench_times_the_default_form_right_after_its_model():
    res = benchmark({"original": small(), "compressed": small()}, torch.randn(1, 3, 8, 8),
                    backends=("ort-cpu", "torch-cpu"), torch_variants=("fp32",), repeats=1,
                    warmup=0, default_form_of=("original",))
    assert [(r.model, r.backend) for r in res.rows] == [
        ("original", "ort-cpu"), ("original (torch.onnx.export default)", "ort-cpu"),
        ("compressed", "ort-cpu"), ("original", "torch-cpu"), ("compressed", "torch-cpu")]
    assert res.skipped == []
    with pytest.raises(ValueError, match="default_form_of"):
        benchmark({"a": small()}, torch.randn(1, 3, 8, 8), default_form_of=("b",))


# ------------------------------------------------------------------------ the command line

FACTORY = "egp_fx.testing.planted:planted_net"
ARGS = ["--data", "random", "--input-size", "3x16x16", "--batch-size", "8", "--num-batches",
        "2", "--no-progress", "--channel-multiple", "1"]


def _cli(capsys, monkeypatch, seconds: dict, *argv: str):
    timer = Timer(seconds)
    monkeypatch.setitem(latency.TIMERS, "ort-cpu", timer)
    code = cli.main(list(argv) + ["--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def _relus(path) -> int:
    return sum(n.op_type == "Relu" for n in onnx.load(str(path)).graph.node)


def test_cli_export_writes_the_faster_artifact_and_says_why(capsys, monkeypatch, tmp_path):
    """(The compressed file written when it is faster: test_cli's compress --out.)"""
    slower, out = True, tmp_path / "m.onnx"
    seconds = {"torchscript": 1.0, "dynamo": 2.0, "original": 1.0,
               "compressed": 1.5 if slower else 0.5}
    code, res, err = _cli(capsys, monkeypatch, seconds, "export", FACTORY, *ARGS, "--out", str(out))
    assert code == 0 and out.is_file()
    assert res["written"] == ("original" if slower else "compressed")
    d = res["deliverable"]
    assert d["slower"] is slower and d["speed"] == {"1": pytest.approx(1 / seconds["compressed"]),
                                                   "32": pytest.approx(1 / seconds["compressed"])}
    assert d["reason"] == ("narrowed-slower" if slower else None)
    assert d["exporters"] == {"original": "torchscript", "compressed": "torchscript"}
    # the planted original has 4 ReLUs; compress turned one into the identity
    assert _relus(out) == (4 if slower else 3)
    assert ("the compressed model is slower than the original on ort-cpu" in err) is slower
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_compress_out_writes_the_faster_model_onnx(capsys, monkeypatch, tmp_path):
    code, res, err = _cli(capsys, monkeypatch, {"torchscript": 1.0, "dynamo": 2.0,
                                                "original": 1.0, "compressed": 3.0},
                          "compress", FACTORY, *ARGS, "--out", str(tmp_path / "o"))
    assert code == 0 and res["deliverable"]["written"] == "original"
    assert _relus(tmp_path / "o" / "model.onnx") == 4
    assert "egp-fx: warning: the compressed model is slower" in err


def test_bench_verdicts_say_slower_with_the_reason():
    from egp_fx.bench import BenchResult, BenchRow
    from egp_fx.cli.verdict import verdict_lines

    def row(model, ms):
        return BenchRow(model, "ort-cpu", "opt-all", 1, ms, ms, None, None, None, None, None)
    bench = BenchResult([row("original", 1.0), row("original (torch.onnx.export default)", 2.0),
                         row("compressed", 1.25)], {}, {})
    [v] = verdict_lines(bench, _report((100, 1000), (100, 1000)))
    assert v.slower and v.speed == 0.8
    assert v.text.startswith("ort-cpu opt-all batch 1: compressed 1.25 ms, 0.80x the original's "
                             "speed (1 ms), 1.60x that of the original as torch.onnx.export "
                             "writes it by default (2 ms). Slower: compress removed nothing")
    [fast] = verdict_lines(BenchResult([row("original", 1.0), row("compressed", 0.5)], {}, {}))
    assert not fast.slower and "Slower" not in fast.text
