"""Case 1: does egp_fx.compress reach the oracle? ResNet-18 with k planted dead blocks, ORT CPU.

For k in {0, 2, 4} (egp_fx.testing.planted says how the blocks are planted): the planted model ("original"), its
egp_fx.compress output ("compressed", calibrated on random images) and the hand-made oracle
(dead blocks replaced by nn.Identity) are exported to ONNX and timed interleaved on onnxruntime
CPU at batch 1 and 8. Target: compressed within 2% of the oracle's median latency.

    .venv/bin/python benchmarks/bench_oracle.py            # writes results/oracle_cpu.{json,md}
    .venv/bin/python benchmarks/bench_oracle.py --quick    # a smoke run, results not written
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from _common import add_run_args, compressor, header, setup_logging, write
from _results import by_batch, plain_runs, table

from egp_fx.bench import benchmark
from egp_fx.testing.planted import RESNET_BLOCKS, images, resnet18_oracle, resnet18_planted

log = logging.getLogger("bench_oracle")
TARGET = 1.02


def run_k(k: int, args, compress) -> dict:
    planted = resnet18_planted(k, seed=args.seed)
    oracle = resnet18_oracle(planted, k)
    calib = images(args.calib_batches, args.calib_batch_size, seed=args.seed + 1)
    start = time.perf_counter()
    models = {"original": planted, "compressed": compress(planted, calib)}
    seconds = time.perf_counter() - start
    if args.control:
        models["compressed-keep-channels"] = compress(planted, calib, without=("dead_channels",))
    models["oracle"] = oracle
    held_out = images(1, 4, seed=args.seed + 100)[0]
    with torch.no_grad():
        want = planted(held_out)
        errors = {name: float((m(held_out) - want).abs().max()) for name, m in models.items()
                  if name != "original"}
    result = benchmark(models, torch.randn(1, 3, 224, 224), batch_sizes=args.batch_sizes,
                       backends=("ort-cpu",), repeats=args.repeats, warmup=args.warmup,
                       threads=args.threads)
    return {"k": k, "dead_blocks": list(RESNET_BLOCKS[:k]), "compress_seconds": seconds,
            "held_out_max_abs_err": errors, "result": result}


def summary(runs: list[dict]) -> tuple[list[dict], str]:
    names = [n for n in ("original", "compressed", "compressed-keep-channels", "oracle")
             if any(r.model == n for run in runs for r in run["result"].rows)]
    found, cells = [], []
    for run in runs:
        for batch, row in by_batch(run["result"]):
            med = {name: r.median_ms for name, r in row.items()}
            ratio = med["compressed"] / med["oracle"]
            found.append({"k": run["k"], "batch_size": batch, "median_ms": med,
                          "compressed_over_oracle": ratio, "met": ratio <= TARGET})
            cells.append([run["k"], batch, *(f"{med[n]:.3f}" for n in names), f"{ratio:.3f}",
                          "yes" if ratio <= TARGET else "NO"])
    head = ["k", "batch", *(f"{n} ms" for n in names), "compressed / oracle",
            f"within {TARGET - 1:.0%}"]
    return found, "\n".join(table("rr" + "r" * len(names) + "rl", head, cells)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4])
    add_run_args(parser, repeats=100, calib_batches=4, img_size=None)
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="leave out compressed-keep-channels (compress without the "
                             "dead_channels pass), the control for channel alignment")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.batch_sizes, args.repeats, args.warmup = [2], [1], 2, 1
        args.calib_batches, args.calib_batch_size = 1, 2
    setup_logging()
    compress = compressor(args.stand_in)
    head, meta = header("ResNet-18 with planted dead blocks: original vs egp_fx vs oracle "
                        "(onnxruntime CPU)", args.threads)
    runs = [run_k(k, args, compress) for k in args.ks]
    table, summary_md = summary(runs)
    parts = [head, ("**Stand-in run: compressed = egp_fx.trace, not egp_fx.compress.**\n"
                    if args.stand_in else ""),
             f"Target: compressed within {TARGET - 1:.0%} of the oracle's median latency. "
             "Times are medians of interleaved (round-robin) runs, ms per call. "
             "compressed-keep-channels is egp_fx.compress without its dead_channels pass: it "
             "shows what narrowing convs to channel counts that are not multiples of the "
             "NCHWc block (8 or 16) costs onnxruntime.\n", summary_md]
    for run in runs:
        dead = ", ".join(run["dead_blocks"]) or "none"
        errors = ", ".join(f"{n} {e:.2e}" for n, e in run["held_out_max_abs_err"].items())
        parts.append(f"\n## k = {run['k']}: dead blocks {dead}\n\ncompress took "
                     f"{run['compress_seconds']:.1f} s; max abs error on a held-out batch vs the "
                     f"planted model: {errors}\n")
        parts.append(run["result"].to_markdown(header=False))
    markdown = "\n".join(parts)
    print(summary_md)
    if args.quick:
        return
    payload = {**meta, "target_compressed_over_oracle": TARGET, "summary": table,
               "stand_in": args.stand_in,
               "runs": plain_runs(runs)}
    write("oracle_cpu", payload, markdown, args.results)


if __name__ == "__main__":
    main()
