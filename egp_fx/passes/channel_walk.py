"""Where the channels of an activation go: every layer that reads them, and the ops between.

`walk` follows an activation's output through ops that keep channels (identity, pooling), flatten
(channel c maps to c*S .. (c+1)*S-1 for S positions), reshapes that keep the last dim (tokens
regrouped), a concatenation along the channel axis (an offset) and, for a gated MLP, the product
with another layer's output (whose rows are then narrowed too). It records what each reader reads
and every node on the way, so that dead_channels can narrow them and update their shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.fx as fx

from egp_fx.ir.layer import Layer, layer_of
from egp_fx.ir.ops import Role, main_input
from egp_fx.ir.shapes import shape_of

from .reasons import Reason, Why


@dataclass
class Read:
    """A layer reading channel c at input indices offset + c*span ... + span - 1."""

    layer: Layer
    offset: int
    span: int
    direct: bool                         # nothing between the activation and the layer


@dataclass
class Walk:
    """Everything the channels of an activation reach, found by `walk`."""

    reads: list[Read] = field(default_factory=list)
    gates: list[Layer] = field(default_factory=list)          # `up` layers of gated products
    passed: list[tuple[fx.Node, int, int]] = field(default_factory=list)   # (node, axis, span)
    reshapes: list[fx.Node] = field(default_factory=list)     # views whose last dim is C
    through_product: bool = False


def walk(gm, ctx, act: fx.Node, channel_dim: int, n: int) -> tuple[Walk, Why | None]:
    """Follow act's channels to every layer that reads them, or say why not."""
    shape = shape_of(act) or ()
    last = channel_dim % max(len(shape), 1) == len(shape) - 1
    walk, stack, seen = Walk(), [(act, 0, 1, True, last)], set()
    while stack:
        node, offset, span, direct, last = stack.pop()
        for u in node.users:
            if (u, offset) in seen:
                continue
            seen.add((u, offset))
            op = ctx.ops(u)
            here = shape_of(node) or ()
            axis = len(here) - 1 if last else 1
            if op.role is Role.LAYER:
                layer = layer_of(gm, u, ctx.ops.modules)
                if layer is None or layer.input is not node:
                    return walk, Why(Reason.DC_READ_AS_WEIGHT, {"node": u.name})
                if layer.is_linear != last:
                    return walk, Why(Reason.DC_OTHER_AXIS, {"node": u.name})
                walk.reads.append(Read(layer, offset, span, direct))
            elif op.role in (Role.IDENTITY, Role.POOL) and main_input(u) is node and (
                    op.role is Role.IDENTITY or not last):
                walk.passed.append((u, axis, span))
                stack.append((u, offset, span, direct and op.role is Role.IDENTITY, last))
            elif op.role in (Role.FLATTEN, Role.RESHAPE):
                after = shape_of(u)
                if after is None or not here:
                    return walk, Why(Reason.DC_NO_SHAPE, {"node": u.name})
                if last and after[-1] == here[-1]:              # tokens regrouped, channels kept
                    walk.passed.append((u, len(after) - 1, span))
                    walk.reshapes.append(u)
                    stack.append((u, offset, span, direct, True))
                elif not last and len(after) == 2 and after[0] == here[0] \
                        and after[1] == math.prod(here[1:]):     # flatten after the batch dim
                    s = math.prod(here[2:])
                    walk.passed.append((u, 1, span * s))
                    stack.append((u, offset * s, span * s, False, True))
                else:
                    return walk, Why(Reason.DC_RESHAPE, {"node": u.name})
            elif op.role is Role.CAT:
                dim = op.params.get("dim", 0)
                if not here or dim % len(here) != axis:
                    return walk, Why(Reason.DC_CAT_AXIS, {"node": u.name})
                before = 0
                for t in u.args[0]:
                    if t is node:
                        break
                    before += shape_of(t)[axis]
                walk.passed.append((u, axis, span))
                stack.append((u, offset + before, span, False, last))
            elif op.role is Role.MUL and node is act and len(u.all_input_nodes) == 2:
                other = next(a for a in u.all_input_nodes if a is not node)
                up = layer_of(gm, other, ctx.ops.modules)
                if up is None or shape_of(other) != here or len(other.users) != 1 \
                        or up.out_channels != n or up.is_linear != last:
                    return walk, Why(Reason.DC_UNKNOWN_GATE, {"node": u.name})
                walk.gates.append(up)
                walk.through_product = True
                walk.passed.append((u, axis, span))
                walk.passed.append((other, axis, span))
                stack.append((u, offset, span, False, last))
            else:
                return walk, Why(Reason.DC_FEEDS, {
                    "node": u.name, "op": u.op,
                    "target": str(getattr(u.target, "__name__", u.target))})
    return walk, None
