"""benchmark(): well-formed rows, skips with reasons, JSON / markdown / PNG outputs.

No assertion is made about how fast anything is: only that times are positive finite numbers.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

from egp_fx.bench import BenchResult, BenchRow, benchmark
from egp_fx.pipeline.measures import count_flops, count_params


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def smaller() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> BenchResult:
    models = {"original": tiny(), "compressed": fx.symbolic_trace(smaller())}
    return benchmark(models, torch.randn(1, 3, 16, 16), batch_sizes=(1, 3),
                     backends=("ort-cpu", "torch-cpu", "ort-cuda"), repeats=2, warmup=1,
                     threads=1, torch_variants=("fp32",),
                     workdir=tmp_path_factory.mktemp("bench"))


def test_rows_cover_every_model_backend_and_batch(result):
    cells = {(r.model, r.backend, r.variant, r.batch_size) for r in result.rows}
    assert cells == {(m, b, v, n) for m in ("original", "compressed")
                     for b, v in (("ort-cpu", "opt-all"), ("torch-cpu", "fp32")) for n in (1, 3)}
    assert len(result.rows) == 8
    assert result.rows[0].model == "original"  # models are reported in the order given


def test_times_are_positive_finite(result):
    for row in result.rows:
        assert isinstance(row, BenchRow)
        assert math.isfinite(row.median_ms) and row.median_ms > 0
        assert math.isfinite(row.p90_ms) and row.p90_ms >= row.median_ms
        assert math.isfinite(row.speedup) and row.speedup > 0


def test_speedup_is_relative_to_the_first_model(result):
    for row in result.rows:
        ref = next(r for r in result.rows if r.model == "original" and
                   (r.backend, r.variant, r.batch_size) == (row.backend, row.variant,
                                                             row.batch_size))
        assert row.speedup == pytest.approx(ref.median_ms / row.median_ms, rel=1e-12)
        if row.model == "original":
            assert row.speedup == 1.0


def test_sizes_come_from_measures_at_batch_1(result):
    x = torch.randn(1, 3, 16, 16)
    for name, model, depth in (("original", tiny(), 3), ("compressed", smaller(), 2)):
        row = next(r for r in result.rows if r.model == name)
        assert row.params == count_params(model)
        assert row.flops == count_flops(model, x)
        assert row.layers_on_longest_path == depth
        assert row.nonlinear_on_longest_path == depth - 1


def test_missing_backends_are_skipped_with_a_reason(result):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    assert result.skipped == [{"model": "*", "backend": "ort-cuda", "variant": "*",
                               "reason": "onnxruntime has no CUDAExecutionProvider "
                                         "(install onnxruntime-gpu)"}]


def test_environment_and_settings_are_recorded(result):
    env = result.environment
    for key in ("torch", "onnxruntime", "onnx", "python", "cpu_model", "logical_cpus", "date"):
        assert env[key], key
    assert env["torch"] == torch.__version__
    assert result.settings["ort_allow_spinning"] == 0  # two models interleaved
    assert result.settings["threads"] == 1
    assert result.settings["order"] == "round-robin"


def test_json_round_trip(result, tmp_path):
    data = json.loads(result.to_json(tmp_path / "r.json").read_text())
    assert [r["model"] for r in data["rows"]] == [r.model for r in result.rows]
    assert data["rows"][0]["median_ms"] == result.rows[0].median_ms
    assert set(data) == {"environment", "settings", "rows", "skipped", "files"}
    assert set(data["files"]) == {"original", "compressed"}


def test_markdown_table(result):
    text = result.to_markdown()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(result.rows)  # header, separator, one line per row
    assert all(line.count("|") == 12 for line in table)
    assert "| compressed | ort-cpu | opt-all | 3 |" in text
    assert "ort-cuda" in text.split("Skipped:")[1]
    assert result.environment["cpu_model"] in text


def test_plot_writes_a_png(result, tmp_path):
    path = result.plot(tmp_path / "latency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_callable_inputs_and_onnx_files(tmp_path):
    onnx_path = tmp_path / "given.onnx"
    from egp_fx.deploy.onnx import export_onnx

    export_onnx(tiny(), onnx_path, torch.randn(1, 3, 16, 16))
    calls = []

    def make(batch):
        calls.append(batch)
        return torch.randn(batch, 3, 16, 16)

    res = benchmark({"file": onnx_path, "module": tiny()}, make, batch_sizes=(2,),
                    backends=("ort-cpu", "torch-cpu"), repeats=1, warmup=0,
                    torch_variants=("fp32",), save_ort_optimized=True, workdir=tmp_path)
    assert 2 in calls
    assert {(r.model, r.backend) for r in res.rows} == {("file", "ort-cpu"), ("module", "ort-cpu"),
                                                        ("module", "torch-cpu")}
    file_row = next(r for r in res.rows if r.model == "file")
    assert file_row.params == count_params(tiny()) and file_row.flops is None
    assert {"model": "file", "backend": "torch-cpu", "variant": "fp32",
            "reason": "given as an ONNX file"} in res.skipped
    assert (tmp_path / "module.ort-all.onnx").is_file()
    torch_row = next(r for r in res.rows if r.backend == "torch-cpu")
    assert torch_row.speedup is None  # the reference model has no torch-cpu row


class NoHalf(nn.Module):
    def forward(self, x):
        if x.dtype == torch.float16:
            raise RuntimeError("no fp16 here")
        return x * 2


def test_a_model_that_fails_a_variant_is_skipped_not_fatal():
    res = benchmark({"ref": nn.Identity(), "nohalf": NoHalf()}, torch.randn(1, 4),
                    backends=("torch-cpu",), torch_variants=("fp32", "fp16", "fp16+cudagraph"),
                    repeats=1, warmup=0)
    assert {(r.model, r.variant) for r in res.rows} == {("ref", "fp32"), ("nohalf", "fp32"),
                                                        ("ref", "fp16")}
    assert {"model": "nohalf", "backend": "torch-cpu", "variant": "fp16 batch 1",
            "reason": "RuntimeError: no fp16 here"} in res.skipped
    assert {"model": "*", "backend": "torch-cpu", "variant": "fp16+cudagraph",
            "reason": "CUDA graphs need a GPU"} in res.skipped
    assert "ort_allow_spinning" not in res.settings  # no ORT backend ran


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backends"):
        benchmark({"m": tiny()}, torch.randn(1, 3, 8, 8), backends=("tpu",))
    with pytest.raises(ValueError, match="batch-1 tensor"):
        benchmark({"m": tiny()}, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="ort_optimization"):
        benchmark({"m": tiny()}, torch.randn(1, 3, 8, 8), ort_optimization="max")
    with pytest.raises(ValueError, match="torch variants"):
        benchmark({"m": tiny()}, torch.randn(1, 3, 8, 8), torch_variants=("int8",))
    with pytest.raises(ValueError, match="at least one model"):
        benchmark({}, torch.randn(1, 3, 8, 8))


@pytest.mark.slow
def test_gpu_script_quick_run_on_cpu(tmp_path):
    """benchmarks/bench_vision_gpu.py end to end, tiny sizes: the GPU run is one shot, keep it
    sound."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "benchmarks/bench_vision_gpu.py", str(tmp_path), "--device",
                    "cpu", "--quick"], check=True, cwd=root, capture_output=True)
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["failed"] == [] and data["not_run"] == []
    assert [run["case"] for run in data["runs"]] == ["resnet18-k2", "vit-linear"]
    for run in data["runs"]:
        assert {r["variant"] for r in run["rows"]} == {"fp32", "fp32+compile"}
        assert {r["batch_size"] for r in run["rows"]} == {1, 2}
        assert {r["baseline"] for r in run["rows"]} <= {
            "original: BatchNorm folded (torch.fx fuse)",
            "original: BatchNorm folded (torch.fx fuse); torch.compile(mode=None, dynamic=False)",
            "original: as given (no BatchNorm)",
            "original: as given (no BatchNorm); torch.compile(mode=None, dynamic=False)"}
    assert {r["model"] for r in data["runs"][0]["rows"]} == {"original", "compressed", "oracle"}
    text = (tmp_path / "gpu_bench.md").read_text()
    assert "| compressed | torch-cpu | fp32 | 2 |" in text
    assert "| resnet18-k2 | fp32+compile | 2 |" in text
    assert "Baseline of every speedup: the original with its BatchNorm folded" in text


