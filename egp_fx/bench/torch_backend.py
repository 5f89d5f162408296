"""torch backends: torch-cpu and torch-cuda.

Every model is timed as a user would deploy it: a copy in eval mode with BatchNorm folded
(deploy.py; `fold_batchnorm=False` times it as given), cast to the variant's dtype, on the
backend's device. Variants:
- "fp32", "fp16": eager calls under torch.inference_mode();
- "+cudagraph" (CUDA only): captured once per batch size after a warm-up on a side stream
  (torch.cuda.graphs); a call is one graph replay;
- "+compile": torch.compile(dynamic=False), compiled once per batch size by the first call,
  outside the timing; on CUDA with mode="reduce-overhead" (CUDA graphs through
  torch.compile), on the CPU with the default mode.
The calls are egp_fx.runtime.torch_calls' (the ones compress's latency cost times layers with):
CUDA calls end with torch.cuda.synchronize() (what torch.utils.benchmark.Timer does), so a row
is wall time per call, launch overheads included. torch-cpu runs with `threads` intra-op threads
when given. Options (TorchSettings): `torch_variants`, `fold_batchnorm`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from egp_fx.ir.batches import Batch
from egp_fx.runtime.torch_calls import cuda_graph_runner, eager_runner, torch_threads

from .deploy import deployable
from .registry import Backend, ModelLike, Prepared, Skip, register_backend

TORCH_VARIANTS = ("fp32", "fp32+cudagraph", "fp32+compile", "fp16", "fp16+cudagraph",
                  "fp16+compile")
DEFAULT_TORCH_VARIANTS = ("fp32", "fp32+cudagraph", "fp16", "fp16+cudagraph")


@dataclass
class _Ready:
    module: nn.Module
    dtype: torch.dtype
    call: str               # "eager", "cudagraph" or "compile"


@dataclass(frozen=True)
class TorchSettings:
    """The options of the torch backends (see the module docstring)."""
    torch_variants: tuple[str, ...] = DEFAULT_TORCH_VARIANTS
    fold_batchnorm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "torch_variants", tuple(self.torch_variants))
        bad = [v for v in self.torch_variants if v not in TORCH_VARIANTS]
        if bad:
            raise ValueError(f"unknown torch variants {bad}; choose from {TORCH_VARIANTS}")


class _Torch(Backend):
    device: ClassVar[str] = "cpu"
    compile_mode: ClassVar[str | None] = None
    Settings = TorchSettings

    def variants(self):
        return self.settings.torch_variants

    def prepare(self, name: str, model: ModelLike, variant: str) -> Prepared:
        if not isinstance(model, nn.Module):
            raise Skip("given as an ONNX file")
        dtype = torch.float16 if variant.startswith("fp16") else torch.float32
        call = variant.partition("+")[2] or "eager"
        module, how = deployable(model, self.settings.fold_batchnorm)
        module = module.to(device=self.device, dtype=dtype)
        if call == "compile":
            module = torch.compile(module, mode=self.compile_mode, dynamic=False)
            how += f"; torch.compile(mode={self.compile_mode!r}, dynamic=False)"
        return Prepared(_Ready(module, dtype, call), how)

    def runner(self, prepared: Prepared, batch: Batch) -> Callable[[], object]:
        ready: _Ready = prepared.handle
        batch = batch.to(device=self.device, dtype=ready.dtype)
        if ready.call == "cudagraph":
            return cuda_graph_runner(ready.module, batch)
        return eager_runner(ready.module, batch, cuda=self.device == "cuda",
                            mark_step=ready.call == "compile" and self.device == "cuda")


@register_backend
class TorchCpu(_Torch):
    name = "torch-cpu"
    device = "cpu"

    def variant_unavailable(self, variant: str) -> str | None:
        return "CUDA graphs need a GPU" if "cudagraph" in variant else None

    def timing(self) -> contextlib.AbstractContextManager:
        return torch_threads(self.ws.settings.threads)


@register_backend
class TorchCuda(_Torch):
    name = "torch-cuda"
    device = "cuda"
    compile_mode = "reduce-overhead"

    def available(self) -> str | None:
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False (no GPU)"
