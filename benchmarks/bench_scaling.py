"""How the cost of compress grows: seconds and peak extra memory against graph size and weights.

Each model runs in its own process (so that its memory peak is its own): build it (random init,
planted dead units so that compress has work), run a plain forward over the calibration data
(the yardstick, median of 3), then compress, sampling the process's resident memory every 2 ms.
A row gives the graph nodes, the parameter bytes, calibration seconds, compress seconds
(calibration excluded: CompressReport.seconds), the plain forward, their ratio, and the peak of
resident memory above what the process held with the model built and run once ("extra").

Memory is measured twice, each model in a fresh process. With glibc's defaults ("RSS"), freed
tensors larger than the mmap threshold raise that threshold, so later tensors come from the heap
and memory freed there stays resident: the peak then depends on the order of allocations and
moves by half the weights between identical runs. With MALLOC_MMAP_THRESHOLD_=131072 ("live"),
every tensor over 128 KiB is its own mapping, returned when freed, and the resident peak follows
the tensors alive at once; that run's times are not used (page faults slow it).

    .venv/bin/python benchmarks/bench_scaling.py                  # the whole table
    .venv/bin/python benchmarks/bench_scaling.py --only resnet50 densenet121
    .venv/bin/python benchmarks/bench_scaling.py --profile densenet121   # where the time goes

Writes results/scaling.{json,md} and results/scaling.png (with --only: results/scaling_part.*;
with --results DIR: in DIR).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torchvision
from _common import add_results_arg, header, setup_logging, write

import egp_fx
from egp_fx.ir.copying import tensor_bytes
from egp_fx.pipeline.measures import compute_nodes
from egp_fx.testing.planted import opt_model
from egp_fx.testing.planting import plant_first_rows

log = logging.getLogger("bench_scaling")

# name -> (family, calibration: images x pixels, or sequences x tokens)
MODELS = {
    "resnet18": ("torchvision", 8, 224), "resnet50": ("torchvision", 8, 224),
    "resnet152": ("torchvision", 8, 224), "densenet121": ("torchvision", 8, 224),
    "densenet201": ("torchvision", 8, 224), "densenet121@64": ("torchvision", 8, 64),
    "vit_tiny_patch16_224": ("timm", 8, 224), "vit_base_patch16_224": ("timm", 8, 224),
    "vit_large_patch16_224": ("timm", 8, 224), "swin_t": ("torchvision", 8, 224),
    "swin_b": ("torchvision", 8, 224),
    "opt-125m": ("opt", 4, 128), "opt-350m": ("opt", 4, 128), "opt-1.3b": ("opt", 4, 128),
}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _Peak:
    def __init__(self):
        self.peak, self.running = _rss(), True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _rss())


def build(name: str):
    """(model, calibration batches) with planted dead units."""
    family, n, size = MODELS[name]
    base = name.split("@")[0]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if family == "opt":
        model = opt_model(base.removeprefix("opt-"))
        for i, layer in enumerate(model.model.decoder.layers[: len(model.model.decoder.layers) // 2]):
            plant_first_rows(layer.fc1, 0.7 * (1 - i / (len(model.model.decoder.layers) / 2)), -1.0)
        batches = [{"input_ids": torch.randint(0, 50272, (n, size), generator=g),
                    "attention_mask": torch.ones(n, size, dtype=torch.long)}]
        return model, batches
    if family == "timm":
        import timm

        model = timm.create_model(base, num_classes=1000).eval()
        for block in model.blocks[::2]:
            plant_first_rows(block.mlp.fc1, 0.5, -10.0)
    else:
        model = getattr(torchvision.models, base)().eval()
        if hasattr(model, "features") and base.startswith("swin"):
            for stage in model.features[1::2]:
                for block in stage:
                    plant_first_rows(block.mlp[0], 0.5, -10.0)
        else:
            bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for bn in bns[1::4]:
                with torch.no_grad():
                    bn.weight[: bn.num_features // 4] = 0.0
                    bn.bias[: bn.num_features // 4] = -1.0
    return model, [torch.randn(n, 3, size, size, generator=g)]


def measure_one(name: str, profile: bool = False) -> dict:
    model, batches = build(name)
    with torch.no_grad():
        for b in batches:
            egp_fx.ir.batches.as_batch(b)(model)            # warm up allocator and kernels
    forward = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                egp_fx.ir.batches.as_batch(b)(model)
        forward.append(time.perf_counter() - t0)
    base, peak = _rss(), _Peak()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    small = egp_fx.compress(model, batches, progress=False)
    if prof:
        prof.disable()
    total = time.perf_counter() - t0
    extra = peak.stop() - base
    report = egp_fx.report_of(small)
    row = {"model": name, "nodes": compute_nodes(egp_fx.pipeline.report.original_of(small)),
           "param_bytes": tensor_bytes(model), "calibration": MODELS[name][1:],
           "capture": report.capture.mode, "forward_s": sorted(forward)[1],
           "calibrate_s": total - report.seconds, "compress_s": report.seconds,
           "compress_over_forward": report.seconds / sorted(forward)[1],
           "peak_extra_bytes": extra, "extra_over_params": extra / tensor_bytes(model),
           "rewrites": len(report.applied), "params_before": report.before.params,
           "params_after": report.after.params, "max_error": report.max_error,
           "passes": [{"name": p.name, "seconds": p.seconds} for p in report.passes]}
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
        row["profile"] = text.getvalue()
    return row


def _run_child(name: str, profile: bool, live: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", name] + (["--profile-child"] if profile else [])
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if live else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"model": name, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def _plot(rows: list[dict], path: Path) -> None:
    """Graph work (the passes) against graph nodes, compress against a plain forward, and peak
    memory (live tensors) against the weights."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if "error" not in r and "live_extra_bytes" in r]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    for r in ok:
        passes = sum(p["seconds"] for p in r["passes"])
        gib = r["param_bytes"] / 2**30
        for ax, x, y in ((a, r["nodes"], passes), (b, r["forward_s"], r["compress_s"]),
                         (c, gib, r["live_extra_bytes"] / 2**30)):
            ax.scatter(x, y, color="C0" if r["capture"] == "fx" else "C1")
            ax.annotate(r["model"], (x, y), fontsize=7)
    top = max((r["forward_s"] for r in ok), default=1)
    b.plot([0, top], [0, 5 * top], "k--", lw=0.8, label="5x a forward")
    b.legend(fontsize=8)
    top = max((r["param_bytes"] for r in ok), default=1) / 2**30
    c.plot([0, top], [0, 1.5 * top], "k--", lw=0.8, label="1.5x the weights")
    c.legend(fontsize=8)
    a.set(xlabel="graph nodes", ylabel="seconds in the passes",
          title="graph work (blue: torch.fx, orange: torch.export)")
    b.set(xlabel="plain forward over the calibration data (s)",
          ylabel="compress seconds (calibration excluded)", title="compress against a forward")
    c.set(xlabel="weights (GiB)", ylabel="peak extra memory, live tensors (GiB)",
          title="memory against weights")
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="a subset of " + ", ".join(MODELS))
    ap.add_argument("--profile", nargs="*", default=[], help="models to profile (cProfile)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    add_results_arg(ap)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(measure_one(args.child, args.profile_child)))
        return
    setup_logging()
    names = args.only or list(MODELS)
    title, meta = header("compress at scale: time and memory against graph size and weights")
    rows = []
    for name in names:
        row = _run_child(name, name in args.profile)
        live = _run_child(name, False, live=True)
        if "error" not in row and "error" not in live:
            row.update(live_extra_bytes=live["peak_extra_bytes"],
                       live_extra_over_params=live["extra_over_params"])
        rows.append(row)
        log.info("%s", {k: v for k, v in rows[-1].items() if k != "profile"})
    lines = [title, "| model | capture | nodes | weights MB | forward s | calibrate s | compress s "
             "| compress / forward | peak extra MB, RSS | RSS / weights | peak extra MB, live "
             "| live / weights | params before -> after |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- |"]
    for r in rows:
        if "error" in r or "live_extra_bytes" not in r:
            lines.append(f"| {r['model']} | failed: {r.get('error', 'live run failed')} |"
                         + " |" * 11)
            continue
        lines.append(
            f"| {r['model']} | {r['capture']} | {r['nodes']} | {r['param_bytes'] / 2**20:.0f} | "
            f"{r['forward_s']:.3f} | {r['calibrate_s']:.2f} | {r['compress_s']:.2f} | "
            f"{r['compress_over_forward']:.2f} | {r['peak_extra_bytes'] / 2**20:.0f} | "
            f"{r['extra_over_params']:.2f} | {r['live_extra_bytes'] / 2**20:.0f} | "
            f"{r['live_extra_over_params']:.2f} | {r['params_before']:,} -> {r['params_after']:,} |")
    lines += ["", "## Where the time goes (compress seconds, calibration excluded)", "",
              "| model | compress s | passes s | verification, measures and copies s | "
              "slowest passes |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            continue
        passes = sum(p["seconds"] for p in r["passes"])
        slow = sorted(r["passes"], key=lambda p: -p["seconds"])[:3]
        lines.append(f"| {r['model']} | {r['compress_s']:.2f} | {passes:.2f} | "
                     f"{r['compress_s'] - passes:.2f} | "
                     + ", ".join(f"{p['name']} {p['seconds']:.2f}" for p in slow) + " |")
    for r in rows:
        if r.get("profile"):
            lines += ["", f"## Where the time goes: {r['model']} (cProfile, cumulative)", "",
                      "```", r["profile"].strip(), "```"]
    stem = "scaling" if not args.only else "scaling_part"
    write(stem, {**meta, "rows": rows}, "\n".join(lines) + "\n", args.results)
    _plot(rows, args.results / f"{stem}.png")


if __name__ == "__main__":
    main()
