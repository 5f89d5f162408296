"""egp-fx end to end on the planted network (egp_fx/testing/planted.py), in-process through
egp_fx.cli.app.main, plus one subprocess run of `python -m egp_fx`. Every bad input must give its
message and its documented exit code."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from egp_fx import cli, errors
from egp_fx.cli.data import NOISE_WARNING
from egp_fx.testing.planted import WIDTH, planted_net

TESTS = Path(__file__).resolve().parent
FACTORY = "egp_fx.testing.planted:planted_net"
SMALL = ["--input-size", "3x16x16", "--batch-size", "8", "--num-batches", "2", "--no-progress",
         "--channel-multiple", "1"]   # the planted net is 8 wide: narrow to exact counts


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, dict, str]:
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


# ----------------------------------------------------------------------------- commands

CHEAP = ["--passes", "cleanup"]       # for tests about data and errors, not about rewrites


@pytest.fixture(scope="module")
def compress_out(tmp_path_factory):
    """One `egp-fx compress --out DIR --json` run on .npz data, shared by the tests below."""
    import contextlib
    import io
    folder = tmp_path_factory.mktemp("compress")
    gen = np.random.default_rng(0)
    data = folder / "calib.npz"
    np.savez(data, x=gen.standard_normal((16, 3, 16, 16)).astype(np.float32),
             y=gen.integers(0, 4, 16))
    out, err = io.StringIO(), io.StringIO()
    import egp_fx.deploy.latency as latency    # timings fixed (test_export_choice varies them)
    fixed = {"torchscript": 1.0, "dynamo": 2.0, "original": 1.0, "compressed": 0.5}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.MonkeyPatch.context() as patch:
        patch.setitem(latency.TIMERS, "ort-cpu", lambda files, batch, names: {
            k: fixed[k] for k in files})
        code = cli.main(["compress", FACTORY, "--data", str(data), *SMALL, "--out",
                         str(folder / "out"), "--json"])
    return code, json.loads(out.getvalue()), err.getvalue(), folder / "out"


def test_compress_json_reports_the_planted_decisions(compress_out):
    code, res, err, _ = compress_out
    assert code == 0 and res["ok"] and res["command"] == "compress"
    assert res["decisions"] == {"narrowed": 1, "linearised": 1, "kept": 2}
    assert res["report"]["before"]["nonlinear_depth"] == 4
    assert res["report"]["after"]["nonlinear_depth"] == 3
    assert res["warnings"] == [] and "warning" not in err
    assert res["data"] == "16 samples of [3, 16, 16] from calib.npz"


def test_compress_out_dir_holds_report_html_and_a_faithful_onnx(compress_out):
    import onnxruntime as ort
    code, res, _, out = compress_out
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2", "report.html",
                                                     "report.json"]
    assert set(res["files"]) == {"model.onnx", "model.pt2", "report.html", "report.json"}
    assert res["deliverable"]["written"] == "compressed"      # measured faster (fixed timings)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 16, 16)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), planted_net()(x), rtol=1e-4, atol=1e-5)


def test_compress_out_dir_holds_a_loadable_program_with_its_report(compress_out):
    import egp_fx
    _, res, _, out = compress_out
    module, report = egp_fx.load(out / "model.pt2")
    assert report == res["report"]
    x = torch.randn(3, 3, 16, 16)                    # saved at batch 1, dynamic batch
    with torch.no_grad():
        torch.testing.assert_close(module(x), planted_net()(x), rtol=1e-5, atol=1e-5)


def test_report_json_table_and_diff_agree_with_the_compress_report(compress_out):
    _, res, _, out = compress_out
    saved = json.loads((out / "report.json").read_text())
    assert saved["report"]["after"] == res["report"]["after"]
    table = {r["node"]: r for r in saved["table"]}
    assert table["layer2_0_relu"]["decision"] == "linearised"
    gone = {c["name"] for c in saved["diff"]["changes"] if c["change"] in ("removed", "folded")}
    assert {n for n, r in table.items() if r["category"] == "linearised"} <= gone
    applied = [rw for rw in saved["report"]["rewrites"] if rw["status"] == "applied"]
    assert {rw["activation"] for rw in applied if rw["activation"]} == {
        n for n, r in table.items() if r["category"] != "kept"}
    assert saved["diff"]["totals"]["params_after"] == res["report"]["after"]["params"]
    assert saved["diff"]["totals"]["flops_before"] == res["report"]["before"]["flops"]


def test_random_data_warns_on_stderr_and_in_json(capsys):
    code, res, err = run_json(capsys, "compress", FACTORY, "--data", "random", *SMALL, *CHEAP)
    assert code == 0
    assert res["warnings"] == [NOISE_WARNING] and NOISE_WARNING in err
    code, out, err = run(capsys, "compress", FACTORY, "--data", "random", *SMALL, *CHEAP, "-q")
    assert code == 0 and err == ""


def test_inspect_prints_table_and_diff_and_writes_files(capsys, tmp_path):
    bench = tmp_path / "bench.md"
    bench.write_text("| model | median ms |\n| --- | ---: |\n| original | 2.0 |\n| compressed | 1.0 |\n")
    code, out, _ = run(capsys, "inspect", FACTORY, "--data", "random", *SMALL, "-q",
                       "--html", str(tmp_path / "r.html"), "--pictures", str(tmp_path / "pics"),
                       "--graph", str(tmp_path / "g.graphml"), "--bench", str(bench))
    assert code == 0
    assert "layer1_0_relu1" in out and "narrowed 8 -> 7" in out and "folded" in out
    html = (tmp_path / "r.html").read_text()
    assert "<h2>Benchmark</h2>" in html and "<td>compressed</td>" in html
    assert (tmp_path / "pics" / "before_after.svg").is_file()
    assert (tmp_path / "g.graphml").stat().st_size > 1000


@pytest.mark.parametrize("original", [False, True])
def test_export_writes_a_checked_onnx_file(capsys, tmp_path, original):
    out = tmp_path / "m.onnx"
    code, res, _ = run_json(capsys, "export", FACTORY, "--data", "random", *SMALL, "--out",
                            str(out), *(["--original"] if original else []))
    assert code == 0 and out.is_file()
    assert res["compressed"] is (not original) and res["max_rel_err"] < 1e-4


def test_bench_times_original_and_compressed(capsys, tmp_path):
    code, res, _ = run_json(capsys, "bench", FACTORY, "--data", "random", *SMALL,
                            "--repeats", "2", "--warmup", "1", "--out-json", str(tmp_path / "b.json"))
    assert code == 0
    assert [r["model"] for r in res["rows"]] == ["original", "original (torch.onnx.export default)",
                                                 "compressed"]
    assert [v["text"].split(":")[0] for v in res["verdicts"]] == ["ort-cpu opt-all batch 1"]
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["repeats"] == 2


def test_checkpoint_safetensors_and_torch_state_dict_load(capsys, tmp_path):
    state = planted_net().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        code, res, _ = run_json(capsys, "compress", FACTORY, "--checkpoint", str(tmp_path / name),
                                "--data", "random", *SMALL, "--passes", "fold_bn,dead_channels")
        assert code == 0 and res["decisions"]["narrowed"] == 1     # the planted weights arrived


@pytest.mark.parametrize("kind", ["npy", "pt", "flat-images", "class-images"])
def test_data_formats(capsys, tmp_path, kind):
    from PIL import Image
    gen = np.random.default_rng(0)
    if kind == "npy":
        data = tmp_path / "x.npy"
        np.save(data, gen.standard_normal((8, 3, 16, 16)).astype(np.float32))
    elif kind == "pt":
        data = tmp_path / "x.pt"
        torch.save((torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)), data)
    else:
        data = tmp_path / "imgs"
        for i in range(6):
            folder = data / f"class{i % 2}" if kind == "class-images" else data
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gen.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    code, res, _ = run_json(capsys, "compress", FACTORY, "--data", str(data), *SMALL, *CHEAP)
    assert code == 0, res
    assert res["report"]["before"]["flops"] == 733_248        # 3x16x16 inputs reached the model


DIGITS = pytest.mark.skipif(not (TESTS.parent / "egp_fx" / "data" / "digits.npz").is_file(),
                            reason="egp_fx/data/digits.npz is not shipped in this checkout")


@DIGITS
def test_builtin_digits_dataset(capsys):
    code, res, _ = run_json(capsys, "compress", FACTORY, "--data", "digits", "--num-batches", "1",
                            "--no-progress", *CHEAP)
    assert code == 0 and res["data"].startswith("digits (")
    assert res["warnings"] == []


@DIGITS
def test_prune_refuses_labels_the_model_cannot_output(capsys):
    code, out, err = run(capsys, "prune", FACTORY, "--data", "digits", "--no-progress")
    assert code == errors.EXIT_USAGE
    assert "labels go up to 9, but egp_fx.testing.planted:planted_net has 4 outputs; pass --num-classes 10" in err


@pytest.mark.slow
@DIGITS
def test_prune_then_compress_the_pruned_checkpoint(capsys, tmp_path):
    code, res, _ = run_json(capsys, "prune", FACTORY, "--num-classes", "10", "--data", "digits",
                            "--iterations", "1", "--epochs", "1", "--num-batches", "2",
                            "--out", str(tmp_path), "--no-progress")
    assert code == 0 and res["final"]["iteration"] == 1 and res["final"]["sparsity"] > 0.3
    code, res, _ = run_json(capsys, "compress", FACTORY, "--num-classes", "10", "--checkpoint",
                            res["files"]["weights"], "--data", "digits", "--num-batches", "2",
                            "--no-progress")
    assert code == 0 and res["report"]["after"]["params"] < res["report"]["before"]["params"]


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run([sys.executable, "-m", "egp_fx", "compress", "egp_fx.testing.planted:nope",
                           "--data", "random", "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == errors.EXIT_MODEL
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False and answer["exit_code"] == 3
    assert "has no callable 'nope'" in answer["error"] and "egp-fx: error:" in proc.stderr


# ----------------------------------------------------------------------------- errors

def broken_factory():
    """A factory that returns something that is not a module."""
    return 42


def _bad_checkpoint(tmp_path: Path, kind: str) -> Path:
    state = planted_net().state_dict()
    path = tmp_path / "bad.pt"
    if kind == "mismatch":
        state["fc.weight"] = torch.zeros(5, WIDTH)
        state.pop("stem.0.bias")
        state["extra.weight"] = torch.zeros(1)
    elif kind == "classes":
        state = planted_net(num_classes=7).state_dict()
    elif kind == "pickle":
        state = {"model": planted_net()}            # a pickled module, not tensors
    torch.save(state, path)
    return path


@pytest.mark.parametrize("argv, code, message", [
    (["compress", "resnet5O", "--data", "random"], 3, "Did you mean: resnet50"),
    (["compress", "no_such_module_xyz:f", "--data", "random"], 3, "cannot import module"),
    (["compress", "egp_fx.testing.planted:planted_nett", "--data", "random"], 3,
     "did you mean planted_net"),
    (["compress", f"{__name__}:broken_factory", "--data", "random"], 3, "not a torch.nn.Module"),
    (["compress", FACTORY, "--data", "random"], 2, "--data random needs --input-size"),
    (["compress", FACTORY, "--data", "/no/such/dir"], 2, "no such file or folder"),
    (["compress", FACTORY, "--data", "random", "--input-size", "abc"], 2, "--input-size 'abc'"),
    (["compress", FACTORY, "--data", "random", "--input-size", "1x16x16"], 4, "rejected by the model"),
    (["compress", FACTORY], 2, "the following arguments are required: --data"),
    (["compress", FACTORY, "--data", "random", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["compress", FACTORY, "--data", "random", "--input-size", "16", "--passes", "nope"], 2,
     "unknown pass(es) ['nope']"),
    (["bench", FACTORY, "--data", "random", "--input-size", "16", "--batch-sizes", "0"], 2,
     "--batch-sizes '0'"),
    (["prune", FACTORY, "--data", "random", "--input-size", "16"], 2, "needs labels"),
])
def test_bad_input_gives_its_message_and_exit_code(capsys, argv, code, message):
    got, out, err = run(capsys, *argv, "--no-progress")
    assert got == code, err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("kind, message", [
    ("mismatch", "missing keys (1): stem.0.bias; unexpected keys (1): extra.weight; mis-shaped "
                 "keys (1): fc.weight [5, 8] vs model [4, 8]"),
    ("classes", "If only the classifier differs, pass --num-classes"),
    ("pickle", "not unpickle"),
])
def test_checkpoint_errors_name_what_does_not_fit(capsys, tmp_path, kind, message):
    path = _bad_checkpoint(tmp_path, kind)
    code, res, err = run_json(capsys, "compress", FACTORY, "--checkpoint", str(path), "--data",
                              "random", *SMALL)
    assert code == errors.EXIT_MODEL and res["ok"] is False and res["exit_code"] == 3
    assert message in res["error"] and message in err


@pytest.mark.parametrize("kind, message", [
    ("suffix", "unsupported file type '.csv'"),
    ("nan", "NaN or Inf"),
    ("shape", "samples have shape [3, 8, 8], but --input-size says [3, 16, 16]"),
    ("empty-folder", "no images found"),
    ("corrupt-image", "cannot read image"),
    ("npz-keys", "cannot tell which array holds the inputs"),
])
def test_bad_data_files_exit_2(capsys, tmp_path, kind, message):
    if kind == "suffix":
        data = tmp_path / "x.csv"
        data.write_text("1,2\n")
    elif kind in ("nan", "shape"):
        x = np.zeros((4, 3, 8 if kind == "shape" else 16, 8 if kind == "shape" else 16), np.float32)
        x[0, 0, 0, 0] = np.nan if kind == "nan" else 0
        data = tmp_path / "x.npy"
        np.save(data, x)
    elif kind == "empty-folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif kind == "corrupt-image":
        data = tmp_path / "imgs"
        data.mkdir()
        (data / "a.png").write_bytes(b"not a png")
    else:
        data = tmp_path / "x.npz"
        np.savez(data, a=np.zeros((4, 3, 16, 16)), b=np.zeros((4, 3, 16, 16)))
    code, out, err = run(capsys, "compress", FACTORY, "--data", str(data), *SMALL, *CHEAP)
    assert code == errors.EXIT_USAGE
    assert message in err


def test_export_failure_exits_5(capsys, tmp_path, monkeypatch):
    from egp_fx.deploy import onnx as export

    def refuse(*args, **kwargs):
        raise export.ExportError("operator aten::frobnicate is not supported")
    monkeypatch.setattr(export, "export_onnx", refuse)
    code, res, _ = run_json(capsys, "export", FACTORY, "--data", "random", *SMALL, *CHEAP, "--out",
                            str(tmp_path / "m.onnx"))
    assert code == errors.EXIT_EXPORT and "frobnicate" in res["error"]
    code, res, _ = run_json(capsys, "compress", FACTORY, "--data", "random", *SMALL, *CHEAP,
                            "--out", str(tmp_path / "o"))
    assert code == errors.EXIT_EXPORT and res["ok"] is False
    assert (tmp_path / "o" / "report.json").is_file()            # the rest was written


def test_benchmark_failure_exits_6(capsys, monkeypatch):
    from egp_fx import bench

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime session died")
    monkeypatch.setattr(bench, "benchmark", broken)
    code, out, err = run(capsys, "bench", FACTORY, "--data", "random", *SMALL, *CHEAP)
    assert code == errors.EXIT_BENCH and "onnxruntime session died" in err


def test_unexpected_error_exits_1_and_says_it_is_a_bug(capsys, monkeypatch):
    compress_module = importlib.import_module("egp_fx.pipeline.compress")   # egp_fx.compress is the function

    def boom(*args, **kwargs):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(compress_module, "compress", boom)
    code, out, err = run(capsys, "compress", FACTORY, "--data", "random", *SMALL)
    assert code == errors.EXIT_INTERNAL
    assert "internal error: ZeroDivisionError: boom" in err and "-v" in err


def test_demo_that_is_not_installed_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "egp_fx.cli.demo", None)       # import egp_fx.cli.demo fails
    code, out, err = run(capsys, "demo")
    assert code == errors.EXIT_USAGE and "demo is not available" in err


def test_help_lists_commands_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("compress", "inspect", "export", "bench", "prune", "demo", "exit codes"):
        assert word in out
