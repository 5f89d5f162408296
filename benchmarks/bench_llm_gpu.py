"""Language models on the GPU: does compress pay where tensor cores set the widths?

OPT-125m architecture (random init, dead FFN units planted after the published profile, see
egp_fx.testing.planted). Models, all in fp16 on one GPU:
  original            the Hugging Face model
  graph-cuda          egp_fx.compress(target="cuda"): the captured graph, widths a multiple
                      of 64
  model-cuda          egp_fx.into_model(graph-cuda, model): the same narrowing in the Hugging
                      Face class (its eager code, the causal mask left to the attention kernel)
  model-cpu16         into_model of compress(target="ort-cpu"): widths a multiple of 16 (what
                      the CPU setting would produce on this GPU)
  model-timed         into_model of compress(target="cuda", cost="latency") run on the GPU: each
                      width picked by timing the candidate widths there
  oracle-exact        fc1/fc2 narrowed by hand to exactly the live units (planted dead units
                      and those that never fire on the calibration data removed)
  oracle-64, -128     the same, widths rounded up to a multiple of 64 / 128
Each is timed eager and under torch.compile(mode="reduce-overhead") (CUDA graphs), batch 1, 8
and 32 at sequence 128; in a cell the models run round-robin (interleaved), and a row gives the
median of `repeats` calls, each ended by torch.cuda.synchronize(). Speed-ups are against the
original in the same cell (the Hugging Face model under the same variant).
Also recorded: peak extra CUDA memory of compress(device="cuda") against the weights.

    python benchmarks/bench_llm_gpu.py --out results/gpu_llm        # on a GPU machine
    python benchmarks/bench_llm_gpu.py --device cpu --quick          # a smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from _common import header, setup_logging

import egp_fx
from egp_fx.testing.planted import OPT_FFN, llm_oracle, observed_dead, opt, tokens

log = logging.getLogger("bench_llm_gpu")
MODELS = ("graph-cuda", "model-cuda", "model-cpu16", "model-timed", "oracle-exact", "oracle-64",
          "oracle-128")


def _runner(module, batch: dict, device: str, compiled: bool):
    inputs = {k: v.to(device) for k, v in batch.items()}
    fn = torch.compile(module, mode="reduce-overhead") if compiled else module
    extra = {"use_cache": False} if not hasattr(module, "graph") else {}

    def run():
        with torch.inference_mode():
            out = fn(**inputs, **extra)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out
    return run


def _cell(models: dict, batch: dict, device: str, compiled: bool, repeats: int, warmup: int) -> dict:
    runners = {}
    for name, module in models.items():
        try:
            runners[name] = _runner(module, batch, device, compiled)
            for _ in range(warmup):
                runners[name]()
        except Exception as err:  # noqa: BLE001  (a model that cannot run this variant is noted)
            log.warning("%s %s: %s", name, "compile" if compiled else "eager", err)
            runners.pop(name, None)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _widths(module) -> list[str]:
    """What compress decided per FFN (a GraphModule), or fc1's width per layer (a model)."""
    if hasattr(module, "graph"):
        return [str(d) for ds in egp_fx.report_of(module).decisions_by_path().values()
                for d in ds]
    return [str(layer.fc1.out_features) for layer in module.model.decoder.layers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-models", nargs="+",
                    default=["original", "graph-cuda", "model-cuda", "oracle-64"],
                    help="models also timed under torch.compile (each compile costs tens of s)")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="seconds of timing after which no further cell starts")
    ap.add_argument("--size", default="125m", choices=("125m", "1.3b"), help="OPT architecture")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                    help="models to build and time (the original always)")
    ap.add_argument("--quick", action="store_true", help="batch 1, seq 16, 3 repeats")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    setup_logging()
    if args.quick:
        args.batch_sizes, args.seq, args.repeats, args.warmup = [1], 16, 3, 1
    dev = args.device
    model, dead = opt(args.size)
    calib = tokens(50272, 2, 4, args.seq, seed=1)
    t0 = time.perf_counter()
    want = set(args.models)
    models = {"original": model}
    widths, mem = {}, {}
    if want & {"graph-cuda", "model-cuda"}:
        graph = egp_fx.compress(model, calib, target="cuda", progress=False)
        models["graph-cuda"] = graph
        models["model-cuda"] = egp_fx.into_model(graph, model)
        widths["model-cuda"] = _widths(graph)
    if "model-cpu16" in want:
        models["model-cpu16"] = egp_fx.into_model(
            egp_fx.compress(model, calib, target="ort-cpu", progress=False), model)
        widths["model-cpu16"] = _widths(models["model-cpu16"])
    if dev.startswith("cuda") and "model-timed" in want:
        gpu_model = model.to(dev)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        timed = egp_fx.compress(gpu_model, calib, target="cuda", cost="latency", device=dev,
                                progress=False)
        mem = {"weights_bytes": sum(p.numel() * p.element_size() for p in gpu_model.parameters()),
               "peak_extra_bytes": torch.cuda.max_memory_allocated() - before}
        models["model-timed"] = egp_fx.into_model(timed, gpu_model).cpu()
        widths["model-timed"] = _widths(timed)
        model = gpu_model.cpu()
    compress_s = time.perf_counter() - t0
    never = observed_dead(OPT_FFN, model, calib)   # planted + never fired on calib
    for name, multiple in (("oracle-exact", None), ("oracle-64", 64), ("oracle-128", 128)):
        if name in want:
            models[name] = llm_oracle(OPT_FFN, model, never, multiple=multiple or 1)
    models = {n: m for n, m in models.items() if n == "original" or n in want}
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    for name in list(models):
        models[name] = models[name].to(device=dev, dtype=dtype).eval()
    rows = []
    start = time.perf_counter()
    skipped = []
    for compiled in ([False] if args.no_compile else [False, True]):
        timed_models = {n: m for n, m in models.items()
                        if not compiled or n in args.compile_models}
        for bs in args.batch_sizes:
            variant = "torch.compile" if compiled else "eager"
            if time.perf_counter() - start > args.time_budget:
                skipped.append(f"{variant} batch {bs}")
                log.warning("%s batch %d not run: time budget of %.0f s reached",
                            variant, bs, args.time_budget)
                continue
            batch = tokens(50272, 1, bs, args.seq, seed=7)[0]
            if compiled:    # each cell compiles afresh for its static shape (no recompile limit)
                torch._dynamo.reset()
            times = _cell(timed_models, batch, dev, compiled, args.repeats, args.warmup)
            med = {name: statistics.median(t) for name, t in times.items()}
            for name, ms in med.items():
                paired = sorted(a / b for a, b in zip(times["original"], times[name]))
                q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
                rows.append({"variant": variant, "batch": bs, "model": name, "median_ms": ms,
                             "speedup_vs_original": med["original"] / ms,
                             "paired_speedup_quartiles": q})
                log.info("%s batch %d %s: %.3f ms", variant, bs, name, ms)
            _write(args, models, rows, widths, mem, compress_s, skipped)
    _write(args, models, rows, widths, mem, compress_s, skipped, show=True)


