"""Time of compress (trace + rewrite + verify; calibration excluded), ResNet-50 and Swin-T, CPU.

    .venv/bin/python benchmarks/bench_compress.py [--repeats 3] [--batch 8]

Each model (torchvision resnet50, timm swin_tiny_patch4_window7_224; random weights, fixed seed,
224x224) is calibrated once on one batch; then egp_fx.compress(..., calibrated=gm) is timed, which
traces its own copy, runs every pass, verifies the result on the calibration batch and measures
params/FLOPs/depth before and after. Targets: 2 s (ResNet-50) and 5 s (Swin-T).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import egp_fx  # noqa: E402
from _common import header, write  # noqa: E402

MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(), 2.0),
    "swin_t": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), 5.0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    text, meta = header("Time of compress (calibration excluded), CPU")
    rows = []
    for name, (factory, target) in MODELS.items():
        torch.manual_seed(0)
        model = factory().eval()
        calib = [torch.randn(args.batch, 3, 224, 224)]
        gm0 = egp_fx.calibrate(model, calib, progress=False)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            gm = egp_fx.compress(model, calib, calibrated=gm0, progress=False)
            times.append(time.perf_counter() - t0)
        report = egp_fx.report_of(gm)
        rows.append({"model": name, "seconds": times, "median_s": statistics.median(times),
                     "target_s": target, "rewrites": len(report.applied),
                     "passes": {p.name: round(p.seconds, 3) for p in report.passes}})
    md = text + "\n| model | batch | compress median (s) | runs (s) | target (s) | rewrites |\n" \
        "|---|---|---|---|---|---|\n" + "".join(
            f"| {r['model']} | {args.batch} | {r['median_s']:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in r['seconds'])} | {r['target_s']} | {r['rewrites']} |\n"
            for r in rows)
    write("compress_cpu", {**meta, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