CALLS: list[str] = []


class _Recorder(nn.Module):
    """Appends its name to the module-level CALLS on every forward (deep copies share the list)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        CALLS.append(self.name)
        return self.lin(x)


def test_models_are_timed_round_robin_in_every_cell():
    CALLS.clear()
    benchmark({"a": _Recorder("a"), "b": _Recorder("b"), "c": _Recorder("c")}, torch.randn(1, 4),
              batch_sizes=(1, 2), backends=("torch-cpu",), torch_variants=("fp32",), repeats=4,
              warmup=1, threads=1)
    # size measures (trace, FLOPs) call each model first; then, per batch size, one probe call
    # each while the runners are built, the warm-up round and the repeats, a, b, c in turn
    per_cell = 3 * (1 + 1 + 4)
    calls = CALLS[-2 * per_cell:]
    before = Counter(CALLS[:-2 * per_cell])
    assert set(before) == {"a", "b", "c"} and len(set(before.values())) == 1
    for cell in (calls[:per_cell], calls[per_cell:]):
        assert cell == ["a", "b", "c"] * (per_cell // 3)


# ----------------------------------------------------------------------------- fair baselines

def with_bn() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _bn_calls(module: nn.Module) -> int:
    gm = fx.symbolic_trace(module)
    mods = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(mods[n.target], nn.BatchNorm2d))


def test_deployable_folds_batchnorm_on_a_copy():
    from egp_fx.bench import deployable

    model = with_bn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    deployed, how = deployable(model)
    assert how == "BatchNorm folded (torch.fx fuse)"
    assert _bn_calls(deployed) == 0 and _bn_calls(model) == 2
    assert model.training and not deployed.training          # the caller's model untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model.eval()(x), rtol=1e-5, atol=1e-6)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if float(y.sum()) > 0 else -y      # control flow on a tensor value


def test_deployable_says_when_it_cannot_fold():
    from egp_fx.bench import deployable

    deployed, how = deployable(Untraceable())
    assert how.startswith("as given (BatchNorm not folded: torch.fx cannot trace it")
    assert isinstance(deployed.bn, nn.BatchNorm2d)
    assert deployable(tiny())[1] == "as given (no BatchNorm)"
    assert deployable(with_bn(), fold_batchnorm=False)[1] == \
        "as given (BatchNorm not folded: fold_batchnorm=False)"


def test_torch_rows_name_their_baseline_with_batchnorm_folded():
    res = benchmark({"original": with_bn(), "compressed": tiny()}, torch.randn(1, 3, 16, 16),
                    backends=("torch-cpu", "ort-cpu"), torch_variants=("fp32",), repeats=1,
                    warmup=0, threads=1)
    torch_rows = [r for r in res.rows if r.backend == "torch-cpu"]
    assert [r.prepared for r in torch_rows] == ["BatchNorm folded (torch.fx fuse)",
                                                "as given (no BatchNorm)"]
    assert {r.baseline for r in torch_rows} == {"original: BatchNorm folded (torch.fx fuse)"}
    ort_rows = [r for r in res.rows if r.backend == "ort-cpu"]
    baselines = {r.baseline for r in ort_rows}     # the exporter is the one measured fastest
    assert baselines in ({"original: ONNX (torchscript exporter), ORT graph optimisation 'all'"},
                         {"original: ONNX (dynamo exporter), ORT graph optimisation 'all'"})
    text = res.to_markdown()
    assert "| 1.000x | original: BatchNorm folded (torch.fx fuse) |" in text
    assert "- original on torch-cpu fp32: BatchNorm folded (torch.fx fuse)" in text
    unfolded = benchmark({"original": with_bn()}, torch.randn(1, 3, 16, 16),
                         backends=("torch-cpu",), torch_variants=("fp32",), repeats=1, warmup=0,
                         fold_batchnorm=False)
    assert unfolded.rows[0].prepared == "as given (BatchNorm not folded: fold_batchnorm=False)"


def test_compile_variant_runs_every_model():
    res = benchmark({"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Linear(4, 4), nn.ReLU())},
                    torch.randn(1, 4), backends=("torch-cpu",), torch_variants=("fp32+compile",),
                    repeats=2, warmup=1, threads=1)
    assert not res.skipped, res.skipped
    assert [(r.model, r.variant) for r in res.rows] == [("a", "fp32+compile"),
                                                        ("b", "fp32+compile")]
    assert all(r.prepared.endswith("torch.compile(mode=None, dynamic=False)") for r in res.rows)


# ----------------------------------------------------------------------------- token inputs

class Tokens(nn.Module):
    """A model called with keyword token inputs, as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.out(h.mean(1))


