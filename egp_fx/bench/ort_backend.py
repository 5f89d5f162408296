"""ONNX Runtime backends: ort-cpu and ort-cuda.

- A model given as an nn.Module is exported once per benchmark call with egp_fx.export_onnx
  (parity-checked; a model that does not export is skipped with the exporter's reason); a model
  given as an .onnx path is used as it is. Inputs are fed by name: dict batches by their keys
  (export_onnx names the ONNX inputs after them), positional inputs in order.
- ort-cpu: CPUExecutionProvider, intra-op threads `threads` (None: onnxruntime's default, one
  per physical core), sequential execution, graph optimisation level `ort_optimization`
  (default "all" = ORT_ENABLE_ALL, which folds BatchNorm into convolutions). With several models
  interleaved their thread pools would spin against each other, so
  "session.intra_op.allow_spinning" is "0" unless `spinning` says otherwise; the setting is
  recorded. `save_ort_optimized=True` keeps ORT's optimised graph next to each export.
- ort-cuda: CUDAExecutionProvider with numpy inputs (host<->device copies are part of the time);
  skipped, with the reason recorded, when the provider is not installed.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from torch import nn

from egp_fx.deploy.onnx import export_onnx
from egp_fx.errors import ExportError
from egp_fx.ir.batches import Batch

from .registry import Backend, ModelLike, Prepared, Settings, Skip, register_backend

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class _Ort(Backend):
    provider: ClassVar[str] = ""

    @classmethod
    def check(cls, settings: Settings) -> None:
        if settings.ort_optimization not in ORT_LEVELS:
            raise ValueError(f"ort_optimization must be one of {tuple(ORT_LEVELS)}")

    def available(self) -> str | None:
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            return f"onnxruntime has no {self.provider}"
        return None

    def variants(self):
        return (f"opt-{self.ws.settings.ort_optimization}",)

    def prepare(self, name: str, model: ModelLike, variant: str) -> Prepared:
        import onnxruntime as ort

        path, origin = self._onnx_file(name, model)
        s = self.ws.settings
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                   ORT_LEVELS[s.ort_optimization])
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = s.threads or 0
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(s.spin)))
        if s.save_ort_optimized:
            optimized = path.with_name(f"{path.stem}.ort-{s.ort_optimization}.onnx")
            options.optimized_model_filepath = str(optimized)
            self.ws.files[f"{name} (ort-{s.ort_optimization})"] = str(optimized)
        session = ort.InferenceSession(str(path), options, providers=[self.provider])
        return Prepared(session, f"{origin}, ORT graph optimisation '{s.ort_optimization}'")

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
        session = prepared.handle
        feed = ort_feed(session, batch)
        return lambda: session.run(None, feed)

    def recorded_settings(self) -> dict:
        s = self.ws.settings
        return {"ort_allow_spinning": int(s.spin), "ort_optimization": s.ort_optimization}


def ort_feed(session, batch: Batch) -> dict:
    """numpy inputs for `session`: dict batches by input name, positional ones in order."""
    names = [i.name for i in session.get_inputs()]
    if batch.kwargs:
        missing = [n for n in names if n not in batch.kwargs]
        if missing:
            raise ValueError(f"the ONNX model's inputs {missing} are not in the batch "
                             f"(keys {sorted(batch.kwargs)})")
        return {n: batch.kwargs[n].detach().cpu().numpy() for n in names}
    if len(names) != len(batch.args):
        raise ValueError(f"the ONNX model takes {len(names)} inputs, the batch has "
                         f"{len(batch.args)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, batch.args)}


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
