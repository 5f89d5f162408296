"""Calibration cost against a plain forward pass (torchvision ResNet-18, batch 32, 224x224, CPU).

    .venv/bin/python benchmarks/bench_calibrate.py [--batches 5] [--repeats 3] [--results DIR]

Both are timed on the same batches in the same process, interleaved, after one warm-up each:
the plain forward runs the traced model (no observers); calibration is egp_fx.calibrate on the
same batches (tracing included). The ratio of medians goes to benchmarks/results/calibrate_cpu.*.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
from _common import add_results_arg

import egp_fx
from egp_fx.bench import environment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    add_results_arg(ap)
    args = ap.parse_args()
    load = round(os.getloadavg()[0], 2)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    data = [torch.randn(args.batch_size, 3, 224, 224) for _ in range(args.batches)]
    plain = egp_fx.trace(model)

    def forward():
        with torch.no_grad():
            for x in data:
                plain(x)

    def calib():
        egp_fx.calibrate(model, data, progress=False)

    forward(), calib()
    t_fwd, t_cal = [], []
    for _ in range(args.repeats):
        for fn, out in ((forward, t_fwd), (calib, t_cal)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    fwd, cal = statistics.median(t_fwd), statistics.median(t_cal)
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": environment()["cpu_model"], "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": "resnet18", "batch_size": args.batch_size, "batches": args.batches,
        "forward_s": t_fwd, "calibrate_s": t_cal,
        "forward_median_s": fwd, "calibrate_median_s": cal, "ratio": cal / fwd, "target": 1.15,
    }
    record["machine"]["load_average_at_start"] = load
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "calibrate_cpu.json").write_text(json.dumps(record, indent=2))
    md = (f"# Calibration cost vs plain forward\n\n`{record['command']}`\n\n"
          f"Machine: {record['machine']['cpu']}, {record['machine']['threads']} threads, "
          f"torch {torch.__version__}; 1-min load average at start {load}\n\n"
          f"| model | batch | batches | forward (s, median) | calibrate (s, median) | ratio | target |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| resnet18 | {args.batch_size} | {args.batches} | {fwd:.3f} | {cal:.3f} | "
          f"{cal / fwd:.3f}x | <= 1.15x |\n")
    (args.results / "calibrate_cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
