"""Pass 5: fold linear neighbours -- two weighted layers with nothing nonlinear between them.

Layer 1 (W1, b1) feeds layer 2 (W2, b2) directly or through Identity / eval-mode Dropout calls;
"A o B" means A runs first. Merged weights are computed in float64 and cast back.

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
                     approximate, applied only with ctx.allow_approximate, reported exact=False.

Cost model: a fold is applied only when the merged layer's FLOPs per sample (from the shapes) are
<= those of the two layers it replaces (3x3 o 3x3 -> 5x5 at equal widths is not: 25/18 = 1.39x);
with ctx.cost == "latency" and a ctx.latency_fn, measured latency of the merged layer vs the pair
decides instead. Preconditions: layer 1's output (and every Identity between) has one user; no
module is called twice or has its weights read by get_attr; same dtype and device.

`run` sweeps three rule sets to a fixpoint, as each can enable the others: constant per-channel
scale/shift folds (fold_affine), residual folds x + L(x) (fold_residual), and the folds above.
Rewrite keys: the second layer's node name here; the add / mul node's name in the other two.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import fold_affine, fold_residual
from .base import PassContext, PassOutcome, Refusal, Rewrite, shape_of
from .fold_common import PASS, Sweep, fold_to_fixpoint, is_pointwise, new_conv, padding_of, pair
from .util import conv_flops, params_of, weight_bias, with_weights


@dataclass
class _Plan:
    """A fold that matched: the merged weight's shape (for the cost model) and how to build it."""
    kind: str
    exact: bool
    desc: str                                   # "3x3 o 3x3 -> 5x5", for details and refusals
    shape: tuple[int, ...]                      # merged weight shape
    weights: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]   # float64 (W, b)
    make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
    inexact_why: str = ""

    def dummy(self) -> nn.Module:
        """The merged layer's geometry with zero weights, for timing it before building it."""
        return self.make(torch.zeros(self.shape, dtype=torch.float64),
                         torch.zeros(self.shape[0], dtype=torch.float64))


