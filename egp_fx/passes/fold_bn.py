"""fold_bn: eval-mode BatchNorm folded into the conv/linear before it.

BatchNorm in eval mode is a per-channel affine map: y = gamma * (x - mean) / sqrt(var + eps) + beta.
With s = gamma / sqrt(var + eps), a preceding layer z = W x + b folds exactly:

    W' = W * s   (output channel c of W scaled by s_c)
    b' = (b - mean) * s + beta

computed in float64 by torch.nn.utils.fusion (fuse_conv_bn_weights / fuse_linear_bn_weights) and
cast back. The layer's output must feed only the BatchNorm, and neither may be shared. For each
new bias entry the rounding bound of the float32 arithmetic it replaces,
3 u (|b s| + |mean s| + |beta|), is recorded: a bias that is zero in real arithmetic comes out of
float32 as a residue below it (constants.py).
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from egp_fx.ir.layer import Layer, layer_of
from egp_fx.ir.norm import Norm, norm_of
from egp_fx.ir.shapes import shape_of

from .base import Candidate, PassContext, PassRun, Refusal, Rewrite, RewriteKind
from .reasons import Reason, Why
from .registry import register
from .util import ROUNDING, record_bias_rounding

NAME = "fold_bn"


def _check(norm: Norm, layer: Layer | None, gm) -> Why | None:
    if layer is None:
        return Why(Reason.BN_INPUT_NOT_LAYER)
    if layer.is_linear and len(shape_of(norm.node) or (0, 0)) != 2:
        return Why(Reason.BN_LINEAR_NOT_2D)
    if len(layer.node.users) != 1:
        return Why(Reason.BN_LAYER_USERS, {"layer": layer.node.name, "users": len(layer.node.users)})
    if (why := layer.shared_with()) is not None:
        return Why(Reason.BN_LAYER_SHARED, {"sharing": why})
    if norm.module is not None and sum(
            1 for n in gm.graph.nodes if n.op == "call_module" and n.target == norm.node.target) > 1:
        return Why(Reason.BN_MODULE_SHARED)
    return None


def _fold(gm: fx.GraphModule, norm: Norm, layer: Layer) -> Rewrite:
    t = {k: v.detach().double() if v is not None else None for k, v in norm.tensors.items()}
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(t["running_mean"])
    fuse = fuse_linear_bn_weights if layer.is_linear else fuse_conv_bn_weights
    new_w, new_b = fuse(w, b, t["running_mean"], t["running_var"], norm.eps, t["weight"], t["bias"])
    scale, _ = norm.scale_shift()
    beta = t["bias"] if t["bias"] is not None else torch.zeros_like(scale)
    rounding = 3 * ROUNDING * ((b * scale).abs() + (t["running_mean"] * scale).abs() + beta.abs())
    node, path = norm.node, norm.path
    layer.replace(new_w.detach(), new_b.detach())
    record_bias_rounding(gm, layer, rounding)
    node.replace_all_uses_with(layer.node)
    gm.graph.erase_node(node)
    return Rewrite(NAME, RewriteKind.FOLD_BN, node.name, [layer.node.name, node.name], True,
                   f"{node.name} folded into {layer.node.name}", params_saved=norm.param_count(),
                   path=path)


@register(NAME, shapes=True)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    for node in list(gm.graph.nodes):
        norm = norm_of(gm, node, ctx.ops.modules)
        if norm is None:
            continue
        layer = layer_of(gm, norm.input, ctx.ops.modules)
        why = _check(norm, layer, gm)
        if why is not None:
            yield Refusal(NAME, node.name, [node.name], why, path=norm.path)
            continue
        yield Candidate(node.name, functools.partial(_fold, gm, norm, layer))
