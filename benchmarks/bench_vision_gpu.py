"""egp_fx on a GPU: ResNet-18 with 0, 2 and 4 dead blocks against the hand-built oracle, and ViT-Tiny,
torch fp16 eager, CUDA graphs and torch.compile, batch 1 and 32, against a fair baseline.

One prepared command for a GPU machine (torch >= 2.11, torchvision, timm, onnx; no network;
egp_fx from the repository with PYTHONPATH=. or `pip install --no-deps -e .`):

    PYTHONPATH=. python benchmarks/bench_vision_gpu.py "$OUT"     # OUT/gpu_bench.{json,md}
    PYTHONPATH=. python benchmarks/bench_vision_gpu.py /tmp/g --device cpu --quick   # check it here

For each case the planted model ("original"), its egp_fx.compress output ("compressed",
compressed on the CPU) and, for ResNet-18, the oracle (dead blocks replaced by nn.Identity,
egp_fx.testing.planted) are timed interleaved by egp_fx.benchmark on backend torch-cuda. The baseline of every
speedup is the original as a user would deploy it: a copy with its BatchNorm folded
(torch.fx.experimental.optimization.fuse); every model is prepared the same way, and each row
says how. Variants: "fp16" (eager), "fp16+cudagraph" (captured by hand, one replay per call) and
"fp16+compile" (torch.compile, mode="reduce-overhead": CUDA graphs through inductor, compiled
once per model and batch size outside the timing). Cases run in order, ResNet-18 first (4 dead
blocks, then 2, then 0), then ViT-Tiny; results are written after every case, and a case that
would start after --time-budget seconds (default 480) is left out and listed, so the command
ends within the 10 minutes a device call allows and a run cut short keeps what it finished.
Most of the time is torch.compile (each model once per batch size) and compress on the CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import torch
from _common import add_run_args, compressor, header, setup_logging
from _results import plain_runs

from egp_fx.bench import benchmark
from egp_fx.testing.planted import images, resnet18_oracle, resnet18_planted, vit_planted

log = logging.getLogger("bench_vision_gpu")
BASELINE = ("Baseline of every speedup: the original with its BatchNorm folded "
            "(torch.fx.experimental.optimization.fuse on a copy), same variant and batch size; "
            "the baseline column names it, and 'Prepared as' says how each model ran.")


def plan(args) -> list[tuple[str, dict]]:
    """(case name, what to build) in the order they run: the ResNet-18 cases first."""
    cases = [(f"resnet18-k{k}", {"kind": "resnet", "k": k}) for k in args.ks]
    cases += [(f"vit-{v}", {"kind": "vit", "variant": v}) for v in args.vit_variants]
    return cases


def build(spec: dict, args) -> dict[str, torch.nn.Module]:
    if spec["kind"] == "resnet":
        planted = resnet18_planted(spec["k"], seed=args.seed)
        extra = {"oracle": resnet18_oracle(planted, spec["k"])}
    else:
        planted = vit_planted(spec["variant"], seed=args.seed, img_size=args.img_size)
        extra = {}
    calib = images(args.calib_batches, args.calib_batch_size, args.img_size, seed=args.seed + 1)
    compressed = compressor(args.stand_in, args.target)(planted, calib)
    return {"original": planted, "compressed": compressed, **extra}


def fp32_error(models: dict, args, device: str) -> dict[str, float]:
    """max |model - original| in fp32 on the device (TF32 convs on recent GPUs: ~1e-3)."""
    x = images(1, 2, args.img_size, seed=args.seed + 100)[0].to(device)
    with torch.no_grad():
        outs = {n: m.to(device)(x).float().cpu() for n, m in models.items()}
    for m in models.values():
        m.cpu()
    ref = outs["original"]
    return {n: float((o - ref).abs().max()) for n, o in outs.items() if n != "original"}


def run_case(name: str, spec: dict, args) -> dict:
    start = time.perf_counter()
    models = build(spec, args)
    built = time.perf_counter() - start
    result = benchmark(models, torch.randn(1, 3, args.img_size, args.img_size),
                       batch_sizes=args.batch_sizes, backends=(f"torch-{args.device}",),
                       repeats=args.repeats, warmup=args.warmup, torch_variants=args.variants)
    return {"case": name, "build_seconds": built,
            "bench_seconds": time.perf_counter() - start - built,
            "fp32_max_abs_err_vs_original": fp32_error(models, args, args.device),
            "result": result}


def summary(done: list[dict]) -> str:
    """compressed and oracle speedups over the baseline, one line per case/variant/batch."""
    lines = ["| case | variant | batch | original ms | compressed ms | oracle ms | "
             "compressed speedup | oracle speedup |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in done:
        rows = run["result"].rows
        for variant, batch in dict.fromkeys((r.variant, r.batch_size) for r in rows):
            cell = {r.model: r for r in rows if (r.variant, r.batch_size) == (variant, batch)}

            def ms(n):
                return f"{cell[n].median_ms:.3f}" if n in cell else "-"

            def up(n):
                return f"{cell[n].speedup:.2f}x" if n in cell and cell[n].speedup else "-"

            lines.append(f"| {run['case']} | {variant} | {batch} | {ms('original')} | "
                         f"{ms('compressed')} | {ms('oracle')} | {up('compressed')} | "
                         f"{up('oracle')} |")
    return "\n".join(lines) + "\n"


def write(out: Path, head: str, meta: dict, done: list[dict], failed: list[dict],
          left_out: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    parts = [head, "## Summary\n", BASELINE + "\n", summary(done)]
    if left_out:
        parts.append(f"Not run (time budget of {meta['settings']['time_budget_s']} s reached): "
                     + ", ".join(left_out) + "\n")
    for run in done:
        parts.append(f"\n## {run['case']}\n\nbuild (incl. compress) {run['build_seconds']:.1f} s, "
                     f"benchmark (incl. compiles) {run['bench_seconds']:.1f} s; fp32 max abs "
                     "error vs original: " + ", ".join(
                         f"{n} {e:.2e}" for n, e in run["fp32_max_abs_err_vs_original"].items())
                     + "\n")
        parts.append(run["result"].to_markdown(header=False))
    parts += [f"\n## {f['case']}: FAILED\n\n```\n{f['error']}\n```\n" for f in failed]
    (out / "gpu_bench.md").write_text("\n".join(parts))
    payload = {**meta, "baseline": BASELINE, "failed": failed, "not_run": left_out,
               "runs": plain_runs(done)}
    (out / "gpu_bench.json").write_text(json.dumps(payload, indent=2) + "\n")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_bench.{json,md}")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", "--dry-run", dest="quick", action="store_true",
                        help="tiny sizes (64 px, batch 1 and 2, 2 repeats, ResNet-18 k=2 and "
                        "ViT linear) to check the script")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 2, 0],
                        help="dead blocks per ResNet-18 case, run in this order (default 4 2 0)")
    parser.add_argument("--vit-variants", nargs="+", default=["dead", "linear"])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="torch variants (default: fp16, fp16+cudagraph, fp16+compile on "
                        "cuda; fp32, fp32+compile on cpu)")
    add_run_args(parser, batch_sizes=(1, 32), repeats=100, warmup=20, calib_batches=4,
                 threads=False, quick=False, results=False)
    parser.add_argument("--target", default=None,
                        help="compress target (default: cuda on --device cuda, ort-cpu on cpu)")
    parser.add_argument("--time-budget", type=float, default=480.0,
                        help="seconds after which no further case starts (default 480)")
    args = parser.parse_args(argv)
    if args.target is None:
        args.target = "cuda" if args.device == "cuda" else "ort-cpu"
    if args.variants is None:
        args.variants = (["fp16", "fp16+cudagraph", "fp16+compile"] if args.device == "cuda"
                         else ["fp32", "fp32+compile"])
    if args.quick:
        args.ks, args.vit_variants, args.batch_sizes = [2], ["linear"], [1, 2]
        args.repeats, args.warmup, args.img_size = 2, 1, 64
        args.calib_batches, args.calib_batch_size = 1, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    setup_logging()
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    head, meta = header("egp_fx on GPU: ResNet-18 against its oracle and ViT-Tiny, torch fp16 "
                        "eager, CUDA graphs and torch.compile")
    meta["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["settings"]["time_budget_s"] = args.time_budget
    head += ("\nTimes: medians of interleaved (round-robin) calls, ms per call, each call ending "
             f"in torch.cuda.synchronize(); compress ran on the CPU with target={args.target!r}.\n")
    done, failed, left_out = [], [], []
    for name, spec in plan(args):
        if time.perf_counter() - start > args.time_budget:
            left_out.append(name)
            log.warning("case %s not run: time budget of %.0f s reached", name, args.time_budget)
            continue
        log.info("case %s", name)
        try:
            done.append(run_case(name, spec, args))
        except Exception:  # noqa: BLE001  (keep the other cases; the trace goes to the report)
            failed.append({"case": name, "error": traceback.format_exc()[-4000:]})
            log.exception("case %s failed", name)
        write(args.out, head, meta, done, failed, left_out)
    write(args.out, head, meta, done, failed, left_out)
    print((args.out / "gpu_bench.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
