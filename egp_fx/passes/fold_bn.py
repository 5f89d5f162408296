"""Pass 1: fold eval-mode BatchNorm into the conv/linear before it.

BatchNorm in eval mode is a per-channel affine map: y = gamma * (x - mean) / sqrt(var + eps) + beta.
With s = gamma / sqrt(var + eps), a preceding layer z = W x + b folds exactly:

    W' = W * s   (scaling output channel c of W by s_c)
    b' = (b - mean) * s + beta

(computed in float64, cast back). The conv's output must feed only the BatchNorm, and the conv
module must not be called from anywhere else.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .base import PassContext, PassOutcome, Refusal, Rewrite, finish
from .util import calls_per_module, set_module, weight_bias, with_weights

NAME = "fold_bn"
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check(gm, bn_node, calls) -> tuple[fx.Node | None, str | None]:
    prod = bn_node.args[0] if bn_node.args else None
    if not isinstance(prod, fx.Node) or prod.op != "call_module":
        return None, "input is not a conv/linear module call"
    mod = gm.get_submodule(prod.target)
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return None, f"input is {type(mod).__name__}, not a conv/linear"
    if isinstance(mod, nn.Linear) and bn_node.meta.get("tensor_meta") is not None \
            and len(bn_node.meta["tensor_meta"].shape) != 2:
        return None, "BatchNorm after Linear on non-2-D input"
    if len(prod.users) != 1:
        return None, f"{prod.name} has {len(prod.users)} users"
    if calls[prod.target] != 1 or calls[bn_node.target] != 1:
        return None, "module shared by several calls"
    bn = gm.get_submodule(bn_node.target)
    if not bn.track_running_stats or bn.running_mean is None:
        return None, "BatchNorm without running statistics"
    return prod, None


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    rewrites, refusals = [], []
    calls = calls_per_module(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BN):
            continue
        if not ctx.allows(node.name):
            continue
        prod, reason = _check(gm, node, calls)
        if prod is None:
            refusals.append(Refusal(NAME, node.name, [node.name], f"BatchNorm not folded: {reason}"))
            continue
        conv, bn = gm.get_submodule(prod.target), gm.get_submodule(node.target)
        w, b = weight_bias(conv)
        s = bn.weight.detach().double() if bn.affine else torch.ones_like(b)
        s = s / torch.sqrt(bn.running_var.double() + bn.eps)
        beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(b)
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean.double()) * s + beta
        set_module(gm, prod.target, with_weights(conv, w, b))
        node.replace_all_uses_with(prod)
        gm.graph.erase_node(node)
        saved = sum(p.numel() for p in bn.parameters())
        rewrites.append(Rewrite(NAME, "fold_bn", node.name, [prod.name, node.name], True,
                                f"{node.name} folded into {prod.name}", params_saved=saved))
    return finish(gm, NAME, rewrites, refusals)
