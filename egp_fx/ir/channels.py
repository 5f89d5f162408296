"""Which axis of a pre-activation tensor holds the channels.

The channel axis is the one the producing layer writes: dim 1 for convolutions and BatchNorm,
the last dim for Linear, LayerNorm and products (channels-last tokens in ViT, Swin, ConvNeXt and
language-model MLPs). We walk back from the activation's input through ops that keep the layout
(identity, element-wise arithmetic, and reshapes that keep the last dim, as Hugging Face's
GPT-2 and OPT MLPs regroup their tokens) until an op that writes channels is found. "Last" is
returned as -1 so it holds for any number of leading dims. Reshapes are judged from the shapes
in node.meta (shapes.propagate).
"""
from __future__ import annotations

import torch.fx as fx

from .ops import ARITHMETIC, Ops, Role, main_input
from .shapes import shape_of

_WRITES_FIRST = frozenset({Role.NORM})
_WRITES_LAST = frozenset({Role.LAYER_NORM, Role.MATMUL})
_KEEPS_LAYOUT = ARITHMETIC | {Role.IDENTITY}


def _axis_written_by(node: fx.Node, ops: Ops) -> int | None:
    op = ops(node)
    if op.role is Role.LAYER:
        return -1 if op.kind == "linear" else 1
    if op.role in _WRITES_FIRST:
        return 1
    if op.role in _WRITES_LAST:
        return -1
    return None


def channel_axis(z: fx.Node, ops: Ops, ndim: int | None = None, max_hops: int = 32
                 ) -> tuple[int, str]:
    """(axis, how it was found) for the pre-activation node z.

    The axis is 1 (channels-first) or -1 (channels-last). Without a recognised producer, a 2-D or
    4-D+ tensor defaults to dim 1 and a 3-D one (tokens) to -1; the second item then says so.
    """
    frontier, seen = [z], set()
    for _ in range(max_hops):
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            axis = _axis_written_by(node, ops)
            if axis is not None:
                return axis, f"written by {node.name}"
            if ops(node).role in _KEEPS_LAYOUT:
                nxt.extend(node.all_input_nodes)
            elif keeps_last_dim(node, ops):
                nxt.append(main_input(node))
        if not nxt:
            break
        frontier = nxt
    ndim = ndim if ndim is not None else len(shape_of(z) or ())
    if ndim == 3:
        return -1, "no producer found; 3-D input taken as tokens (channels last)"
    return 1, "no producer found; taken as channels-first"


def keeps_last_dim(node: fx.Node, ops: Ops) -> bool:
    """A reshape that only regroups leading dims: the last dim (the channels) passes through."""
    if ops(node).role not in (Role.RESHAPE, Role.FLATTEN):
        return False
    src = main_input(node)
    before, after = shape_of(src) if src is not None else None, shape_of(node)
    return bool(before) and bool(after) and before[-1] == after[-1] and len(before) > 1 \
        and len(after) > 1
