"""Does egp_fx add anything over graph optimisers? Original vs egp_fx output, both optimised.

The planted models of cases 1 and 2 (ResNet-18 with 4 dead blocks, ViT-tiny "dead") and their
egp_fx.compress outputs are exported to ONNX; when onnxslim is installed each file also gets a
slimmed copy. All files are timed interleaved on onnxruntime CPU, once with ORT_ENABLE_BASIC and
once with ORT_ENABLE_ALL (constant folding, Conv+BN/Conv+activation fusions, GELU/LayerNorm
fusions). ORT's optimised graphs are saved and their node counts reported: a graph optimiser sees
weights but not data, so it cannot know that a unit never leaves one linear region.

    .venv/bin/python benchmarks/bench_vs_ort_opt.py    # writes results/vs_ort_opt_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import torch
from _common import add_run_args, compressor, header, setup_logging, write

from egp_fx.bench import benchmark
from egp_fx.deploy.onnx import export_onnx
from egp_fx.pipeline.measures import measure
from egp_fx.testing.planted import images, resnet18_planted, vit_planted

log = logging.getLogger("bench_vs_ort_opt")


def slim(path: Path) -> Path | None:
    try:
        import onnxslim
    except ImportError:
        return None
    out = path.with_name(f"{path.stem}.slim.onnx")
    onnx.save(onnxslim.slim(str(path)), str(out))
    return out


def node_counts(path: Path) -> dict:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {"nodes": len(graph.node), "ops": dict(Counter(n.op_type for n in graph.node))}


def build(case: str, args, compress) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    if case == "resnet18-k4":
        planted, size = resnet18_planted(4, seed=args.seed), 224
    else:
        planted, size = vit_planted("dead", seed=args.seed, img_size=args.img_size), \
            args.img_size
    calib = images(args.calib_batches, args.calib_batch_size, size, seed=args.seed + 1)
    return planted, compress(planted, calib), size


def run_case(case: str, args, compress, folder: Path) -> dict:
    planted, compressed, size = build(case, args, compress)
    x1 = torch.randn(1, 3, size, size)
    files: dict[str, Path] = {}
    for name, model in (("original", planted), ("egp_fx", compressed)):
        files[name] = export_onnx(model, folder / f"{case}-{name}.onnx", x1).path
    for name in list(files):
        slimmed = slim(files[name])
        if slimmed is not None:
            files[f"{name}+onnxslim"] = slimmed
    results = {}
    for level in ("basic", "all"):
        results[level] = benchmark(files, x1, batch_sizes=args.batch_sizes, backends=("ort-cpu",),
                                   repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                   ort_optimization=level, save_ort_optimized=True,
                                   workdir=folder)
    graphs = {name: {"exported": node_counts(path),
                     "after ORT all": node_counts(path.with_name(f"{path.stem}.ort-all.onnx"))}
              for name, path in files.items()}
    sizes = {name: measure(model, x1).to_dict()
             for name, model in (("original", planted), ("egp_fx", compressed))}
    return {"case": case, "results": results, "graphs": graphs, "measures": sizes}


def markdown_for(run: dict) -> str:
    lines = [f"\n## {run['case']}\n", "| model | ONNX nodes exported | nodes after ORT all | "
             "top ops after ORT all |", "| --- | ---: | ---: | --- |"]
    for name, g in run["graphs"].items():
        after = g["after ORT all"]
        ops = ", ".join(f"{op} {n}" for op, n in Counter(after["ops"]).most_common(4))
        lines.append(f"| {name} | {g['exported']['nodes']} | {after['nodes']} | {ops} |")
    m = run["measures"]
    lines.append(f"\nGFLOPs (batch 1): original {m['original']['flops'] / 1e9:.3f}, egp_fx "
                 f"{m['egp_fx']['flops'] / 1e9:.3f}; conv/linear layers on the longest path: "
                 f"{m['original']['weighted_depth']} -> {m['egp_fx']['weighted_depth']}\n")
    for level, result in run["results"].items():
        lines += [f"\n### ORT graph optimisation level: {level}\n",
                  result.to_markdown(header=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["resnet18-k4", "vit-dead"],
                        choices=["resnet18-k4", "vit-dead"])
    add_run_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.cases, args.batch_sizes, args.repeats, args.warmup = ["vit-dead"], [1], 2, 1
        args.img_size, args.calib_batches, args.calib_batch_size = 64, 1, 2
    setup_logging()
    compress = compressor(args.stand_in)
    try:
        import onnxslim
        slim_version = onnxslim.__version__
    except ImportError:
        slim_version = None
    head, meta = header("egp_fx vs graph optimisers (onnxruntime CPU)", args.threads)
    with tempfile.TemporaryDirectory(prefix="egp_vs_ort_") as tmp:
        runs = [run_case(case, args, compress, Path(tmp)) for case in args.cases]
    note = f"onnxslim {slim_version}" if slim_version else \
        "onnxslim not installed: its rows are absent"
    if args.stand_in:
        note += "\n\n**Stand-in run: egp_fx = plain trace, not egp_fx.compress.**"
    markdown = "\n".join([head, note + "\n"] + [markdown_for(run) for run in runs])
    print(markdown)
    if args.quick:
        return
    payload = {**meta, "onnxslim": slim_version, "stand_in": args.stand_in,
               "runs": [{"case": r["case"], "graphs": r["graphs"], "measures": r["measures"],
                         "results": {lvl: res.to_dict() for lvl, res in r["results"].items()}}
                        for r in runs]}
    write("vs_ort_opt_cpu", payload, markdown, args.results)


if __name__ == "__main__":
    main()
