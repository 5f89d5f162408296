"""ONNX Runtime backends: ort-cpu and ort-cuda.

- A model given as an nn.Module is exported once per benchmark call with egp_fx.export_onnx
  (parity-checked; a model that does not export is skipped with the exporter's reason); a model
  given as an .onnx path is used as it is. Inputs are fed by name: dict batches by their keys
  (export_onnx names the ONNX inputs after them), positional inputs in order.
- The session is egp_fx.runtime.ort's (the one compress's latency cost times layers with), with
  intra-op threads `threads` (None: onnxruntime's default, one per physical core), sequential
  execution and graph optimisation level `ort_optimization` (default "all" = ORT_ENABLE_ALL,
  which folds BatchNorm into convolutions). With several models interleaved their thread pools
  would spin against each other, so "session.intra_op.allow_spinning" is "0" unless `spinning`
  says otherwise; the setting is recorded. `save_ort_optimized=True` keeps ORT's optimised graph
  next to each export.
- ort-cpu: CPUExecutionProvider. ort-cuda: CUDAExecutionProvider with numpy inputs
  (host<->device copies are part of the time); skipped, with the reason recorded, when the
  provider is not installed.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from egp_fx.deploy.onnx import export_onnx
from egp_fx.errors import ExportError
from egp_fx.ir.batches import Batch
from egp_fx.runtime.ort import ORT_LEVELS, ort_runner, ort_session

from .registry import Backend, ModelLike, Prepared, Skip, register_backend


@dataclass(frozen=True)
class OrtSettings:
    """The options of the ONNX Runtime backends (see the module docstring)."""
    ort_optimization: str = "all"
    save_ort_optimized: bool = False
    spinning: bool | None = None        # None: spin only when one model is timed

    def __post_init__(self):
        if self.ort_optimization not in ORT_LEVELS:
            raise ValueError(f"ort_optimization must be one of {tuple(ORT_LEVELS)}")


class _Ort(Backend):
    provider: ClassVar[str] = ""
    Settings = OrtSettings

    @property
    def spin(self) -> bool:
        spinning = self.settings.spinning
        return spinning if spinning is not None else len(self.ws.models) == 1

    def available(self) -> str | None:
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            return f"onnxruntime has no {self.provider}"
        return None

    def variants(self):
        return (f"opt-{self.settings.ort_optimization}",)

    def prepare(self, name: str, model: ModelLike, variant: str) -> Prepared:
        path, origin = self._onnx_file(name, model)
        level = self.settings.ort_optimization
        optimized = None
        if self.settings.save_ort_optimized:
            optimized = path.with_name(f"{path.stem}.ort-{level}.onnx")
            self.ws.files[f"{name} (ort-{level})"] = str(optimized)
        session = ort_session(path, self.provider, optimization=level,
                              threads=self.ws.settings.threads, spinning=self.spin,
                              optimized_path=optimized)
        return Prepared(session, f"{origin}, ORT graph optimisation '{level}'")

    def _onnx_file(self, name: str, model: ModelLike) -> tuple[Path, str]:
        """The model's ONNX file (given, exported earlier in this call, or exported now) and
        where it came from."""
        if not isinstance(model, nn.Module):
            return Path(model), "ONNX file as given"
        if name not in self.ws.exports:
            path = self.ws.folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.onnx"
            try:
                result = export_onnx(model, path, self.ws.make_input(1))
            except ExportError as exc:
                raise Skip(" ".join(str(exc).splitlines()[:2]), variant="*") from exc
            self.ws.files[name] = str(path)
            self.ws.exports[name] = (path, f"ONNX ({result.exporter} exporter)")
        return self.ws.exports[name]

    def runner(self, prepared: Prepared, batch: Batch) -> Callable[[], object]:
        return ort_runner(prepared.handle, batch)

    def recorded_settings(self) -> dict:
        return {"ort_allow_spinning": int(self.spin),
                "ort_optimization": self.settings.ort_optimization}


@register_backend
class OrtCpu(_Ort):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"


@register_backend
class OrtCuda(_Ort):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"

    def available(self) -> str | None:
        reason = super().available()
        return f"{reason} (install onnxruntime-gpu)" if reason else None
