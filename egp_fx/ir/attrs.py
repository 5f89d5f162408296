"""Attributes of a captured graph: reading and binding tensors by dotted path, who reads them
(share_index: a layer read twice is not rewritten for one call), and the module a node belongs
to (its path in the user's model, for reports)."""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

CAPTURE_META_KEY = "egp_capture"


def module_path(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """The module a node belongs to, by dotted path in the user's model ('' for the top level)."""
    if node.op == "call_module":
        path = str(node.target)
    elif node.op == "get_attr":
        path = str(node.target).rpartition(".")[0]
    else:
        stack = node.meta.get("nn_module_stack") or {}
        path = str(list(stack.values())[-1][0]) if stack else ""
    prefix = gm.meta.get(CAPTURE_META_KEY).prefix if gm is not None and \
        gm.meta.get(CAPTURE_META_KEY) is not None else ""
    if prefix and (path + ".").startswith(prefix):
        path = path[len(prefix):]
    return path


def attr(gm: fx.GraphModule, target: str):
    return operator.attrgetter(target)(gm)


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Bind `value` at dotted path `target` (a parameter stays a parameter, a buffer a buffer)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = value.detach()
    if name in owner._parameters or name not in owner._buffers:
        old = owner._parameters.get(name)
        owner._parameters.pop(name, None)
        owner.__dict__.pop(name, None)
        owner.register_parameter(name, nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad)))
    else:
        owner.register_buffer(name, value)


def free_name(gm: fx.GraphModule, base: str) -> str:
    """A dotted path under gm, `base` or `base_1`, ... that nothing holds yet."""
    owner_path, _, name = base.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    candidate, i = name, 0
    while hasattr(owner, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return f"{owner_path}.{candidate}" if owner_path else candidate


def add_attr(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `value` (a buffer) under a fresh name near `base`; return a get_attr node."""
    target = free_name(gm, base)
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_buffer(name, value.detach())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    return node


@dataclass
class ShareIndex:
    """Who reads what in a graph: module call counts, get_attr reads, modules read by get_attr."""

    calls: Counter
    reads: Counter
    read_modules: set


def share_index(graph: fx.Graph) -> ShareIndex:
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    reads = Counter(str(n.target) for n in graph.nodes if n.op == "get_attr")
    prefixes = set()
    for target in reads:
        parts = target.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return ShareIndex(calls, reads, prefixes)
