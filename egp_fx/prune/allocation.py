"""EGP's per-layer pruning budget (EGP.md, "EGP pruning step").

For every prunable layer l with entropy H_l (the EGP layer entropy of the activation it feeds),
r_l weights still nonzero, and mean |w| over those nonzero weights:

    pool     P   = { l : H_l > 0 and r_l > 0 }      (the other layers are left alone)
    irrelevance  I_l = H_l * mean_{w != 0} |w_l|
    relevance    R_l = (sum_{k in P} I_k) / I_l
    share        s_l = softmax(R)_l = exp(R_l) / sum_{k in P} exp(R_k)     (temperature 1)
    budget       B   = floor(ratio * sum_{l in P} r_l)                    (ratio = 0.5)
    allotment    a_l = B * s_l

Overflow: while some active layer has a_l >= r_l, every such layer is pruned entirely (n_l = r_l),
leaves the active set, and what is left of the budget, B' = B - sum of those r_l, is shared among
the remaining active layers in proportion to their shares:  a_l = B' * s_l / sum_{k active} s_k
(the softmax of the same R over the smaller set). Repeat until no active layer overflows.

Integers: n_l = floor(a_l) for the active layers, then the units still missing to reach B' go,
one each, to the layers with the largest fractional parts a_l - floor(a_l) (ties: pool order),
so exactly B weights are pruned whenever the pool holds at least B. A layer with a low entropy
and small weights has a small I, a large R and, through the softmax, most of the budget: that is
what drives layers to collapse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Allocation:
    """How many weights to prune in each layer this round, and why."""

    budget: int                                    # B
    prune: dict[str, int]                          # n_l (pool layers only)
    irrelevance: dict[str, float]                  # I_l
    relevance: dict[str, float]                    # R_l
    shares: dict[str, float]                       # s_l
    emptied: list[str] = field(default_factory=list)          # pruned entirely by overflow
    excluded: dict[str, str] = field(default_factory=dict)    # layer -> why it is not in the pool


def irrelevance(entropy: float, weight: torch.Tensor) -> float:
    """I = H * mean |w| over the nonzero weights (0 when all weights are zero)."""
    nz = weight.detach()[weight.detach() != 0]
    return float(entropy) * float(nz.abs().double().mean()) if nz.numel() else 0.0


def softmax(values: dict[str, float]) -> dict[str, float]:
    """Plain softmax (temperature 1), computed stably in float64."""
    if not values:
        return {}
    top = max(values.values())
    exps = {k: math.exp(v - top) for k, v in values.items()}
    total = sum(exps.values())
    return {k: e / total for k, e in exps.items()}


def _split_integer(alloc: dict[str, float], total: int, order: list[str]) -> dict[str, int]:
    out = {k: math.floor(a) for k, a in alloc.items()}
    missing = total - sum(out.values())
    by_fraction = sorted(alloc, key=lambda k: (-(alloc[k] - out[k]), order.index(k)))
    for k in by_fraction[:max(missing, 0)]:
        out[k] += 1
    return out


def allocate(entropy: dict[str, float], mean_abs: dict[str, float], remaining: dict[str, int],
             ratio: float = 0.5) -> Allocation:
    """The EGP allocation for layers given by name (all three dicts share the keys)."""
    excluded = {}
    for name in entropy:
        if remaining[name] <= 0:
            excluded[name] = "all weights are zero"
        elif entropy[name] <= 0:
            excluded[name] = "zero entropy"
    pool = [n for n in entropy if n not in excluded]
    irr = {n: float(entropy[n]) * float(mean_abs[n]) for n in pool}
    total_irr = sum(irr.values())
    rel = {n: total_irr / irr[n] for n in pool}
    shares = softmax(rel)
    budget = math.floor(ratio * sum(remaining[n] for n in pool))
    prune: dict[str, int] = {}
    emptied: list[str] = []
    active, left = list(pool), budget
    while active:
        mass = sum(shares[n] for n in active)
        alloc = {n: left * shares[n] / mass for n in active}
        over = [n for n in active if alloc[n] >= remaining[n]]
        if not over:
            prune.update(_split_integer(alloc, left, active))
            break
        for n in over:
            prune[n] = remaining[n]
            left -= remaining[n]
            emptied.append(n)
            active.remove(n)
    return Allocation(budget, {n: prune.get(n, 0) for n in pool}, irr, rel, shares, emptied, excluded)
