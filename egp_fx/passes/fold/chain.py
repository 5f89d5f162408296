"""Fold rule: two weighted layers with nothing nonlinear between them become one.

Layer 1 (W1, b1) feeds layer 2 (W2, b2) directly or through identity ops; "A o B" means A runs
first. Merged weights are computed in float64 and cast back.

linear_o_linear  Linear o Linear, on any leading dims (tokens [B, T, C] too):
                     W = W2 W1,  b = W2 b1 + b2                                       exact
conv_o_1x1       ungrouped conv o pointwise conv (1x1, stride 1, no padding, groups 1):
                     W[o,i,:,:] = sum_m W2[o,m] W1[m,i,:,:],  b = W2 b1 + b2;
                     the merged conv keeps conv 1's stride, padding, dilation        exact
1x1_o_conv       pointwise conv o ungrouped conv (any kernel, stride, padding, dilation):
                     W[o,i,:,:] = sum_m W2[o,m,:,:] W1[m,i],  b = b2 + sum_{m,taps} W2 b1.
                     Exact when conv 2 does not zero-pad or b1 = 0: its zero-padded border
                     saw 0 where the merged conv sees b1. Reflect/replicate/circular padding
                     commutes with a pointwise map, so those are exact as well.
kxk_o_kxk        kxk conv (stride 1, dilation 1) o jxj conv (dilation 1), both ungrouped:
                     K[o,i] = sum_m W2[o,m] (*) W1[m,i]  (full 2-D convolution of the kernels,
                     (k+j-1) wide), padding p1+p2, stride s2, b = b2 + sum_{m,taps} W2 b1.
                     Exact when conv 2 has no padding. Otherwise wrong on a border p2 wide
                     (conv 2 saw zeros there, the merged conv sees conv 1 of the padded input):
                     approximate, applied only with allow_approximate, reported exact=False.

Cost model: a fold is applied only when the merged layer's FLOPs per sample (from the shapes) are
<= those of the two layers it replaces (3x3 o 3x3 -> 5x5 at equal widths is not: 25/18 = 1.39x);
with cost="latency", the measured latency of the merged layer against the pair on the target
decides instead (latency.py). Preconditions: layer 1's output (and every identity between) has one user; no
layer is shared; same dtype and device. Key: the second layer's node name.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from egp_fx.ir.layer import Layer, _meta_conv
from egp_fx.ir.shapes import shape_of

from ..base import Candidate, Decision, DecisionKind, Refusal, Rewrite, RewriteKind
from ..reasons import Reason, Why, render
from ..util import layer_flops, layer_params
from .common import Sweep, is_pointwise, padding_of

NAME = "fold_linear"


@dataclass
class _Plan:
    """A fold that matched: the merged weight's shape, its geometry, how to compute it."""

    kind: RewriteKind
    exact: bool
    desc: str                                   # "3x3 o 3x3 -> 5x5", for details and refusals
    shape: tuple[int, ...]                      # merged weight shape
    weights: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]   # float64 (W, b)
    geometry: dict = field(default_factory=dict)   # stride, padding, dilation, groups (convs)
    inexact: Reason | None = None               # why it is approximate (when not exact)

    def dummy(self, like: Layer) -> nn.Module:
        """The merged layer's geometry with zero weights, for timing it before building it."""
        w = torch.zeros(self.shape, dtype=like.weight.dtype, device=like.weight.device)
        if like.is_linear:
            new = nn.Linear(w.shape[1], w.shape[0], device="meta")
        else:
            new = _meta_conv(2, w, True, **self.geometry)
        new.weight = nn.Parameter(w, requires_grad=False)
        new.bias = nn.Parameter(w.new_zeros(w.shape[0]), requires_grad=False)
        return new.eval()


def describe(layer: Layer) -> str:
    if layer.is_linear:
        return f"linear {layer.in_channels}->{layer.out_channels}"
    kh, kw = layer.kernel_size
    pad = layer.padding if isinstance(layer.padding, str) else layer.padding[0]
    return (f"{kh}x{kw} conv {layer.in_channels}->{layer.out_channels} stride {layer.stride[0]} "
            f"pad {pad}" + (f" groups {layer.groups}" if layer.groups != 1 else ""))


