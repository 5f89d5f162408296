"""One synchronous call of a torch module, as the benchmark and the latency cost both make it.

- eager_runner: the module called under torch.inference_mode(); on CUDA the call ends in
  torch.cuda.synchronize() (what torch.utils.benchmark.Timer does), so a timing is wall time
  per call, launch overheads included; `mark_step` starts a new inference step for the CUDA
  graphs of torch.compile(mode="reduce-overhead");
- cuda_graph_runner: captured once after a warm-up on a side stream (torch.cuda.graphs); a call
  is one graph replay, then a synchronize;
- torch_threads: torch's intra-op threads set for the duration of a context.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from egp_fx.ir.batches import Batch


def eager_runner(module: nn.Module, batch: Batch, cuda: bool,
                 mark_step: bool = False) -> Callable[[], object]:
    def run():
        if mark_step:   # a new inference step for the CUDA graphs of torch.compile
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            out = batch(module)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run


def cuda_graph_runner(module: nn.Module, batch: Batch) -> Callable[[], object]:
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
def torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
