"""Coverage of torchvision and timm: what egp_fx sees, and whether compress is exact, per model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_coverage.py [--timeout 600]
        [--max-params 1e8] [--only timm|torchvision] [--models NAME ...] [--out coverage]
        [--results DIR] [--resume] [--render]

Every torchvision classification model, and one model of every timm family that builds offline
(timm.list_models() grouped by the module each model comes from: the one with the fewest
parameters, at most --max-params, test_* models left out). Each runs in a worker process with a
time limit (_coverage_case.py says what a row measures). A model is *fully covered* when every
activation call that runs is analysed, compress is exact on the calibration data (float64
relative error <= 1e-5), the planted dead units shrink the model, and the compressed model
exports to ONNX with onnxruntime parity. Writes results/<out>.md and results/<out>.json (or in
--results DIR); results/<out>.partial.json holds the rows measured so far, and --resume keeps
them and measures only the models (timm: families) they lack; --render rewrites the markdown
from the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time

from _common import add_results_arg, header, header_of, setup_logging, write
from _coverage_case import pick, run_case

log = logging.getLogger("bench_coverage")
TITLE = "Coverage: torchvision and timm, planted dead units, random weights"


class Workers:
    """One worker process at a time, replaced after a time-out or every `tasks` tasks."""

    def __init__(self, tasks: int = 20):
        self.ctx, self.tasks, self.pool = mp.get_context("spawn"), tasks, None

    def call(self, fn, args, timeout: float):
        if self.pool is None:
            self.pool = self.ctx.Pool(1, maxtasksperchild=self.tasks)
        try:
            return self.pool.apply_async(fn, args).get(timeout)
        except mp.TimeoutError:
            self.close()
            raise
        except Exception:  # a worker that died (killed for memory, crashed)
            self.close()
            raise

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _done(row: dict) -> tuple[str, str]:
    """What a row stands for: a torchvision model, or a timm family."""
    return (row["source"], row["model"] if row["source"] == "torchvision" else row["family"])


def _cases(args, workers, done: set) -> list[tuple[str, str, dict]]:
    import timm
    import torchvision

    cases = []
    if args.only in (None, "torchvision"):
        cases += [("torchvision", n, {}) for n in torchvision.models.list_models(
            module=torchvision.models) if (not args.models or n in args.models)
            and ("torchvision", n) not in done]
    if args.only in (None, "timm"):
        for family in timm.list_modules():
            if ("timm", family) in done:
                continue
            members = timm.list_models(module=family)
            if args.models:
                cases += [("timm", m, {"family": family, "models": len(members)})
                          for m in args.models if m in members]
                continue
            try:
                chosen = workers.call(pick, (family, args.max_params), args.timeout)
            except Exception as err:  # noqa: BLE001
                chosen = {"family": family, "model": None, "reason": f"selection: {err!r}"}
            cases.append(("timm", chosen["model"], chosen))
    return cases


def _row(source, name, info, workers, timeout) -> dict:
    if name is None:
        return {"source": source, "model": None, "family": info["family"], "wall_s": 0.0,
                "failure": f"no model to build: {info['reason']}"}
    t0 = time.perf_counter()
    try:
        row = workers.call(run_case, (source, name), timeout)
    except mp.TimeoutError:
        row = {"source": source, "model": name, "failure": f"time-out after {timeout:.0f} s"}
    except Exception as err:  # noqa: BLE001  (the worker died)
        row = {"source": source, "model": name, "failure": f"worker died: {err!r}"}
    row.update(family=info.get("family", "torchvision"), family_models=info.get("models"),
               wall_s=round(time.perf_counter() - t0, 1))
    return row


def _pct(before, after) -> str:
    return f"{100 * (before - after) / before:.1f}%" if before else "-"


def _cells(r: dict) -> list[str]:
    name = r["model"] or "-"
    if "run" not in r or "seen" not in r:
        return [r["source"], r["family"], name, str(r.get("side", "-")), "-", "-", "-", "-", "-",
                "-", "-", "-", "no: " + r["failure"]]
    err = f"{r['err64']:.1e}" if r.get("err64") is not None else f"{r['err32']:.1e} (fp32)"
    noise = f"{r['noise32']:.1e}" if r.get("noise32") is not None else "-"
    onnx = f"{r['onnx']['max_rel_err']:.1e}" if r["onnx"]["ok"] else "failed"
    capture = r["capture"] + ("*" if r.get("fx_failure") else "")
    return [r["source"], r["family"], name, str(r["side"]), capture, f"{r['run']} / {r['seen']}",
            err, noise, _pct(r["params_before"], r["params_after"]),
            _pct(r["flops_before"], r["flops_after"]), onnx, f"{r['compress_s']:.1f}",
            "yes" if r["failure"] is None else "no: " + r["failure"]]


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " ... (whole message in the JSON)"


def markdown(rows: list[dict], head: str) -> str:
    measured = [r for r in rows if r["model"] is not None]
    unbuilt = [r for r in rows if r["model"] is None]
    timm_rows = [r for r in measured if r["source"] == "timm"]
    tv_rows = [r for r in measured if r["source"] == "torchvision"]
    ok = lambda rs: sum(r["failure"] is None for r in rs)  # noqa: E731
    calls = lambda rs: (sum(r.get("seen", 0) for r in rs), sum(r.get("run", 0) for r in rs))  # noqa: E731
    lines = [head, f"**{ok(timm_rows)} of {len(timm_rows)} timm families fully covered; "
             f"{ok(tv_rows)} of {len(tv_rows)} torchvision classification models fully "
             f"covered.** Activation calls analysed: {calls(timm_rows)[0]} of the "
             f"{calls(timm_rows)[1]} that run (timm), {calls(tv_rows)[0]} of {calls(tv_rows)[1]} "
             f"(torchvision).", ""]
    if unbuilt:
        lines += [f"Not measured ({len(unbuilt)} timm families): "
                  + "; ".join(f"{r['family']} ({r['failure'].removeprefix('no model to build: ')})"
                              for r in unbuilt) + ".", ""]
    failures = [r for r in measured if r["failure"] is not None]
    if failures:
        lines += ["Not fully covered:", ""]
        lines += [f"- {r['source']} {r['family']} / {r['model']}: {_short(r['failure'])}"
                  for r in failures]
        lines.append("")
    lines += [
        "Fully covered: every activation call that runs is analysed (run = seen); compress is "
        "exact on the calibration data (float64 relative error within 1e-5, or within 10x the "
        "planted model's own float32 rounding noise, compress's own rule: rewritten weights are "
        "stored in float32; fp32 error within 1e-4 where the model does not run in float64); "
        "the planted dead units shrink the model (params or FLOPs); and the compressed model "
        "exports to ONNX with onnxruntime parity (egp_fx.export_onnx: relative error <= 1e-4, or "
        "10x the planted model's own float32 noise where that is larger).",
        "",
        "Each model: random weights, BatchNorms given random affine parameters; then every 4th "
        "channel of each BatchNorm or conv/linear writing an activation's input (through "
        "reshapes and sums) is made constant (-30, or 0 where that is not dead), and every "
        "BatchNorm's running statistics are fitted to the calibration data, as training would "
        "(benchmarks/_coverage_case.py). Calibration: 2 batches of 2 random images.",
        "",
        "Columns: px, input side; capture, torch.fx or torch.export (* when torch.fx failed "
        "first, the reason in the JSON); activations, calls that run on one sample "
        "(dispatch-level count on the model itself) / calls calibration analysed; error, float64 "
        "relative output error of the compressed model vs the planted model on the calibration "
        "batches; noise, the planted model's own float32 rounding noise; removed, share of "
        "params / FLOPs compress removed (params can grow where a module called several times "
        "is copied per call); ONNX, onnxruntime vs torch relative error; seconds, the whole "
        "compress call (calibration included).", "",
        "| source | family | model | px | capture | activations run / seen | error | noise | "
        "params removed | FLOPs removed | ONNX | seconds | fully covered |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_short(c).replace("|", "\\|") for c in _cells(r)) + " |"
              for r in measured]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--max-params", type=float, default=1e8)
    ap.add_argument("--only", choices=("timm", "torchvision"))
    ap.add_argument("--models", nargs="*", help="only these models (timm: instead of the "
                    "smallest of their family)")
    ap.add_argument("--out", default="coverage")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of results/<out>.partial.json, measure the rest")
    add_results_arg(ap)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite results/<out>.md from results/<out>.json")
    args = ap.parse_args()
    setup_logging()
    if args.render:
        payload = json.loads((args.results / f"{args.out}.json").read_text())
        (args.results / f"{args.out}.md").write_text(
            markdown(payload["rows"], header_of(TITLE, payload)))
        return
    head, meta = header(TITLE, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    partial = args.results / f"{args.out}.partial.json"
    rows = json.loads(partial.read_text()) if args.resume and partial.exists() else []
    if rows:
        log.info("resuming: %d rows kept from %s", len(rows), partial.name)
    workers = Workers()
    try:
        cases = _cases(args, workers, {_done(r) for r in rows})
        log.info("%d models to measure", len(cases))
        for i, (source, name, info) in enumerate(cases):
            rows.append(_row(source, name, info, workers, args.timeout))
            log.info("[%d/%d] %s %s: %s (%.0f s)", i + 1, len(cases), source, name,
                     rows[-1]["failure"] or "fully covered", rows[-1]["wall_s"])
            partial.write_text(json.dumps(rows, indent=1, default=str))
    finally:
        workers.close()
    write(args.out, {**meta, "rows": rows}, markdown(rows, head), args.results)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
