"""Cases 1 and 2 on a GPU: torch eager fp32 and fp16 + CUDA graphs, batch 1 and 32.

One prepared script for a GPU machine (torch, torchvision, timm, onnx; egp_fx installed with
`pip install --no-deps -e .`; no network). For each case the planted model, its egp_fx.compress
output (compressed on the CPU) and, for case 1, the oracle are timed interleaved with
egp_fx.benchmark on backend torch-cuda, variants "fp32" (eager, the reference) and
"fp16+cudagraph". Results are written after every case to OUT/gpu_bench.{json,md}, so a run cut
short keeps what it finished. About 5 minutes on one H100 (most of it compress on the CPU).

    python benchmarks/gpu_bench.py "$OUT"
    python benchmarks/gpu_bench.py /tmp/out --device cpu --dry-run   # check it here, tiny sizes
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cases  # noqa: E402
from _common import header, setup_logging  # noqa: E402
from egp_fx.bench import benchmark  # noqa: E402

log = logging.getLogger("gpu_bench")


def plan(args) -> list[tuple[str, dict]]:
    """(case name, what to build) in the order they run: the cheapest first."""
    cases = [(f"resnet18-k{k}", {"kind": "resnet", "k": k}) for k in args.ks]
    cases += [(f"vit-{v}", {"kind": "vit", "variant": v}) for v in args.vit_variants]
    return cases


def build(spec: dict, args) -> dict[str, torch.nn.Module]:
    if spec["kind"] == "resnet":
        planted = _cases.resnet18_planted(spec["k"], seed=args.seed)
        extra = {"oracle": _cases.resnet18_oracle(planted, spec["k"])}
    else:
        planted = _cases.vit_planted(spec["variant"], seed=args.seed, img_size=args.img_size)
        extra = {}
    calib = _cases.calibration(args.calib_batches, args.calib_batch_size, args.img_size,
                               seed=args.seed + 1)
    compressed = _cases.compressor(args.stand_in)(planted, calib)
    return {"original": planted, "compressed": compressed, **extra}


def fp32_error(models: dict, args, device: str) -> dict[str, float]:
    x = _cases.calibration(1, 2, args.img_size, seed=args.seed + 100)[0].to(device)
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
    device = "cuda" if args.device == "cuda" else "cpu"
    result = benchmark(models, torch.randn(1, 3, args.img_size, args.img_size),
                       batch_sizes=args.batch_sizes, backends=(f"torch-{device}",),
                       repeats=args.repeats, warmup=args.warmup,
                       torch_variants=("fp32", "fp16+cudagraph"))
    return {"case": name, "build_seconds": built, "bench_seconds": time.perf_counter() - start
            - built, "fp32_max_abs_err_vs_original": fp32_error(models, args, device),
            "result": result}


def write(out: Path, head: str, meta: dict, done: list[dict], failed: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    parts = [head]
    for run in done:
        parts.append(f"\n## {run['case']}\n\nbuild (incl. compress) {run['build_seconds']:.1f} s, "
                     f"benchmark {run['bench_seconds']:.1f} s; fp32 max abs error vs original: "
                     + ", ".join(f"{n} {e:.2e}" for n, e in
                                 run["fp32_max_abs_err_vs_original"].items()) + "\n")
        parts.append(run["result"].to_markdown(header=False))
    parts += [f"\n## {f['case']}: FAILED\n\n```\n{f['error']}\n```\n" for f in failed]
    (out / "gpu_bench.md").write_text("\n".join(parts))
    payload = {**meta, "failed": failed,
               "runs": [{**{k: v for k, v in r.items() if k != "result"},
                         **r["result"].to_dict()} for r in done]}
    (out / "gpu_bench.json").write_text(json.dumps(payload, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_bench.{json,md}")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes (64 px, batch 1 and 2, 2 repeats) to check the script")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--vit-variants", nargs="+", default=["dead", "linear"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stand-in", action="store_true",
                        help="use a plain trace instead of egp_fx.compress (development)")
    args = parser.parse_args()
    if args.dry_run:
        args.ks, args.vit_variants, args.batch_sizes = [2], ["linear"], [1, 2]
        args.repeats, args.warmup, args.img_size = 2, 1, 64
        args.calib_batches, args.calib_batch_size = 1, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    setup_logging()
    torch.backends.cudnn.benchmark = True
    head, meta = header("egp_fx on GPU: torch eager fp32 and fp16 + CUDA graphs")
    head += ("\nTimes: medians of interleaved (round-robin) calls, ms per call, each call ending "
             "in torch.cuda.synchronize(); compress ran on the CPU.\n")
    done, failed = [], []
    for name, spec in plan(args):
        log.info("case %s", name)
        try:
            done.append(run_case(name, spec, args))
        except Exception:  # noqa: BLE001  (keep the other cases; the trace goes to the report)
            failed.append({"case": name, "error": traceback.format_exc()[-4000:]})
            log.exception("case %s failed", name)
        write(args.out, head, meta, done, failed)
    print((args.out / "gpu_bench.md").read_text())


if __name__ == "__main__":
    main()
