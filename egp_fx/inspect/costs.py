"""Per-node cost of a GraphModule: output shape, FLOPs and parameters.

FLOPs are counted the way egp_fx.pipeline.measures counts the whole model (torch.utils.flop_counter, one
sample, a multiply-add = 2 FLOPs), but node by node: an fx.Interpreter runs each node under its
own FlopCounterMode. The per-node figures therefore add up to measures.count_flops.

Parameters follow measures.count_params (parameters and constant buffers, BatchNorm running
statistics excluded) and are charged to the node that uses them first: a call_module node owns
its module's tensors, a get_attr node the tensor it fetches. A tensor used twice is counted once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from egp_fx.ir.batches import as_batch
from egp_fx.ir.copying import device_of
from egp_fx.ir.shapes import flat_args
from egp_fx.pipeline.measures import RUNNING_STATS as _RUNNING_STATS


@dataclass(frozen=True)
class NodeCost:
    shape: tuple[int, ...] | None   # output shape (first tensor of a tuple output), batch 1
    flops: int
    params: int


def _shape(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        for item in value:
            shape = _shape(item)
            if shape is not None:
                return shape
    return None


def _tensors_of(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return [*mod.parameters(), *(b for name, b in mod.named_buffers()
                                     if name.rsplit(".", 1)[-1] not in _RUNNING_STATS)]
    if node.op == "get_attr":
        *path, leaf = str(node.target).split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        value = getattr(owner, leaf)
        if isinstance(value, torch.Tensor) and leaf not in _RUNNING_STATS:
            return [value]
    return []


class _CostInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.costs: dict[str, NodeCost] = {}
        self._seen: set[int] = set()

    def run_node(self, n: fx.Node):
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        params = 0
        for t in _tensors_of(self.module, n):
            if id(t) not in self._seen:
                self._seen.add(id(t))
                params += t.numel()
        self.costs[n.name] = NodeCost(_shape(out), int(counter.get_total_flops()), params)
        return out


def node_costs(gm: fx.GraphModule, example) -> dict[str, NodeCost]:
    """Node name -> NodeCost, from one run of `gm` on the first sample of `example` (a tensor or
    a batch)."""
    device = device_of(gm)
    batch = as_batch(example).head(1).to(device)
    interp = _CostInterpreter(gm)
    with torch.no_grad():
        interp.run(*flat_args(gm, batch))
    return interp.costs