def _write(args, models, rows, widths, mem, compress_s, skipped, show=False) -> None:
    """The table so far (written after every cell, so a run cut short keeps what it measured)."""
    title, meta = header(f"OPT-{args.size} architecture on the GPU: original, compressed, "
                         "oracles (fp16)")
    lines = [title, f"Dead FFN units planted after the published profile (random init); "
             f"calibration 2 x 4 sequences of {args.seq} tokens; compress {compress_s:.1f} s "
             f"for the compressed variants. Medians of {args.repeats} interleaved calls.", "",
             "| variant | batch | " + " | ".join(models) + " | model-cuda / oracle-64 |",
             "| --- | ---: | " + "---: | " * (len(models) + 1)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for bs in args.batch_sizes:
            cell = {r["model"]: r for r in rows if r["variant"] == variant and r["batch"] == bs}
            if not cell:
                continue
            ratio = (f"{cell['model-cuda']['median_ms'] / cell['oracle-64']['median_ms']:.3f}"
                     if {"model-cuda", "oracle-64"} <= cell.keys() else "-")
            lines.append(f"| {variant} | {bs} | " + " | ".join(
                f"{cell[m]['median_ms']:.3f} ms ({cell[m]['speedup_vs_original']:.3f}x)"
                if m in cell else "-" for m in models) + f" | {ratio} |")
    lines += ["", "Speed-up in brackets: against the original (the Hugging Face model, same "
              "variant and batch). '-': not timed under that variant (--compile-models).", "",
              "Paired speed-ups (original time / model time in the same round), quartiles "
              "p25 / p50 / p75:", "",
              "| variant | batch | model | p25 | p50 | p75 |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['batch']} | {r['model']} | "
              + " | ".join(f"{v:.3f}" for v in r["paired_speedup_quartiles"]) + " |"
              for r in rows if r["model"] != "original" and "paired_speedup_quartiles" in r]
    lines.append("")
    if skipped:
        lines += [f"Not run (time budget of {args.time_budget:.0f} s reached): "
                  + ", ".join(skipped) + ".", ""]
    lines += ["Widths chosen:", ""]
    lines += [f"- {name}: {', '.join(w)}" for name, w in widths.items()]
    if mem:
        lines += ["", f"compress(device='{args.device}', target='cuda', cost='latency'): peak "
                  f"extra CUDA memory {mem['peak_extra_bytes'] / 2**20:.0f} MB for "
                  f"{mem['weights_bytes'] / 2**20:.0f} MB of weights "
                  f"({mem['peak_extra_bytes'] / mem['weights_bytes']:.2f}x)."]
    text = "\n".join(lines) + "\n"
    if show:
        print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(
            {**meta, "rows": rows, "widths": widths, "memory": mem, "not_run": skipped},
            indent=1) + "\n")
        Path(f"{args.out}.md").write_text(text)


if __name__ == "__main__":
    main()
