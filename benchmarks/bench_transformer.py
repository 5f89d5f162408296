"""Case 2: ViT-tiny with planted dead / linear MLP units, before and after egp_fx.compress.

Variants (egp_fx.testing.planted.vit_planted): "dead" (3/4 of the MLP hidden units dead in every other block) and
"linear" (every MLP hidden unit in the identity region of GELU, so fc2 o fc1 folds). For each,
the planted model ("original"), the same model traced by egp_fx without rewrites ("traced": a
control, since timm's code and a traced graph export to different ONNX graphs) and the
compressed form are exported to ONNX and timed interleaved on onnxruntime CPU; params, FLOPs
(batch 1) and depth come with every row.

    .venv/bin/python benchmarks/bench_transformer.py   # writes results/transformer_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from _common import add_run_args, compressor, header, setup_logging, write
from _results import by_batch, plain_runs, table

from egp_fx.bench import benchmark
from egp_fx.capture import trace
from egp_fx.testing.planted import VIT_NAME, images, vit_planted

log = logging.getLogger("bench_transformer")


def run_variant(kind: str, args, compress) -> dict:
    planted = vit_planted(kind, seed=args.seed, img_size=args.img_size)
    calib = images(args.calib_batches, args.calib_batch_size, args.img_size, seed=args.seed + 1)
    start = time.perf_counter()
    compressed = compress(planted, calib)
    seconds = time.perf_counter() - start
    held_out = images(1, 4, args.img_size, seed=args.seed + 100)[0]
    with torch.no_grad():
        want = planted(held_out)
        error = float((compressed(held_out) - want).abs().max() / want.abs().max())
    # "traced": the same model through egp_fx.trace without rewrites. It separates what the
    # rewrites gain from what exporting timm's code vs a traced graph changes.
    result = benchmark({"original": planted, "traced": trace(planted), "compressed": compressed},
                       torch.randn(1, 3, args.img_size, args.img_size),
                       batch_sizes=args.batch_sizes, backends=("ort-cpu",),
                       repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    return {"variant": kind, "compress_seconds": seconds, "held_out_rel_err": error,
            "result": result}


def summary(runs: list[dict]) -> str:
    cells = []
    for run in runs:
        for batch, row in by_batch(run["result"]):
            o, t, c = row["original"], row["traced"], row["compressed"]
            cells.append([run["variant"], batch, f"{o.median_ms:.3f}", f"{t.median_ms:.3f}",
                          f"{c.median_ms:.3f}", f"{c.speedup:.3f}x",
                          f"{t.median_ms / c.median_ms:.3f}x",
                          f"{o.flops / 1e9:.3f} -> {c.flops / 1e9:.3f}",
                          f"{o.params:,} -> {c.params:,}",
                          f"{o.layers_on_longest_path} -> {c.layers_on_longest_path}"])
    head = ["variant", "batch", "original ms", "traced ms", "compressed ms",
            "speedup vs original", "vs traced", "GFLOPs before -> after",
            "params before -> after", "layers on longest path"]
    return "\n".join(table("lrrrrrrlll", head, cells)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["dead", "linear"])
    add_run_args(parser, repeats=100)
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.repeats, args.warmup, args.img_size = [1], 2, 1, 64
        args.calib_batches, args.calib_batch_size = 1, 2
    setup_logging()
    compress = compressor(args.stand_in)
    head, meta = header(f"{VIT_NAME} with planted MLP units: before and after egp_fx "
                        "(onnxruntime CPU)", args.threads)
    runs = [run_variant(kind, args, compress) for kind in args.variants]
    summary_md = summary(runs)
    parts = [head, ("**Stand-in run: compressed = plain trace, not egp_fx.compress.**\n"
                    if args.stand_in else ""),
             "Times are medians of interleaved (round-robin) runs, ms per call; FLOPs at "
             "batch 1.\n", summary_md]
    for run in runs:
        parts.append(f"\n## variant {run['variant']}\n\ncompress took "
                     f"{run['compress_seconds']:.1f} s; relative max error on a held-out batch "
                     f"{run['held_out_rel_err']:.2e}\n")
        parts.append(run["result"].to_markdown(header=False))
    print(summary_md)
    if args.quick:
        return
    payload = {**meta, "stand_in": args.stand_in,
               "runs": plain_runs(runs)}
    write("transformer_cpu", payload, "\n".join(parts), args.results)


if __name__ == "__main__":
    main()