def test_dict_token_batches_on_every_backend():
    example = {"attention_mask": torch.ones(1, 6, dtype=torch.long),   # not forward()'s order
               "input_ids": torch.randint(0, 50, (1, 6))}
    res = benchmark({"tok": Tokens()}, example, batch_sizes=(1, 3),
                    backends=("ort-cpu", "torch-cpu"), torch_variants=("fp32", "fp16"),
                    repeats=1, warmup=0)
    assert not res.skipped, res.skipped
    assert {(r.backend, r.variant, r.batch_size) for r in res.rows} == {
        (b, v, n) for b, v in (("ort-cpu", "opt-all"), ("torch-cpu", "fp32"),
                               ("torch-cpu", "fp16")) for n in (1, 3)}


def test_ort_feeds_inputs_by_name():
    from egp_fx.ir.batches import Batch
    from egp_fx.runtime.ort import ort_feed

    class Session:
        def __init__(self, names):
            self.names = names

        def get_inputs(self):
            return [type("Input", (), {"name": n})() for n in self.names]

    a, b = torch.zeros(1, 2), torch.ones(1, 3)
    feed = ort_feed(Session(["b", "a"]), Batch((), {"a": a, "b": b}))
    assert list(feed) == ["b", "a"] and feed["b"].shape == (1, 3) and feed["a"].shape == (1, 2)
    feed = ort_feed(Session(["x", "y"]), Batch((a, b)))
    assert feed["x"].shape == (1, 2) and feed["y"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"inputs \['c'\] are not in the batch"):
        ort_feed(Session(["a", "c"]), Batch((), {"a": a, "b": b}))
    with pytest.raises(ValueError, match="takes 1 inputs, the batch has 2"):
        ort_feed(Session(["x"]), Batch((a, b)))


