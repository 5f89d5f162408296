"""One row of the coverage table: build a model, plant dead units, compress, check, export.

    run_case("timm", "mobilenetv2_100") -> dict

- build: random weights (pretrained=False / weights=None), eval mode; the first input side the
  model accepts among 64, 56, 96, 112, 128, 224 (timm /
  torchvision ViTs are rebuilt for that side with img_size= / image_size= where they take it:
  56 and 112 suit patch 14), else the model's own input size;
- plant: BatchNorms get random affine parameters (egp_fx.testing.planting.realistic_bn), then
  plant_dead_units makes every 4th channel of each BatchNorm or conv/linear that
  writes an activation's input constant (a dead unit, whatever the kind), then every BatchNorm's
  running statistics are set to the calibration data's (fit_bn_statistics, the BatchNorms alone
  in training mode), as training would:
  with default statistics the signal of many random networks vanishes with depth (a torchvision
  efficientnet_b0 then outputs values near 1e-13), and no relative error means anything;
- run vs seen: activation calls that run in the planted model on one sample, counted at dispatch
  level (capture.coverage.ActivationCounter, independent of the capture), against those
  calibration analysed (the report's coverage record), and where the others hide;
- compress on 2 batches of 2 random images (seconds: the whole call, calibration included);
- exact: max |compressed(x) - model(x)| / max |model(x)| on the calibration batches, in
  float64 on copies, and float32. Folded weights are stored in float32, so even in float64 the
  compressed model differs from the planted one by the float32 rounding of its rewritten
  weights, amplified by the depth of the network: the rule is compress's own (egp_fx.ir.compare),
  exact when within 1e-5 or within 10x the planted model's own float32 rounding noise (its
  float32 vs float64 outputs);
- ONNX: egp_fx.export_onnx of the compressed model and its onnxruntime parity (batch of 2), to
  its default tolerance (1e-4 relative) or 10x the planted model's own float32 noise if larger
  (onnxruntime rounds differently from torch, and deep random networks amplify rounding).
"""
from __future__ import annotations

import copy
import re
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import egp_fx
from egp_fx.capture.coverage import ActivationCounter
from egp_fx.testing.planting import fit_bn_statistics, plant_dead_units, realistic_bn

SIDES = (64, 56, 96, 112, 128, 224)
EXACT = 1e-5                  # float64 relative error allowed (tests/test_compress.py)
BATCHES, BATCH = 2, 2


def _factory(source: str, name: str):
    if source == "timm":
        import timm
        return lambda **kw: timm.create_model(name, pretrained=False, **kw)
    import torchvision
    return lambda **kw: torchvision.models.get_model(name, weights=None, **kw)


def _runs(model: nn.Module, side: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, side, side))
        return True
    except Exception:  # noqa: BLE001  (any failure means: not at this size)
        return False


def build(source: str, name: str) -> tuple[nn.Module, int, dict]:
    """(model in eval mode, input side, extra keywords used)."""
    make = _factory(source, name)
    size_kw = "img_size" if source == "timm" else "image_size"
    torch.manual_seed(0)
    model = make().eval()
    default = model
    for side in SIDES:
        if _runs(model, side):
            return model, side, {}
        try:
            torch.manual_seed(0)
            resized = make(**{size_kw: side}).eval()
        except Exception:  # noqa: BLE001  (the model does not take the keyword)
            continue
        if _runs(resized, side):
            return resized, side, {size_kw: side}
    cfg = getattr(default, "pretrained_cfg", None) or {}
    side = int(cfg.get("input_size", (3, 224, 224))[-1])
    return default, side, {}


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _outputs(model: nn.Module, batches, dtype=None) -> list[torch.Tensor]:
    """First output on each batch, in float64; the model runs in `dtype` (on a copy)."""
    m = copy.deepcopy(model).to(dtype) if dtype is not None else model
    with torch.no_grad():
        return [_first(m(x.to(dtype) if dtype is not None else x)).double() for x in batches]


def _rel(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    return max(float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))
               for o, r in zip(outs, refs))


