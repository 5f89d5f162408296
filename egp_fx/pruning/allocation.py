"""EGP's per-layer pruning budget, as the EGP reference code computes it.

For every prunable layer l with entropy H_l (the unrounded EGP layer entropy of the activation it
feeds), r_l weights still nonzero, and mean |w| over those nonzero weights:

    pool        P = { l : H_l > 0 and r_l > 0 }      (the other layers are left alone)
    irrelevance I_l = H_l * mean_{w != 0} |w_l|
    budget      B = ratio * sum_{l in P} r_l         (ratio = 0.5; a real number, as in the reference)

Then, pass after pass over the layers still waiting for their allotment (W = P at first; B_W = B):

    relevance   R_l = (sum_{k in W} I_k) / I_l
    share       s_l = softmax_W(R)_l = exp(R_l - max_W R) / sum_{k in W} exp(R_k - max_W R)
    allotment   a_l = B_W * s_l
    overflow    every l in W with r_l < a_l (strict, as the reference: a_l == r_l does not overflow)
                is emptied (n_l = r_l); it leaves W, its r_l leaves B_W and its I_l leaves the sum.

until a pass empties nothing (or W is empty). A layer with a low entropy and small weights has a
small I, a large R and, through the softmax, most of the budget: that is what drives layers to
collapse. Recomputing R over W after an overflow (rather than renormalising the first pass's
shares) is what the reference does; the two differ by up to half the budget of a layer.

Numerics (float64): the softmax subtracts max R, so its denominator is at least 1 and is never an
underflowed sum. When some R is +inf (I_l is 0, or sum I / I_l overflows), the limit of the
softmax is taken: the layers with the smallest I share the pass equally, the others get 0. With
0 <= ratio <= 1 the loop ends after at most |P| passes; a pass in which every waiting layer
overflows empties them all and ends it. Non-finite inputs exclude the layer (with the reason).

Integers. `rounding="largest_remainder"` (default): every waiting layer gets floor(a_l), and the
T - sum floor(a_l) units still missing to reach T = floor(B) - sum of the emptied r_l go one each
to the waiting layers with the largest fractional parts a_l - floor(a_l) (ties: pool order), so
exactly floor(B) weights are pruned, as IMP prunes exactly floor(ratio * N). The reference
truncates each layer instead (`rounding="truncate"`, n_l = floor(a_l)), which prunes up to
|W| - 1 weights fewer than floor(B). Either way a layer's count differs from the reference's by
at most one weight, and the emptied layers are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from egp_fx.errors import PruneError

ROUNDINGS = ("largest_remainder", "truncate")


@dataclass
class Allocation:
    """How many weights to prune in each layer this round, and why."""

    budget: int                                    # floor(B), the weights the round aims at
    prune: dict[str, int]                          # n_l (pool layers only)
    irrelevance: dict[str, float]                  # I_l
    relevance: dict[str, float]                    # R_l of the first pass
    shares: dict[str, float]                       # s_l of the first pass
    emptied: list[str] = field(default_factory=list)          # pruned entirely by overflow
    excluded: dict[str, str] = field(default_factory=dict)    # layer -> why it is not in the pool
    allotment: dict[str, float] = field(default_factory=dict)  # a_l of the last pass (r_l if emptied)
    passes: int = 0                                # softmax passes taken

    @property
    def pruned(self) -> int:
        """The number of weights this allocation prunes (sum of n_l)."""
        return sum(self.prune.values())


def relevance_shares(irrelevance: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(R, softmax(R)) over the given layers, R_l = sum(I) / I_l; safe for I = 0 and overflow."""
    if not irrelevance:
        return {}, {}
    total = math.fsum(irrelevance.values())
    rel = {n: (total / i if i > 0 and total / i < math.inf else math.inf)
           for n, i in irrelevance.items()}
    if math.inf in rel.values():
        smallest = min(irrelevance.values())
        winners = [n for n, i in irrelevance.items() if i == smallest]
        return rel, {n: (1 / len(winners) if n in winners else 0.0) for n in irrelevance}
    top = max(rel.values())
    exps = {n: math.exp(r - top) for n, r in rel.items()}
    norm = math.fsum(exps.values())                # >= 1: the top layer contributes exp(0)
    return rel, {n: e / norm for n, e in exps.items()}


def _exclusion(entropy: float, mean_abs: float, remaining: int) -> str | None:
    if remaining <= 0:
        return "all weights are zero"
    if not math.isfinite(entropy):
        return "entropy is not a finite number"
    if entropy <= 0:
        return "zero entropy"
    if not (math.isfinite(mean_abs) and mean_abs > 0):
        return "mean |w| is not a positive finite number"
    return None


def _largest_remainder(alloc: dict[str, float], caps: dict[str, int], target: int,
                       order: list[str]) -> dict[str, int]:
    out = {n: min(math.floor(a), caps[n]) for n, a in alloc.items()}
    frac = {n: alloc[n] - out[n] for n in alloc}
    missing = target - sum(out.values())
    up = sorted(alloc, key=lambda n: (-frac[n], order.index(n)))
    while missing > 0 and any(out[n] < caps[n] for n in up):      # one unit each per sweep
        for n in up:
            if missing > 0 and out[n] < caps[n]:
                out[n] += 1
                missing -= 1
    for n in reversed(up):                         # only on float error: give back the smallest
        if missing >= 0:
            break
        if out[n] > 0:
            out[n] -= 1
            missing += 1
    return out


def allocate(entropy: dict[str, float], mean_abs: dict[str, float], remaining: dict[str, int],
             ratio: float = 0.5, *, rounding: str = "largest_remainder") -> Allocation:
    """The EGP allocation for layers given by name (`entropy` gives the names and their order).

    Never raises on numbers: a layer with a non-finite entropy or magnitude is excluded (with
    the reason), and ratio is clamped to [0, 1].
    """
    if rounding not in ROUNDINGS:
        raise PruneError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    excluded, pool = {}, []
    for name in entropy:
        why = _exclusion(float(entropy[name]), float(mean_abs[name]), int(remaining[name]))
        if why is None:
            pool.append(name)
        else:
            excluded[name] = why
    caps = {n: int(remaining[n]) for n in pool}
    irr = {n: float(entropy[n]) * float(mean_abs[n]) for n in pool}
    total = sum(caps.values())
    ratio = min(max(float(ratio), 0.0), 1.0) if not math.isnan(ratio) else 0.0
    left = ratio * total                            # B_W, a real number as in the reference
    target = min(math.floor(left), total)
    waiting, emptied, prune, allot = list(pool), [], {}, {}
    first_rel, first_shares, passes = {}, {}, 0
    while waiting:
        rel, shares = relevance_shares({n: irr[n] for n in waiting})
        passes += 1
        if passes == 1:
            first_rel, first_shares = rel, shares
        allot = {n: left * shares[n] for n in waiting}
        over = [n for n in waiting if caps[n] < allot[n]]
        if not over:
            break
        for n in over:
            prune[n] = caps[n]
            left -= caps[n]
            target -= caps[n]
            emptied.append(n)
            waiting.remove(n)
            allot.pop(n)
    if waiting:
        if rounding == "truncate":
            prune.update({n: min(math.floor(allot[n]), caps[n]) for n in waiting})
        else:
            prune.update(_largest_remainder(allot, caps, max(target, 0), pool))
    allotment = {n: (float(caps[n]) if n in emptied else allot.get(n, 0.0)) for n in pool}
    return Allocation(math.floor(ratio * total), {n: prune.get(n, 0) for n in pool}, irr, first_rel,
                      first_shares, emptied, excluded, allotment, passes)