# ----------------------------------------------------------------------------- the registry

@pytest.fixture
def doubled_backend():
    """A backend registered by one class (and unregistered afterwards)."""
    from egp_fx.bench import BACKENDS, Backend, Prepared, register_backend

    @register_backend
    class Doubled(Backend):
        name = "doubled"

        def variants(self):
            return ("twice",)

        def prepare(self, name, model, variant):
            return Prepared(model, "called twice per timed call")

        def runner(self, prepared, batch):
            return lambda: (batch(prepared.handle), batch(prepared.handle))

    yield Doubled
    del BACKENDS["doubled"]


def test_a_backend_is_one_registered_class(doubled_backend):
    CALLS.clear()
    res = benchmark({"a": _Recorder("a")}, torch.randn(1, 4), backends=("doubled",), repeats=3,
                    warmup=1)
    assert [(r.backend, r.variant, r.prepared) for r in res.rows] == \
        [("doubled", "twice", "called twice per timed call")]
    assert CALLS[-2 * (1 + 1 + 3):] == ["a"] * 10   # probe, warm-up, repeats; two calls each
    with pytest.raises(ValueError, match="doubled"):   # the error lists the registered names
        benchmark({"m": tiny()}, torch.randn(1, 3, 8, 8), backends=("tpu",))
