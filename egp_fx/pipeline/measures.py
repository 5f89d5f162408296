"""Size and depth measures of a model, before and after compression.

params      : parameters plus constant buffers (BatchNorm running statistics excluded, as they
              are not part of the deployed function once folded)
flops       : torch.utils.flop_counter.FlopCounterMode on one sample (multiply-add = 2 FLOPs),
              run on the meta device; attention's two matmuls included on every device
weighted_depth  : conv/linear layers (and products of activations) on the longest path
nonlinear_depth : nonlinear activation calls on the longest path
nodes       : number of compute nodes in the fx graph (inputs, outputs, attributes and shape
              arithmetic excluded)
What counts as a layer or a nonlinearity is ops.classify's answer, whatever the graph form.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from egp_fx.capture import trace
from egp_fx.ir.batches import as_batch
from egp_fx.ir.copying import meta_copy, on_meta
from egp_fx.ir.ops import Ops, Role
from egp_fx.ir.shapes import real_run_is_cheap

log = logging.getLogger(__name__)
RUNNING_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
WEIGHTED = frozenset({Role.LAYER, Role.MATMUL})
NONLINEAR = frozenset({Role.ACTIVATION, Role.NONLINEAR})


@dataclass
class Totals:
    params: int
    flops: int
    weighted_depth: int
    nonlinear_depth: int
    nodes: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(module: nn.Module) -> int:
    """Elements of the distinct parameters and constant buffers (a weight tied under two names,
    or held as a view, counts once)."""
    seen, total = set(), 0
    tensors = [*module.parameters(), *(b for name, b in module.named_buffers()
                                       if name.rsplit(".", 1)[-1] not in RUNNING_STATS)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) \
            if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


# torch counts the attention kernels of CUDA, and the meta device's math path as its two
# matmuls; the CPU's fused kernel gets the same formula, so that a count does not depend on
# where it ran
def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {op: _attention_flops for op in
                  [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)]
                  if op is not None}


def count_flops(module: nn.Module, example) -> int:
    """FLOPs of one sample (`example`: a tensor or batch), counted on two samples and halved
    (see data.Batch.widen). Counted on the meta device (shapes only, no arithmetic): a
    GraphModule with its own tensors swapped there for the count (copying.on_meta), another
    module on a meta copy. A module that does not run there (an op without a meta kernel,
    Python that reads a tensor's values) is counted on real tensors when that is cheap, else on
    fake ones."""
    batch = as_batch(example).head(1).widen(2)
    with torch.no_grad():
        try:
            meta = batch.map(lambda t: t.to("meta"))
            if isinstance(module, fx.GraphModule):      # a graph of ours: no copy needed
                with on_meta(module):
                    return _flops(module, meta)
            return _flops(meta_copy(module), meta)
        except Exception:  # noqa: BLE001  (counted on data below)
            log.debug("FLOPs not countable on the meta device; counting on data", exc_info=True)
        if real_run_is_cheap(module):
            return _flops(module, batch)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return _flops(module, batch.map(mode.from_tensor))


def _flops(module: nn.Module, batch) -> int:
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        batch(module)
    return int(counter.get_total_flops()) // 2


def longest_path(order, inputs_of, counted) -> int:
    """Largest number of nodes for which `counted(node)` holds on any path through a DAG given
    in topological `order`, with `inputs_of(node)` its predecessors."""
    best: dict = {}
    for node in order:
        best[node] = (1 if counted(node) else 0) + max((best[i] for i in inputs_of(node)), default=0)
    return max(best.values(), default=0)


def longest_path_count(gm: fx.GraphModule, roles: frozenset) -> int:
    """Largest number of nodes whose role is in `roles` on any path from an input to the output."""
    ops = Ops(gm)   # fx graphs are stored in topological order
    return longest_path(gm.graph.nodes, lambda n: n.all_input_nodes, lambda n: ops(n).role in roles)


def weighted_depth(gm: fx.GraphModule) -> int:
    return longest_path_count(gm, WEIGHTED)


def nonlinear_depth(gm: fx.GraphModule) -> int:
    return longest_path_count(gm, NONLINEAR)


def compute_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
               and not str(n.target).startswith("aten.sym_"))


def measure(module: nn.Module, example) -> Totals:
    """Totals of `module` (a GraphModule, or a module that egp_fx.trace can capture)."""

    gm = module if isinstance(module, fx.GraphModule) else trace(module, example)
    return Totals(count_params(module), count_flops(module, example), weighted_depth(gm),
                  nonlinear_depth(gm), compute_nodes(gm))