def describe(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return f"linear {mod.in_features}->{mod.out_features}"
    kh, kw = pair(mod.kernel_size)
    return (f"{kh}x{kw} conv {mod.in_channels}->{mod.out_channels} stride {pair(mod.stride)[0]} "
            f"pad {mod.padding if isinstance(mod.padding, str) else pair(mod.padding)[0]}"
            + (f" groups {mod.groups}" if mod.groups != 1 else ""))


def _merge(m1, m2, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """(W1, W2) -> W by `combine`;  b = b2 + sum over inputs and taps of W2 * b1 (or None)."""
    def weights():
        (w1, b1), (w2, b2) = weight_bias(m1), weight_bias(m2)
        if m1.bias is None and m2.bias is None:
            return combine(w1, w2), None
        return combine(w1, w2), b2 + (w2 if w2.dim() == 2 else w2.sum((2, 3))) @ b1
    return weights


def _full_conv(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """K[o, i] = sum_m W2[o, m] (*) W1[m, i], (*) the full 2-D convolution."""
    kh2, kw2 = w2.shape[2:]
    return F.conv2d(w1.transpose(0, 1), w2.flip((2, 3)), padding=(kh2 - 1, kw2 - 1)) \
        .transpose(0, 1).contiguous()


def _plan_linear(m1: nn.Linear, m2: nn.Linear) -> _Plan:
    return _Plan("linear_o_linear", True, "linear o linear", (m2.out_features, m1.in_features),
                 _merge(m1, m2, lambda w1, w2: w2 @ w1), functools.partial(with_weights, m2))


def _plan_conv(m1: nn.Conv2d, m2: nn.Conv2d) -> _Plan | str:
    (kh1, kw1), (kh2, kw2) = pair(m1.kernel_size), pair(m2.kernel_size)
    desc, n_out, n_in = f"{kh1}x{kw1} o {kh2}x{kw2}", m2.out_channels, m1.in_channels
    if m1.groups != 1 or m2.groups != 1:
        return f"not folded: {desc}: grouped conv (groups {m1.groups} and {m2.groups})"
    if is_pointwise(m2):
        return _Plan("conv_o_1x1", True, desc, (n_out, n_in, kh1, kw1),
                     _merge(m1, m2, lambda w1, w2: torch.einsum("om,mihw->oihw", w2[:, :, 0, 0], w1)),
                     functools.partial(with_weights, m1))
    p1, p2 = padding_of(m1), padding_of(m2)
    if p1 is None or p2 is None:
        return f"not folded: {desc}: asymmetric 'same' padding"
    if is_pointwise(m1):
        b1_zero = m1.bias is None or not bool(m1.bias.detach().any())
        exact = not any(p2) or m2.padding_mode != "zeros" or b1_zero
        make = functools.partial(new_conv, m2, stride=m2.stride, padding=p2,
                                 dilation=m2.dilation, padding_mode=m2.padding_mode)
        return _Plan("1x1_o_conv", exact, desc, (n_out, n_in, kh2, kw2),
                     _merge(m1, m2, lambda w1, w2: torch.einsum("omhw,mi->oihw", w2, w1[:, :, 0, 0])),
                     make, "first bias nonzero: padded border sees b1")
    if pair(m1.stride) != (1, 1) or pair(m1.dilation) != (1, 1) or pair(m2.dilation) != (1, 1):
        return f"not folded: {desc}: first conv strided or a conv dilated"
    if any(p2) and (m1.padding_mode, m2.padding_mode) != ("zeros", "zeros"):
        return f"not folded: {desc}: padding modes {m1.padding_mode}/{m2.padding_mode}"
    kh, kw = kh1 + kh2 - 1, kw1 + kw2 - 1
    make = functools.partial(new_conv, m1, stride=m2.stride, padding=(p1[0] + p2[0], p1[1] + p2[1]),
                             padding_mode=m1.padding_mode)
    return _Plan("kxk_o_kxk", not any(p2), f"{desc} -> {kh}x{kw}", (n_out, n_in, kh, kw),
                 _merge(m1, m2, _full_conv), make,
                 "wrong on the zero-padded border of the second conv")


def _cost(first: fx.Node, second: fx.Node, m1, m2, plan: _Plan, sweep: Sweep
          ) -> tuple[str | None, int]:
    """(reason not to fold or None, FLOPs saved per sample), before any merged weight is built."""
    out1, out2 = shape_of(first), shape_of(second)
    if out1 is None or out2 is None:
        return f"not folded: {plan.desc}: no shapes", 0
    old = conv_flops(m1, out1) + conv_flops(m2, out2)
    new = 2 * math.prod(out2[1:]) * math.prod(plan.shape[1:])
    ctx = sweep.ctx
    if ctx.cost == "latency" and ctx.latency_fn is not None:
        key = (id(m1), id(m2), plan.kind)
        if key not in sweep.cache:
            tm = first.args[0].meta["tensor_meta"]
            x = torch.randn(tuple(tm.shape), dtype=tm.dtype, device=m1.weight.device)
            with torch.no_grad():  # the modules are kept alive by the cache, so ids stay unique
                sweep.cache[key] = (m1, m2, ctx.latency_fn(nn.Sequential(m1, m2), x),
                                    ctx.latency_fn(plan.dummy(), x))
        t_old, t_new = sweep.cache[key][2:]
        if t_new > t_old:
            return f"not folded: {plan.desc} slower ({t_new / t_old:.2f}x measured latency)", old - new
        return None, old - new
    if new > old:
        return f"not folded: {plan.desc} raises FLOPs {new / old:.2f}x", old - new
    return None, old - new


def _check(first: fx.Node, skipped: list[fx.Node], second: fx.Node, m1, m2, sweep: Sweep
           ) -> str | None:
    for n in (first, *skipped):
        if len(n.users) != 1:
            return f"not folded: output of {n.name} has {len(n.users)} users"
    for n in (first, second):
        if (why := sweep.shared(n)) is not None:
            return f"not folded: {why}"
    if (m1.weight.dtype, m1.weight.device) != (m2.weight.dtype, m2.weight.device):
        return f"not folded: dtype/device differ ({m1.weight.dtype}, {m2.weight.dtype})"
    return None


def fold_chain(node: fx.Node, sweep: Sweep) -> Rewrite | Refusal | None:
    """Rule anchored at the second layer: fold the layer that feeds it into it."""
    m2 = sweep.layer(node)
    if m2 is None:
        return None
    first, skipped = sweep.producer(node.args[0])
    m1 = sweep.layer(first)
    if m1 is None or isinstance(m1, nn.Linear) != isinstance(m2, nn.Linear) \
            or not sweep.ctx.allows(node.name):
        return None
    names = [first.name, *(n.name for n in skipped), node.name]
    why, plan, flops_saved = _check(first, skipped, node, m1, m2, sweep), None, 0
    if why is None:
        plan = _plan_linear(m1, m2) if isinstance(m1, nn.Linear) else _plan_conv(m1, m2)
        if isinstance(plan, str):
            why = plan
        elif not plan.exact and not sweep.ctx.allow_approximate:
            why = f"not folded: {plan.desc}: {plan.inexact_why} (approximate; allow_approximate is off)"
        else:
            why, flops_saved = _cost(first, node, m1, m2, plan, sweep)
    if why is not None:
        return Refusal(PASS, node.name, names, why)
    merged = plan.make(*plan.weights())
    detail = (f"{first.name} ({describe(m1)}) o {node.name} ({describe(m2)}) -> "
              f"{describe(merged)}" + ("" if plan.exact else f"; approximate: {plan.inexact_why}"))
    params_saved = params_of(m1) + params_of(m2) - params_of(merged)
    sweep.replace(node, merged)
    node.args = (first.args[0],)
    sweep.erase(first, *skipped)
    return Rewrite(PASS, plan.kind, node.name, names, plan.exact, detail,
                   params_saved=params_saved, flops_saved=flops_saved,
                   decision=f"folded into {node.name}")


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    """Fold constant scales/shifts, residual adds and adjacent linear layers, to a fixpoint."""
    return fold_to_fixpoint(gm, ctx, [fold_affine.rule, fold_residual.rule, fold_chain])
