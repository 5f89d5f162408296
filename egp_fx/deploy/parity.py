"""Does the ONNX file compute what the module computes? Judged per output, by its scale.

For every output tensor and every check batch the error is max |ort - torch| / max |torch| (the
measure compress uses, egp_fx.ir.compare; NaN/Inf that torch does not produce are failures). The
file passes when every output's error is within `tolerance` (1e-4 by default), or within
NOISE_FACTOR (10) times torch's own float32 rounding noise on that output, whichever is larger:
the noise is max |torch float32 - torch float64| / max |torch float64|, measured (only when an
output is beyond `tolerance`) on a float64 copy of the module. Two float32 runtimes that sum in
different orders each sit about that far from the exact result; in a deep network whose outputs
come out of large cancelling sums (a random Inception-v3: outputs of magnitude 3,000, errors of
5e-5 of that) this is more than 1e-4, while a wrong weight or a wrong op moves the outputs by
far more. The rule is the one compress verifies rewrites with. An element-wise criterion
(|ort - torch| <= atol + rtol |torch|) is not used: on outputs near zero it refuses exports that
are exact to rounding. The element-wise figures are reported all the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from egp_fx.errors import ParityError
from egp_fx.ir.batches import Batch
from egp_fx.ir.compare import Mismatch, compare

NOISE_FACTOR = 10.0


@dataclass
class Parity:
    max_abs_err: float = 0.0          # max |ort - torch| over all outputs and batches
    max_rel_err: float = 0.0          # max over outputs of max |ort - torch| / max |torch|
    max_elementwise_rel_err: float = 0.0   # max |ort - torch| / max(|torch|, 1e-12)
    float32_noise: float | None = None     # torch's own float32 noise where it was needed


def _noise(reference64, batch: Batch, want: list[torch.Tensor]) -> list[float] | None:
    """Per output: max |torch float32 - torch float64| / max |float64| (None if not measurable)."""
    if reference64 is None:
        return None
    try:
        exact = reference64(batch)
    except Exception:  # noqa: BLE001  (an op without float64 support: the tolerance decides)
        return None
    out = []
    for w, e in zip(want, exact):
        measured = compare([w.double()], [e.double()])
        if isinstance(measured, Mismatch):
            return None
        diff, scale = measured
        out.append(diff / scale if scale > 0 else diff)
    return out


def check_parity(path: Path, reference: callable, batches: list[Batch], input_names: list[str],
                 tolerance: float, reference64: callable | None = None) -> Parity:
    """Run the ONNX file on `batches` and compare with reference(batch) -> list of tensors;
    reference64(batch), the same in float64, gives the noise floor (see the module doc)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3   # a failing run is reported by the ParityError, not on stderr
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    result = Parity()
    for batch in batches:
        want = reference(batch)
        feed = {name: t.numpy() for name, t in zip(input_names, batch.tensors())}
        got = [torch.from_numpy(np.asarray(g)) for g in session.run(None, feed)]
        if len(got) != len(want):
            raise ParityError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
        noise = None
        for k, (g, w) in enumerate(zip(got, want)):
            measured = compare([g], [w])
            if isinstance(measured, Mismatch):
                raise ParityError(f"output {k} at inputs {batch.describe()}: {measured.reason}")
            diff, scale = measured
            rel = diff / scale if scale > 0 else diff
            elementwise = float(((g.double() - w.double()).abs()
                                 / w.double().abs().clamp(min=1e-12)).max()) if w.numel() else 0.0
            result.max_abs_err = max(result.max_abs_err, diff)
            result.max_rel_err = max(result.max_rel_err, rel)
            result.max_elementwise_rel_err = max(result.max_elementwise_rel_err, elementwise)
            bound = tolerance
            if math.isfinite(rel) and rel > tolerance:
                noise = noise if noise is not None else _noise(reference64, batch, want)
                if noise is not None:
                    result.float32_noise = max(result.float32_noise or 0.0, noise[k])
                    bound = max(tolerance, NOISE_FACTOR * noise[k])
            if not (rel <= bound) or not math.isfinite(rel):
                floor = (f", {NOISE_FACTOR:g}x torch's own float32 noise {noise[k]:.3g}"
                         if noise is not None else "")
                raise ParityError(
                    f"output {k} at inputs {batch.describe()} differs from torch: max abs err "
                    f"{diff:.3g} on outputs of magnitude {scale:.3g} (relative {rel:.3g}, "
                    f"tolerance {tolerance:g}{floor})")
    return result
