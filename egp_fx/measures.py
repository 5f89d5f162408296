"""Size and depth measures of a model, before and after compression.

params      : parameters plus constant buffers (BatchNorm running statistics excluded, as they
              are not part of the deployed function once folded)
flops       : torch.utils.flop_counter.FlopCounterMode on one sample (multiply-add = 2 FLOPs)
weighted_depth  : conv/linear layers on the longest path through the graph
nonlinear_depth : nonlinear activation calls on the longest path
nodes       : number of compute nodes in the fx graph (placeholders/outputs excluded)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .regions import activation_kind
from .tracing import trace

_WEIGHTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.bmm,
                       torch.baddbmm, torch.addmm}
_OTHER_NONLINEAR_MODULES = (nn.Sigmoid, nn.Tanh, nn.Softmax, nn.ELU, nn.Mish, nn.Hardsigmoid)
_OTHER_NONLINEAR_FUNCTIONS = {torch.sigmoid, torch.tanh, F.softmax, torch.softmax, F.elu,
                              F.mish, F.hardsigmoid}
_RUNNING_STATS = {"running_mean", "running_var", "num_batches_tracked"}


@dataclass
class Totals:
    params: int
    flops: int
    weighted_depth: int
    nonlinear_depth: int
    nodes: int

    def to_dict(self) -> dict:
        return asdict(self)


def is_weighted(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _WEIGHTED_MODULES)
    if node.op == "call_function":
        return node.target in _WEIGHTED_FUNCTIONS
    return node.op == "call_method" and node.target in {"matmul", "bmm"}


def is_nonlinear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if activation_kind(node, modules) is not None:
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _OTHER_NONLINEAR_MODULES)
    return node.op == "call_function" and node.target in _OTHER_NONLINEAR_FUNCTIONS


def count_params(module: nn.Module) -> int:
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for name, b in module.named_buffers()
                  if name.rsplit(".", 1)[-1] not in _RUNNING_STATS)
    return params + buffers


def count_flops(module: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one sample, counted on fake tensors (shapes only, no arithmetic)."""
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(example_input[:1])
        with FlopCounterMode(display=False) as counter:
            module(x)
    return int(counter.get_total_flops())


def longest_path_count(gm: fx.GraphModule, predicate) -> int:
    """Largest number of nodes satisfying `predicate` on any path from an input to the output."""
    modules = dict(gm.named_modules())
    best: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:  # fx graphs are stored in topological order
        here = 1 if predicate(node, modules) else 0
        best[node] = here + max((best[i] for i in node.all_input_nodes), default=0)
    return max(best.values(), default=0)


def measure(module: nn.Module, example_input: torch.Tensor) -> Totals:
    gm = module if isinstance(module, fx.GraphModule) else trace(module)
    nodes = sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr"))
    return Totals(count_params(module), count_flops(module, example_input),
                  longest_path_count(gm, is_weighted), longest_path_count(gm, is_nonlinear), nodes)
