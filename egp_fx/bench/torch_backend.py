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
CUDA calls end with torch.cuda.synchronize() (what torch.utils.benchmark.Timer does), so a row
is wall time per call, launch overheads included. torch-cpu runs with `threads` intra-op threads
when given.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from egp_fx.ir.batches import Batch

from .deploy import deployable
from .registry import Backend, ModelLike, Prepared, Settings, Skip, register_backend

TORCH_VARIANTS = ("fp32", "fp32+cudagraph", "fp32+compile", "fp16", "fp16+cudagraph",
                  "fp16+compile")
DEFAULT_TORCH_VARIANTS = ("fp32", "fp32+cudagraph", "fp16", "fp16+cudagraph")


@dataclass
class _Ready:
    module: nn.Module
    dtype: torch.dtype
    call: str               # "eager", "cudagraph" or "compile"


class _Torch(Backend):
    device: ClassVar[str] = "cpu"
    compile_mode: ClassVar[str | None] = None

    @classmethod
    def check(cls, settings: Settings) -> None:
        bad = [v for v in settings.torch_variants if v not in TORCH_VARIANTS]
        if bad:
            raise ValueError(f"unknown torch variants {bad}; choose from {TORCH_VARIANTS}")

    def variants(self):
        return self.ws.settings.torch_variants

    def prepare(self, name: str, model: ModelLike, variant: str) -> Prepared:
        if not isinstance(model, nn.Module):
            raise Skip("given as an ONNX file")
        dtype = torch.float16 if variant.startswith("fp16") else torch.float32
        call = variant.partition("+")[2] or "eager"
        module, how = deployable(model, self.ws.settings.fold_batchnorm)
        module = module.to(device=self.device, dtype=dtype)
        if call == "compile":
            module = torch.compile(module, mode=self.compile_mode, dynamic=False)
            how += f"; torch.compile(mode={self.compile_mode!r}, dynamic=False)"
        return Prepared(_Ready(module, dtype, call), how)

    def runner(self, prepared: Prepared, batch: Batch) -> Callable[[], object]:
        ready: _Ready = prepared.handle
        batch = batch.to(device=self.device, dtype=ready.dtype)
        if ready.call == "cudagraph":
            return _cuda_graph_runner(ready.module, batch)
        return _eager_runner(ready.module, batch, cuda=self.device == "cuda",
                             mark_step=ready.call == "compile" and self.device == "cuda")


@register_backend
class TorchCpu(_Torch):
    name = "torch-cpu"
    device = "cpu"

    def variant_unavailable(self, variant: str) -> str | None:
        return "CUDA graphs need a GPU" if "cudagraph" in variant else None

    def timing(self) -> contextlib.AbstractContextManager:
        return _torch_threads(self.ws.settings.threads)


@register_backend
class TorchCuda(_Torch):
    name = "torch-cuda"
    device = "cuda"
    compile_mode = "reduce-overhead"

    def available(self) -> str | None:
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False (no GPU)"


def _eager_runner(module: nn.Module, batch: Batch, cuda: bool, mark_step: bool = False):
    def run():
        if mark_step:   # a new inference step for the CUDA graphs of torch.compile
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            out = batch(module)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run


def _cuda_graph_runner(module: nn.Module, batch: Batch):
    static = batch.map(torch.clone)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (cuDNN autotuning, lazy init)
            static(module)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = static(module)

    def run():
        graph.replay()
        torch.cuda.synchronize()
        return static_out

    return run


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