def _errors(model: nn.Module, small: nn.Module, batches) -> dict:
    """err32 (compressed vs planted, float32), err64 (both run in float64, on copies) and
    noise32 (the planted model's float32 vs float64 outputs). One float64 copy at a time."""
    ref32 = _outputs(model, batches)
    out = {"err32": _rel(_outputs(small, batches), ref32)}
    try:
        ref64 = _outputs(model, batches, torch.float64)
        out.update(noise32=_rel(ref32, ref64),
                   err64=_rel(_outputs(small, batches, torch.float64), ref64))
    except Exception as err:  # noqa: BLE001  (a model with fixed float32 parts)
        out.update(noise32=None, err64=None,
                   err64_failure=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return out


def _count_run(model: nn.Module, x: torch.Tensor) -> int:
    counter = ActivationCounter()
    with torch.no_grad(), counter:
        model(x[:1])
    return counter.total


def _onnx(small: nn.Module, x: torch.Tensor, noise: float | None) -> dict:
    tolerance = max(1e-4, 10 * (noise or 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = egp_fx.export_onnx(small, Path(tmp) / "model.onnx", x, tolerance=tolerance)
        except Exception as err:  # noqa: BLE001  (recorded in the table)
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = "; ".join(lines[1:] or lines)      # ExportError: one line per exporter
            return {"ok": False, "reason": f"{type(err).__name__}: {detail[:500]}"}
    return {"ok": True, "exporter": res.exporter, "max_rel_err": res.max_rel_err,
            "tolerance": tolerance}


def _most_frequent(reasons) -> str | None:
    """The most frequent refusal reason, numbers masked so that one rule counts once."""
    counts = Counter(re.sub(r"\d+", "N", r) for r in reasons)
    return counts.most_common(1)[0][0][:200] if counts else None


def _compress_row(model, batches) -> dict:
    t0 = time.perf_counter()
    small = egp_fx.compress(model, batches, progress=False)
    seconds = time.perf_counter() - t0
    report = egp_fx.report_of(small)
    cov = report.coverage
    b, a = report.before, report.after
    row = {"capture": report.capture.mode, "fx_failure": report.capture.fx_failure,
           "seen": cov.analysed if cov else None,
           "hidden": [h.describe() for h in cov.hidden] if cov else [],
           "params_before": b.params, "params_after": a.params,
           "flops_before": b.flops, "flops_after": a.flops,
           "report_error": report.max_error, "compress_s": round(seconds, 2),
           "refusal": _most_frequent(r.reason for r in report.refusals if r.activation)}
    row.update(_errors(model, small, batches))
    row["onnx"] = _onnx(small, batches[0], row.get("noise32"))
    return row


UNSTABLE = 1e-2     # own float32 noise beyond which a random model's outputs are chaotic


def exact_limit(row: dict) -> float:
    """1e-5, or 10x the model's own float32 noise (float64 check); 1e-4 in float32 only."""
    if row.get("err64") is None:
        return 10 * EXACT
    return max(EXACT, 10 * row["noise32"])


def _reasons(row: dict) -> list[str]:
    out = []
    if row["seen"] != row["run"]:
        hidden = "; ".join(row["hidden"]) or "calls run that the captured graph does not hold"
        out.append(f"{row['run'] - (row['seen'] or 0)} of {row['run']} activation calls not "
                   f"analysed: {hidden}")
    if row["run"] == 0:
        out.append("no activation calls of a kind egp_fx analyses")
    err = row["err64"] if row["err64"] is not None else row["err32"]
    if row.get("noise32") is not None and row["noise32"] > UNSTABLE:
        out.append(f"exactness cannot be checked: the planted random model is numerically "
                   f"unstable (its own float32 and float64 outputs differ by "
                   f"{row['noise32']:.2g} relative)")
    elif not err <= exact_limit(row):
        out.append(f"not exact: relative error {err:.3g} (limit {exact_limit(row):.3g})")
    if not row["planted"]:
        out.append("nothing to plant: no activation's input is written by a BatchNorm or "
                   "conv/linear (through reshapes and sums)")
    elif row["params_after"] >= row["params_before"] and row["flops_after"] >= row["flops_before"]:
        why = f" (most frequent refusal: {row['refusal']})" if row.get("refusal") else ""
        out.append(f"planted dead units in {len(row['planted'])} layers, none removed{why}")
    if not row["onnx"]["ok"]:
        out.append(f"ONNX export: {row['onnx']['reason']}")
    return out


def verdict(row: dict) -> str | None:
    """None when the model is fully covered, else every reason it is not, joined."""
    if row.get("error"):
        return row["error"]
    return " | ".join(_reasons(row)) or None


def pick(family: str, max_params: float) -> dict:
    """The timm model of `family` (a module of timm.models) with the fewest parameters, counted
    on the meta device (nothing allocated); test_* models are left out when others exist."""
    import timm

    warnings.filterwarnings("ignore")
    names = timm.list_models(module=family)
    names = [n for n in names if not n.startswith("test_")] or names
    sizes, failed = {}, 0
    for name in names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            sizes[name] = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001  (not buildable on meta: tried last)
            failed += 1
    ranked = sorted(sizes, key=lambda n: (sizes[n], n)) + [n for n in names if n not in sizes]
    small = [n for n in ranked if sizes.get(n, 0) <= max_params]
    return {"family": family, "models": len(names), "model": small[0] if small else None,
            "params": sizes.get(small[0]) if small else None,
            "reason": None if small else f"every model has more than {max_params:.0f} parameters"}


def run_case(source: str, name: str) -> dict:
    """The table row for one model (failures are recorded, never raised)."""
    warnings.filterwarnings("ignore")
    row: dict = {"source": source, "model": name}
    stage = "build"
    try:
        model, side, kw = build(source, name)
        row.update(side=side, kwargs=kw, params=sum(p.numel() for p in model.parameters()))
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(BATCH, 3, side, side, generator=gen) for _ in range(BATCHES)]
        stage = "capture"
        realistic_bn(model)
        row["planted"] = plant_dead_units(model, batches[0])
        stage = "BatchNorm statistics"
        fit_bn_statistics(model, batches, only_norms=True)
        row["run"] = _count_run(model, batches[0])
        stage = "compress"
        row.update(_compress_row(model, batches))
    except Exception as err:  # noqa: BLE001  (recorded in the table)
        first = str(err).splitlines()[0][:400] if str(err) else ""
        row["error"] = f"{stage}: {type(err).__name__}: {first}"
        row["traceback"] = traceback.format_exc()[-2000:]
    row["failure"] = verdict(row) if "error" not in row else row["error"]
    return row
