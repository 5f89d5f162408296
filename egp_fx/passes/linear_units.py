"""linear_units: an activation whose every channel stayed in one linear region becomes that map.

Channel c computes y_c = a_c * z_c + o_c on all calibration data (ReLU ON: a=1, o=0; LeakyReLU
negative side: a=slope; PReLU negative side: a = its slope for channel c; ReLU6 saturated or a
dead unit: a=0, o=const). The call is replaced by
- nothing, when every a_c = 1 and o_c = 0 (identity);
- otherwise the map is folded into the conv/linear P that writes z (exact):
      W_P' = a * W_P (row c scaled by a_c),  b_P' = a * b_P + o;
- or, without such a P, an explicit per-channel mul/add by constant buffers.
A layer that is only partly linear keeps its nonlinearity (its dead channels are dead_channels'
job). GELU/SiLU tails count as linear only beyond their float32 margins.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.ir.attrs import module_path
from egp_fx.ir.layer import layer_of
from egp_fx.ir.ops import main_input
from egp_fx.ir.shapes import dtype_of, shape_of

from .base import (Candidate, Decision, DecisionKind, PassContext, PassRun, Refusal, Rewrite,
    RewriteKind)
from .reasons import Reason, Why
from .registry import register
from .util import arithmetic, constant

NAME = "linear_units"


def _fold_into_producer(gm, ctx, act, st, a, o) -> str | None:
    prod = layer_of(gm, main_input(act), ctx.ops.modules)
    if prod is None or len(prod.node.users) != 1 or prod.shared_with():
        return None
    ndim = len(shape_of(act) or ())
    if ndim and st.channel_dim % ndim != prod.out_axis % ndim:
        return None       # the per-channel map runs along another axis than P's rows
    if prod.groups != 1 and prod.groups != prod.out_channels:
        return None
    w = prod.weight.detach().double()
    b = prod.bias.detach().double() if prod.bias is not None else w.new_zeros(w.shape[0])
    prod.replace(w * a.view(-1, *([1] * (w.dim() - 1))), a * b + o)
    return prod.node.name


def _explicit(gm, act, st, a, o) -> None:
    ndim = len(shape_of(act) or (0, 0))
    view = [1] * ndim
    view[st.channel_dim % ndim] = -1
    z, dtype = main_input(act), dtype_of(act)
    scale = constant(gm, a.to(dtype).view(view), act.name + "_scale", before=act)
    with gm.graph.inserting_before(act):
        out = gm.graph.call_function(arithmetic(gm, "mul"), (z, scale))
    out.meta["tensor_meta"] = act.meta.get("tensor_meta")
    if bool(o.any()):
        shift = constant(gm, o.to(dtype).view(view), act.name + "_shift", before=act)
        with gm.graph.inserting_before(act):
            out = gm.graph.call_function(arithmetic(gm, "add"), (out, shift))
        out.meta["tensor_meta"] = act.meta.get("tensor_meta")
    act.replace_all_uses_with(out)


def _linearise(gm, ctx, act, st, affine) -> Rewrite:
    a = torch.tensor([x.slope for x in affine], dtype=torch.float64)
    o = torch.tensor([x.offset for x in affine], dtype=torch.float64)
    if bool((a == 1).all()) and not bool(o.any()):
        act.replace_all_uses_with(main_input(act))
        how = "identity"
    elif (into := _fold_into_producer(gm, ctx, act, st, a, o)) is not None:
        act.replace_all_uses_with(main_input(act))
        how = f"per-channel affine folded into {into}"
    else:
        _explicit(gm, act, st, a, o)
        how = "explicit per-channel affine"
    gm.graph.erase_node(act)
    return Rewrite(NAME, RewriteKind.LINEARISE, act.name, [act.name], True, f"{act.name} ({st.kind}) -> {how}",
                   activation=act.name, decision=Decision(DecisionKind.LINEARISED),
                   path=module_path(act, gm))


@register(NAME, shapes=True)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    for act in list(gm.graph.nodes):
        st = act.meta.get(EGP_META_KEY)
        if not isinstance(st, ActivationStats) or not act.users:
            continue
        affine = st.channel_affine()
        if any(x is None for x in affine):
            n_lin = len(st.linear_channels)
            if n_lin:
                yield Refusal(NAME, act.name, [act.name],
                              Why(Reason.LU_PARTLY_LINEAR,
                                  {"linear": n_lin, "channels": st.num_channels}),
                              activation=act.name, path=module_path(act, gm))
            continue
        if all(x.is_constant for x in affine):
            continue  # constant output: the constants pass owns it
        yield Candidate(act.name, functools.partial(_linearise, gm, ctx, act, st, affine))
