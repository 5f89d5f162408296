"""Does the ONNX file compute what the module computes? Judged per output, by its scale.

For every output tensor and every check batch the error is max |ort - torch| / max |torch| (the
measure compress uses, egp_fx.verify; NaN/Inf that torch does not produce are failures). The
file passes when every output's error is within `tolerance`, 1e-4 by default: float32
accumulation in two runtimes through a deep network differs by about 1e-6 of the output scale,
while a wrong weight or a wrong op moves it by far more. An element-wise criterion
(|ort - torch| <= atol + rtol |torch|) is not used: on outputs near zero it refuses exports that
are exact to rounding. The element-wise figures are reported all the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Batch
from ..verify import Mismatch, compare


class ParityError(Exception):
    """onnxruntime and torch disagree beyond the tolerance."""


@dataclass
class Parity:
    max_abs_err: float = 0.0          # max |ort - torch| over all outputs and batches
    max_rel_err: float = 0.0          # max over outputs of max |ort - torch| / max |torch|
    max_elementwise_rel_err: float = 0.0   # max |ort - torch| / max(|torch|, 1e-12)


def check_parity(path: Path, reference: callable, batches: list[Batch], input_names: list[str],
                 tolerance: float) -> Parity:
    """Run the ONNX file on `batches` and compare with reference(batch) -> list of tensors."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = Parity()
    for batch in batches:
        want = reference(batch)
        feed = {name: t.numpy() for name, t in zip(input_names, batch.tensors())}
        got = [torch.from_numpy(np.asarray(g)) for g in session.run(None, feed)]
        if len(got) != len(want):
            raise ParityError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
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
            if not (rel <= tolerance) or not math.isfinite(rel):
                raise ParityError(
                    f"output {k} at inputs {batch.describe()} differs from torch: max abs err "
                    f"{diff:.3g} on outputs of magnitude {scale:.3g} (relative {rel:.3g}, "
                    f"tolerance {tolerance:g})")
    return result
