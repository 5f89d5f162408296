"""Shared by the benchmark scripts: the header of the results, writing JSON and markdown, the
options they share, and the compress call they time (_results.py: tables of bench results).

The scripts are named for their job: bench_*.py measure and write results/<stem>.{json,md}
(bench_*_gpu.py need a GPU), check_*.py / check_*.sh run checks that print PASS or FAIL and
exit 1 when one fails, make_*.py write what egp_fx/data/ ships. Modules they import start with
an underscore; the planted models and their oracles come from egp_fx.testing.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from egp_fx.bench import environment
from egp_fx.capture import trace
from egp_fx.passes import DEFAULT_PIPELINE
from egp_fx.pipeline.compress import compress

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """The command as typed from the repository root (PYTHONPATH shown when set)."""
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " \
        if os.environ.get("PYTHONPATH") else ""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())  # .venv/bin/python from the repository root
    except ValueError:
        exe = Path(exe.name)
    return env + " ".join(shlex.quote(str(a)) for a in [exe, *sys.argv])


def header(title: str, threads: int | None = None) -> tuple[str, dict]:
    """Markdown header (title, exact command, machine, versions) and the same as a dict."""
    meta = {"command": command_line(), "environment": environment(threads)}
    return header_of(title, meta), meta


def header_of(title: str, meta: dict) -> str:
    """The markdown header of a run from its recorded command and environment."""
    env = meta["environment"]
    machine = (f"{env['cpu_model']}, {env['logical_cpus']} logical CPUs (load average "
               f"{env['load_average_1_5_15min'][0]} when the run started)"
               + (f", GPU {env['gpu']} (CUDA {env['cuda']})" if env.get("gpu") else ""))
    return "\n".join([
        f"# {title}", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {machine}; {env['platform']}", "",
        f"Software: python {env['python']}, torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}, onnx {env['onnx']}; run {env['date']}", ""])


def write(stem: str, payload: dict, markdown: str, folder: Path = RESULTS) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(markdown)
    logging.getLogger(stem).info("wrote %s and %s", json_path, md_path)
    return json_path, md_path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_results_arg(parser) -> None:
    """--results DIR: where the results go (default benchmarks/results)."""
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the results (default: benchmarks/results)")


def add_run_args(parser, *, batch_sizes=(1, 8), repeats: int = 50, warmup: int = 10,
                 calib_batches: int = 2, calib_batch_size: int = 8, img_size: int | None = 224,
                 threads: bool = True, stand_in: bool = True, quick: bool = True,
                 results: bool = True) -> None:
    """The run options the benchmark scripts share (batch sizes, repeats, warm-up, threads,
    calibration size, seed, --stand-in, --quick, --results), with each script's defaults."""
    if results:
        add_results_arg(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(batch_sizes))
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    if img_size is not None:
        parser.add_argument("--img-size", type=int, default=img_size)
    parser.add_argument("--calib-batches", type=int, default=calib_batches)
    parser.add_argument("--calib-batch-size", type=int, default=calib_batch_size)
    parser.add_argument("--seed", type=int, default=0)
    if stand_in:
        parser.add_argument("--stand-in", action="store_true",
                            help="use a plain trace instead of egp_fx.compress (development)")
    if quick:
        parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")


def compressor(stand_in: bool, target: str = "ort-cpu") -> Callable[..., nn.Module]:
    """compress(model, calib, without=()) -> module: egp_fx.compress for `target` with its
    default passes minus `without`; or, with stand_in=True (for developing the scripts), a plain
    trace."""
    if stand_in:
        return lambda model, calib, without=(): trace(model)

    def run(model: nn.Module, calib: list, without=()) -> nn.Module:
        passes = tuple(p for p in DEFAULT_PIPELINE if p not in without)
        return compress(model, calib, passes=passes, target=target, progress=False)

    return run