def _merge(m1: Layer, m2: Layer, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """(W1, W2) -> W by `combine`;  b = b2 + sum over inputs and taps of W2 * b1 (or None)."""
    def weights():
        w1, w2 = m1.weight.detach().double(), m2.weight.detach().double()
        b1 = m1.bias.detach().double() if m1.bias is not None else w1.new_zeros(w1.shape[0])
        b2 = m2.bias.detach().double() if m2.bias is not None else w2.new_zeros(w2.shape[0])
        if m1.bias is None and m2.bias is None:
            return combine(w1, w2), None
        return combine(w1, w2), b2 + (w2 if w2.dim() == 2 else w2.sum((2, 3))) @ b1
    return weights


def _full_conv(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """K[o, i] = sum_m W2[o, m] (*) W1[m, i], (*) the full 2-D convolution."""
    kh2, kw2 = w2.shape[2:]
    return F.conv2d(w1.transpose(0, 1), w2.flip((2, 3)), padding=(kh2 - 1, kw2 - 1)) \
        .transpose(0, 1).contiguous()


def _geometry(layer: Layer, **override) -> dict:
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
            "groups": 1, **override}


def _plan_linear(m1: Layer, m2: Layer) -> _Plan:
    return _Plan(RewriteKind.LINEAR_O_LINEAR, True, "linear o linear", (m2.out_channels, m1.in_channels),
                 _merge(m1, m2, lambda w1, w2: w2 @ w1))


def _plan_conv(m1: Layer, m2: Layer) -> _Plan | Why:
    (kh1, kw1), (kh2, kw2) = m1.kernel_size, m2.kernel_size
    desc, n_out, n_in = f"{kh1}x{kw1} o {kh2}x{kw2}", m2.out_channels, m1.in_channels
    if m1.groups != 1 or m2.groups != 1:
        return Why(Reason.CHAIN_GROUPED, {"what": desc, "groups1": m1.groups, "groups2": m2.groups})
    if is_pointwise(m2):
        return _Plan(RewriteKind.CONV_O_1X1, True, desc, (n_out, n_in, kh1, kw1),
                     _merge(m1, m2, lambda w1, w2: torch.einsum("om,mihw->oihw", w2[:, :, 0, 0], w1)),
                     _geometry(m1, padding_mode=m1.padding_mode))
    p1, p2 = padding_of(m1), padding_of(m2)
    if p1 is None or p2 is None:
        return Why(Reason.CHAIN_SAME_PADDING, {"what": desc})
    if is_pointwise(m1):
        b1_zero = m1.bias is None or not bool(m1.bias.detach().any())
        exact = not any(p2) or m2.padding_mode != "zeros" or b1_zero
        return _Plan(RewriteKind.PW_O_CONV, exact, desc, (n_out, n_in, kh2, kw2),
                     _merge(m1, m2, lambda w1, w2: torch.einsum("omhw,mi->oihw", w2, w1[:, :, 0, 0])),
                     _geometry(m2, padding=p2, padding_mode=m2.padding_mode),
                     Reason.BIAS_AT_BORDER)
    if m1.stride != (1, 1) or m1.dilation != (1, 1) or m2.dilation != (1, 1):
        return Why(Reason.CHAIN_STRIDED, {"what": desc})
    if any(p2) and (m1.padding_mode, m2.padding_mode) != ("zeros", "zeros"):
        return Why(Reason.CHAIN_PADDING_MODES,
                   {"what": desc, "mode1": m1.padding_mode, "mode2": m2.padding_mode})
    kh, kw = kh1 + kh2 - 1, kw1 + kw2 - 1
    return _Plan(RewriteKind.KXK_O_KXK, not any(p2), f"{desc} -> {kh}x{kw}", (n_out, n_in, kh, kw),
                 _merge(m1, m2, _full_conv),
                 _geometry(m1, stride=m2.stride, padding=(p1[0] + p2[0], p1[1] + p2[1]),
                           padding_mode=m1.padding_mode),
                 Reason.PADDED_BORDER)


def _cost(m1: Layer, m2: Layer, plan: _Plan, sweep: Sweep) -> tuple[Why | None, int]:
    """(reason not to fold or None, FLOPs saved per sample), before any merged weight is built."""
    out1, out2 = shape_of(m1.node), shape_of(m2.node)
    if out1 is None or out2 is None:
        return Why(Reason.CHAIN_NO_SHAPES, {"what": plan.desc}), 0
    old = layer_flops(m1, out1) + layer_flops(m2, out2)
    new = 2 * math.prod(out2[1:]) * math.prod(plan.shape[1:])
    table = sweep.ctx.timings
    if table is not None:
        tm = m1.input.meta["tensor_meta"]
        x_shape = (1, *tm.shape[1:])

        def inputs():
            return torch.randn(x_shape, dtype=tm.dtype, device=m1.weight.device)

        t_old = table.seconds(("pair", m1.node.name, m2.node.name, x_shape),
                              lambda: (nn.Sequential(m1.as_module(), m2.as_module()), inputs()))
        t_new = table.seconds(("merged", plan.kind, plan.shape, str(plan.geometry), x_shape),
                              lambda: (plan.dummy(m2), inputs()))
        if t_new > t_old:
            return Why(Reason.CHAIN_SLOWER, {"what": plan.desc, "ratio": t_new / t_old}), old - new
        return None, old - new
    if new > old:
        return Why(Reason.CHAIN_MORE_FLOPS, {"what": plan.desc, "ratio": new / old}), old - new
    return None, old - new


def _check(m1: Layer, skipped, m2: Layer, sweep: Sweep) -> Why | None:
    for n in (m1.node, *skipped):
        if len(n.users) != 1:
            return Why(Reason.CHAIN_USERS, {"node": n.name, "users": len(n.users)})
    for layer in (m1, m2):
        if (why := sweep.shared(layer)) is not None:
            return Why(Reason.CHAIN_SHARED, {"sharing": why})
    if (m1.weight.dtype, m1.weight.device) != (m2.weight.dtype, m2.weight.device):
        return Why(Reason.CHAIN_DTYPE_DEVICE,
                   {"dtype1": str(m1.weight.dtype), "dtype2": str(m2.weight.dtype)})
    if not m1.is_linear and (m1.dims, m2.dims) != (2, 2):
        return Why(Reason.CHAIN_NOT_2D)
    lead1, lead2 = shape_of(m1.input), shape_of(m2.input)
    if skipped and (lead1 is None or lead2 is None or lead1[:-1] != lead2[:-1]):
        return Why(Reason.CHAIN_RESHAPES)
    return None


def _apply(sweep: Sweep, m1: Layer, skipped, m2: Layer, plan: _Plan, flops_saved: int) -> Rewrite:
    names = [m1.node.name, *(n.name for n in skipped), m2.node.name]
    before = f"{m1.node.name} ({describe(m1)}) o {m2.node.name} ({describe(m2)})"
    params_before = layer_params(m1) + layer_params(m2)
    weight, bias = plan.weights()
    m2.replace(weight, bias, **({} if m2.is_linear else plan.geometry))
    m2.set_input(m1.input)
    sweep.erase(m1.node, *skipped)
    detail = f"{before} -> {describe(m2)}" + (
        "" if plan.exact else f"; approximate: {render(plan.inexact)}")
    return Rewrite(NAME, plan.kind, m2.node.name, names, plan.exact, detail,
                   params_saved=params_before - layer_params(m2), flops_saved=flops_saved,
                   decision=Decision(DecisionKind.FOLDED, into=m2.path), path=m2.path)


def rule(node, sweep: Sweep) -> Candidate | Refusal | None:
    """Rule anchored at the second layer: fold the layer that feeds it into it."""
    m2 = sweep.layer(node)
    if m2 is None:
        return None
    first, skipped = sweep.producer(m2.input, tokens=m2.is_linear)
    m1 = sweep.layer(first)
    if m1 is None or m1.is_linear != m2.is_linear:
        return None
    names = [first.name, *(n.name for n in skipped), node.name]
    why, flops_saved = _check(m1, skipped, m2, sweep), 0
    if why is None:
        plan = _plan_linear(m1, m2) if m1.is_linear else _plan_conv(m1, m2)
        if isinstance(plan, Why):
            why = plan
        elif not plan.exact and not sweep.options.allow_approximate:
            why = Why(Reason.CHAIN_APPROXIMATE, {"what": plan.desc, "inexact": plan.inexact})
        else:
            why, flops_saved = _cost(m1, m2, plan, sweep)
    if why is not None:
        return Refusal(NAME, node.name, names, why, path=m2.path)
    return Candidate(node.name, functools.partial(_apply, sweep, m1, skipped, m2, plan, flops_saved))
