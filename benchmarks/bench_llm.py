"""Language models on onnxruntime CPU: original, compressed and hand-built oracles.

Cases (egp_fx.testing.planted.LLM_CASES; random init from Hugging Face configs, no weights
downloaded; dead FFN units planted after the published profile, 70% in the first layer falling
to 0 by the middle):
  opt-125m    OPT (12 layers, d=768, FFN 3072, ReLU)
  llama-200m  LLaMA architecture (12 layers, d=1024, gated FFN 2816, SiLU; dead gate units)
  bert-base   BERT-base (12 layers, d=768, FFN 3072, GELU)
Models per case: "original" (the Hugging Face model), "compressed" (egp_fx.compress, target
ort-cpu), "oracle" (the FFN layers narrowed by hand to exactly the units that fire on the
calibration data) and "oracle-16" (the same, widths rounded up to a multiple of 16, as the
ort-cpu target keeps them). All are exported to ONNX (egp_fx.export_onnx, parity checked) and
timed interleaved by egp_fx.benchmark on ort-cpu, batch 1 and 8 at sequence 128. The baseline of
every speed-up is the original, exported and run the same way.

    .venv/bin/python benchmarks/bench_llm.py                 # writes results/llm_cpu.{json,md}
    .venv/bin/python benchmarks/bench_llm.py --cases opt-125m --quick
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.fx
from _common import add_results_arg, header, setup_logging, write
from _results import by_batch, plain_runs, table

import egp_fx
from egp_fx.bench import benchmark
from egp_fx.testing.planted import LLM_CASES, llm_oracle, observed_dead, tokens

log = logging.getLogger("bench_llm")


def run_case(name: str, args) -> dict:
    case = LLM_CASES[name]
    model, planted = case.build()
    calib = tokens(case.vocab, args.calib_batches, 4, args.seq, seed=1)
    start = time.perf_counter()
    compressed = egp_fx.compress(model, calib, progress=False)
    seconds = time.perf_counter() - start
    never = observed_dead(case.ffn, model, calib)
    models = {"original": model, "compressed": compressed,
              "oracle": llm_oracle(case.ffn, model, never),
              "oracle-16": llm_oracle(case.ffn, model, never, multiple=16)}
    held_out = tokens(case.vocab, 1, 2, args.seq, seed=99)[0]
    report = egp_fx.report_of(compressed)
    with torch.no_grad():
        def call(m):
            hf = not isinstance(m, torch.fx.GraphModule) and case.ffn.decoder
            return m(**held_out, use_cache=False) if hf else m(**held_out)
        ref = call(model)[0]
        errors = {n: float((call(m)[0] - ref).abs().max() / ref.abs().max())
                  for n, m in models.items() if n != "original"}
    one = {k: v[:1] for k, v in tokens(case.vocab, 1, 1, args.seq, seed=5)[0].items()}
    result = benchmark(models, one, batch_sizes=args.batch_sizes, backends=("ort-cpu",),
                       repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    return {"case": name, "planted_dead_units": sum(len(v) for v in planted.values()),
            "never_fired_units": sum(len(v) for v in never.values()),
            "decisions": {p: [str(d) for d in ds] for p, ds in report.decisions_by_path().items()},
            "compress_seconds": seconds, "report_max_error": report.max_error,
            "held_out_rel_err": errors, "result": result}


def summary(runs: list[dict]) -> str:
    cells = []
    for run in runs:
        for batch, m in by_batch(run["result"]):
            o, c, x, x16 = m["original"], m["compressed"], m["oracle"], m["oracle-16"]
            cells.append([run["case"], batch, f"{o.median_ms:.2f}", f"{c.median_ms:.2f}",
                          f"{x.median_ms:.2f}", f"{x16.median_ms:.2f}", f"{c.speedup:.3f}x",
                          f"{c.median_ms / x16.median_ms:.3f}", f"{c.median_ms / x.median_ms:.3f}",
                          f"{o.params:,} -> {c.params:,} ({x.params:,})",
                          f"{o.flops / 1e9:.2f} -> {c.flops / 1e9:.2f}"])
    head = ["case", "batch", "original ms", "compressed ms", "oracle ms", "oracle-16 ms",
            "compressed speedup", "compressed / oracle-16", "compressed / oracle",
            "params original -> compressed (oracle)", "GFLOPs original -> compressed"]
    return "\n".join(table("lrrrrrrrrll", head, cells)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(LLM_CASES))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    ap.add_argument("--out-stem", default="llm_cpu", help="results/STEM.{json,md}")
    add_results_arg(ap)
    ap.add_argument("--quick", action="store_true", help="seq 32, batch 1, 3 repeats; not written")
    args = ap.parse_args()
    setup_logging()
    if args.quick:
        args.seq, args.batch_sizes, args.repeats, args.warmup = 32, [1], 3, 1
    title, meta = header("Language models on onnxruntime CPU: original, compressed, oracles",
                         args.threads)
    start = time.perf_counter()
    runs = [run_case(name, args) for name in args.cases]
    text = "\n".join([
        title, f"Wall time {time.perf_counter() - start:.0f} s. Random-init models built from "
        "Hugging Face configs (no weights downloaded); dead FFN units planted after the "
        "published profile; calibration 2 x 4 sequences of random tokens. Medians of "
        "interleaved runs; speed-ups against the original exported the same way.", "",
        summary(runs), ""] + [
        f"- {r['case']}: {r['planted_dead_units']} planted dead units, "
        f"{r['never_fired_units']} units that never fire on the calibration data (the oracles "
        f"remove them all); compress {r['compress_seconds']:.1f} s, report error "
        f"{r['report_max_error']:.2e}; relative error on held-out tokens: "
        + ", ".join(f"{k} {v:.2e}" for k, v in r["held_out_rel_err"].items()) for r in runs])
    if args.quick:
        print(text)
        return
    payload = {**meta, "runs": plain_runs(runs, nest=True)}
    write(args.out_stem, payload, text + "\n", args.results)


if __name__ == "__main__":
    main()
