"""Pass 4: an activation whose every channel stayed in one linear region becomes that linear map.

Channel c computes y_c = a_c * z_c + o_c on all calibration data (ReLU ON: a=1, o=0; LeakyReLU
negative side: a=slope; ReLU6 saturated or a dead unit: a=0, o=const). The call is replaced by
- nothing, when every a_c = 1 and o_c = 0 (identity);
- otherwise the map is folded into the conv/linear P that writes z (exact):
      W_P' = a * W_P (row c scaled by a_c),  b_P' = a * b_P + o;
- or, without such a P, an explicit per-channel mul/add by constant buffers.
A layer that is only partly linear keeps its nonlinearity (dead channels there are the dead
channel pass's job). GELU/SiLU tails count as linear only beyond their float32 margins.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..stats import EGP_META_KEY, ActivationStats
from .base import PassContext, PassOutcome, Refusal, Rewrite, finish, shape_of
from .util import calls_per_module, add_constant, set_module, weight_bias, with_weights

NAME = "linear_units"


def _broadcast_shape(st: ActivationStats, ndim: int) -> list[int]:
    view = [1] * ndim
    view[st.channel_dim % ndim] = -1
    return view


def _fold_into_producer(gm, act, a, o, calls) -> str | None:
    prod = act.args[0]
    if not (isinstance(prod, fx.Node) and prod.op == "call_module"):
        return None
    mod = gm.get_submodule(prod.target)
    if not isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d)) or len(prod.users) != 1 \
            or calls.get(prod.target, 0) != 1:
        return None
    if isinstance(mod, nn.Conv2d) and mod.groups != 1 and mod.groups != mod.out_channels:
        return None
    w, b = weight_bias(mod)
    w = w * a.view(-1, *([1] * (w.dim() - 1)))
    set_module(gm, prod.target, with_weights(mod, w, a * b + o))
    return prod.name


def _explicit(gm, act, st, a, o) -> None:
    ndim = len(shape_of(act) or (0, 0))
    view = _broadcast_shape(st, ndim)
    z = act.args[0]
    with gm.graph.inserting_before(act):
        scale = gm.graph.get_attr(add_constant(gm, a.float().view(view), act.name + "_scale"))
        out = gm.graph.call_function(torch.mul, (z, scale))
        if bool(o.any()):
            shift = gm.graph.get_attr(add_constant(gm, o.float().view(view), act.name + "_shift"))
            out = gm.graph.call_function(torch.add, (out, shift))
    act.replace_all_uses_with(out)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    rewrites, refusals = [], []
    calls = calls_per_module(gm)
    ctx.shapes(gm)
    for act in list(gm.graph.nodes):
        st = act.meta.get(EGP_META_KEY)
        if not isinstance(st, ActivationStats) or not act.users or not ctx.allows(act.name):
            continue
        affine = st.channel_affine()
        if any(x is None for x in affine):
            n_lin = len(st.linear_channels)
            if n_lin:
                refusals.append(Refusal(NAME, act.name, [act.name],
                                        f"nonlinearity kept: only {n_lin} of {st.num_channels} "
                                        "channels are linear", activation=act.name))
            continue
        if all(x.is_constant for x in affine):
            continue  # constant output: the constants pass owns it
        a = torch.tensor([x.slope for x in affine], dtype=torch.float64)
        o = torch.tensor([x.offset for x in affine], dtype=torch.float64)
        if bool((a == 1).all()) and not bool(o.any()):
            act.replace_all_uses_with(act.args[0])
            how, into = "identity", None
        else:
            into = _fold_into_producer(gm, act, a, o, calls)
            if into is not None:
                act.replace_all_uses_with(act.args[0])
                how = f"per-channel affine folded into {into}"
            else:
                _explicit(gm, act, st, a, o)
                how = "explicit per-channel affine"
        gm.graph.erase_node(act)
        rewrites.append(Rewrite(NAME, "linearise", act.name, [act.name], True,
                                f"{act.name} ({st.kind}) -> {how}", activation=act.name,
                                decision="linearised"))
    return finish(gm, NAME, rewrites, refusals)
