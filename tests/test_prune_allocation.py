"""EGP's allocation against a plain transcription of the reference loop, on thousands of pools.

`reference_allocation` below is written from the description of the reference code alone (a
layer whose allotment exceeds what it has left is emptied, its I leaves the sum, R and the
softmax are recomputed over the layers still waiting, each layer's count is truncated), with
plain sums and none of egp_fx's code. The properties: the same layers are emptied, truncation
gives the same counts, largest remainder is within one weight per layer and prunes exactly
floor(B); extreme numbers never raise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egp_fx.pruning import PruneError, allocate
from egp_fx.pruning.allocation import relevance_shares

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def reference_allocation(entropy, mean_abs, remaining, ratio=0.5):
    """(counts, emptied layers) as the reference loop computes them."""
    pool = [n for n in entropy if entropy[n] > 0 and remaining[n] > 0]
    irrelevance = {n: entropy[n] * mean_abs[n] for n in pool}
    budget = ratio * sum(remaining[n] for n in pool)
    waiting = list(pool)
    amount = {}
    emptied = []
    while waiting:
        total = sum(irrelevance[n] for n in waiting)
        relevance = {n: total / irrelevance[n] for n in waiting}
        top = max(relevance.values())
        exps = {n: math.exp(relevance[n] - top) for n in waiting}
        norm = sum(exps.values())
        for n in waiting:
            amount[n] = budget * exps[n] / norm
        over = [n for n in waiting if remaining[n] < amount[n]]
        for n in over:
            amount[n] = remaining[n]
            budget -= remaining[n]
            waiting.remove(n)
            emptied.append(n)
        if not over:
            break
    return {n: int(amount[n]) for n in pool}, emptied


def _near_integer(a: float) -> bool:
    return abs(a - round(a)) <= 1e-9 * max(1.0, abs(a))


def _check_against_reference(entropy, mean_abs, remaining):
    ref, ref_emptied = reference_allocation(entropy, mean_abs, remaining)
    truncated = allocate(entropy, mean_abs, remaining, rounding="truncate")
    assert truncated.emptied == ref_emptied
    # Truncation is the reference's rounding: the same counts, except where the allotment lies
    # within float noise of an integer (22391.999999999996 here, 22392.0 there: the two sum and
    # multiply in different orders) and the two floors differ by one.
    assert all(truncated.prune[n] == ref[n] or (abs(truncated.prune[n] - ref[n]) == 1
                                                and _near_integer(truncated.allotment[n]))
               for n in ref), (truncated.prune, ref)
    alloc = allocate(entropy, mean_abs, remaining)
    assert alloc.emptied == ref_emptied
    assert alloc.prune.keys() == ref.keys()
    assert all(abs(alloc.prune[n] - ref[n]) <= 1 for n in ref), (alloc.prune, ref)
    assert all(alloc.prune[n] <= remaining[n] for n in ref)
    if ref:
        assert alloc.pruned == math.floor(0.5 * sum(remaining[n] for n in ref)) == alloc.budget
    return alloc


_layer = st.tuples(
    st.one_of(st.just(0.0), st.floats(1e-4, 1.0)),           # H (0: leaves the pool)
    st.floats(1e-4, 0.5),                                    # mean |w| of the nonzero weights
    st.one_of(st.just(0), st.integers(1, 2_500_000)),        # nonzero weights left
)


@settings(max_examples=1500, **SETTINGS)
@given(st.lists(_layer, min_size=1, max_size=20))
def test_allocation_equals_the_reference_loop(layers):
    names = [f"l{i}" for i in range(len(layers))]
    _check_against_reference({n: h for n, (h, _, _) in zip(names, layers)},
                             {n: m for n, (_, m, _) in zip(names, layers)},
                             {n: r for n, (_, _, r) in zip(names, layers)})


def test_allocation_equals_the_reference_loop_on_resnet_like_pools():
    """5,000 pools shaped like ResNet-18 rounds: 3 to 17 convs of real sizes, sparsities, entropies."""
    rng = np.random.default_rng(0)
    widths = [64, 128, 256, 512]
    sizes = [3 * 64 * 9] + [w * w * 9 for w in widths for _ in range(4)]
    emptied_somewhere = multi_pass = 0
    for _ in range(5000):
        k = int(rng.integers(3, 18))
        idx = rng.choice(len(sizes), size=k, replace=False)
        scale = float(rng.choice([0.125, 0.25, 1.0]))
        names = [f"conv{i}" for i in idx]
        entropy = {n: float(rng.uniform(0.01, 1.0)) if rng.random() > 0.1 else 0.0 for n in names}
        mean_abs = {n: float(10 ** rng.uniform(-3, -1)) for n in names}
        remaining = {n: int(sizes[i] * scale * scale * 0.5 ** rng.integers(0, 9))
                     for n, i in zip(names, idx)}
        alloc = _check_against_reference(entropy, mean_abs, remaining)
        emptied_somewhere += bool(alloc.emptied)
        multi_pass += alloc.passes > 2
    assert emptied_somewhere > 1000 and multi_pass > 100       # the overflow paths were exercised


_extreme = st.floats(min_value=0.0, max_value=1e300, allow_subnormal=True)


@settings(max_examples=800, **SETTINGS)
@given(st.lists(st.tuples(st.one_of(_extreme, st.sampled_from([5e-324, 1e-300, math.nan, math.inf])),
                          st.one_of(_extreme, st.sampled_from([5e-324, math.nan, math.inf])),
                          st.integers(0, 10**7)), min_size=1, max_size=12),
       st.floats(0.0, 1.0))
def test_allocation_never_raises_and_keeps_its_invariants(layers, ratio):
    names = [f"l{i}" for i in range(len(layers))]
    alloc = allocate({n: h for n, (h, _, _) in zip(names, layers)},
                     {n: m for n, (_, m, _) in zip(names, layers)},
                     {n: r for n, (_, _, r) in zip(names, layers)}, ratio)
    caps = {n: r for n, (_, _, r) in zip(names, layers)}
    pool = [n for n in names if n not in alloc.excluded]
    assert list(alloc.prune) == pool
    assert all(0 <= alloc.prune[n] <= caps[n] for n in pool)
    assert alloc.pruned == alloc.budget == math.floor(ratio * sum(caps[n] for n in pool))
    assert set(alloc.emptied) <= set(pool)
    assert all(alloc.prune[n] == caps[n] for n in alloc.emptied)
    if pool:
        assert math.fsum(alloc.shares.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(math.isfinite(s) and s >= 0 for s in alloc.shares.values())
        assert all(math.isfinite(a) for a in alloc.allotment.values())
        assert alloc.passes <= len(pool)


def test_allocation_single_layer_takes_the_whole_budget():
    alloc = allocate({"a": 0.3}, {"a": 0.01}, {"a": 1001})
    assert alloc.prune == {"a": 500} and alloc.shares == {"a": 1.0}
    assert alloc.emptied == [] and alloc.passes == 1


def test_allocation_every_layer_overflowing_in_one_pass():
    # ratio 1: the shares are rounded floats, so a_l = 10 * s_l may exceed r_l by one ulp in every
    # layer at once; whatever happens, every weight goes and the loop ends.
    alloc = allocate({"a": 0.7, "b": 0.3}, {"a": 1.0, "b": 1.0}, {"a": 3, "b": 7}, ratio=1.0)
    assert alloc.prune == {"a": 3, "b": 7} and alloc.pruned == 10


def test_allocation_infinite_relevance_goes_to_the_smallest_irrelevance():
    # I_a = 1e-300 * 1e-300 underflows to 0 (R_a = inf); I_b = 1e-320 is subnormal: sum / I_b
    # overflows. The limit of the softmax: the smallest I takes the pass.
    rel, shares = relevance_shares({"a": 0.0, "b": 1e-320, "c": 1.0})
    assert rel["a"] == math.inf and rel["b"] == math.inf and shares == {"a": 1.0, "b": 0.0, "c": 0.0}
    _, shares = relevance_shares({"a": 0.0, "b": 0.0, "c": 1.0})
    assert shares == {"a": 0.5, "b": 0.5, "c": 0.0}
    alloc = allocate({"a": 1e-300, "b": 0.5, "c": 0.5}, {"a": 1e-300, "b": 1.0, "c": 2.0},
                     {"a": 100, "b": 1000, "c": 1000})
    assert alloc.irrelevance["a"] == 0.0 and alloc.emptied == ["a"]
    assert alloc.prune == {"a": 100, "b": 777, "c": 173}       # then as without a


def test_allocation_excludes_what_it_cannot_rank():
    alloc = allocate({"a": math.nan, "b": math.inf, "c": -0.1, "d": 0.5, "e": 0.5, "f": 0.5},
                     {"a": 1.0, "b": 1.0, "c": 1.0, "d": math.nan, "e": 0.0, "f": 1.0},
                     {"a": 10, "b": 10, "c": 10, "d": 10, "e": 10, "f": 10})
    assert alloc.excluded == {"a": "entropy is not a finite number",
                              "b": "entropy is not a finite number", "c": "zero entropy",
                              "d": "mean |w| is not a positive finite number",
                              "e": "mean |w| is not a positive finite number"}
    assert alloc.prune == {"f": 5}
    with pytest.raises(PruneError, match="rounding"):
        allocate({"f": 0.5}, {"f": 1.0}, {"f": 10}, rounding="round")
