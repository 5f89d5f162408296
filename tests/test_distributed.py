"""Calibration and compress across 2 gloo ranks (CPU, 1 thread each) against one process.

The ranks run tests/dist_cases.py in fresh processes (tests/spawn_ranks.py); the references
are computed here, in one process, on the union of the shards.
"""
from __future__ import annotations

import re

import pytest
import torch
from dist_cases import (
    EMPTY,
    HANG_TIMEOUT,
    HOLDOUT,
    UNEVEN,
    calibration_then_faults,
    union,
)
from spawn_ranks import run_ranks

import egp_fx
from egp_fx.testing.planted import planted_net
from egp_fx.testing.ranks import graph_of, kinds_net, stats_of

COUNTS = ("n", "batches", "on", "low", "high")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """calibration_then_faults on 2 ranks: (outcomes, what each rank had before rank 1 died)."""
    folder = tmp_path_factory.mktemp("ranks")
    outcomes = run_ranks(calibration_then_faults, folder, str(folder), timeout=150,
                         collective_timeout=30.0)
    partial = [torch.load(folder / f"partial{r}.pt") for r in (0, 1)]
    return outcomes, partial


@pytest.fixture(scope="module")
def calibrated(spawned):
    return spawned[1]


@pytest.fixture(scope="module")
def faults(spawned):
    return spawned


def _assert_same_stats(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        g, w = got[name], want[name]
        assert g["kind"] == w["kind"], name
        for key in COUNTS:                        # integers: exactly equal
            if torch.is_tensor(w[key]):
                assert g[key].dtype == torch.int64 and torch.equal(g[key], w[key]), (name, key)
            else:
                assert g[key] == w[key], (name, key)
        for key in ("zmin", "zmax"):             # min/max: exactly equal
            assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), (name, key)
        for key in ("egp", "easier"):
            assert abs(g[key] - w[key]) <= 1e-12, (name, key, g[key], w[key])
        torch.testing.assert_close(g["unit"], w["unit"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["uneven", "empty"])
def test_statistics_equal_one_process_on_the_union(calibrated, layout):
    shards = UNEVEN if layout == "uneven" else EMPTY
    want = stats_of(egp_fx.calibrate(kinds_net(), union(shards), progress=False))
    assert len(want) == 6 and {w["kind"] for w in want.values()} == \
        {"relu", "relu6", "leaky_relu", "gelu", "hardswish"}
    assert sum(want[n]["batches"] for n in want) == 6 * 4
    for rank in (0, 1):
        _assert_same_stats(calibrated[rank][layout], want)


def test_one_shard_alone_differs_from_the_union(calibrated):
    """The negative case: rank 0's shard alone does not give the union's statistics."""
    mine = stats_of(egp_fx.calibrate(kinds_net(), union(UNEVEN)[:3], progress=False))
    union_stats = calibrated[0]["uneven"]
    name = next(iter(mine))
    assert mine[name]["n"] < union_stats[name]["n"]
    with pytest.raises(AssertionError):
        _assert_same_stats(mine, union_stats)


def test_distributed_false_keeps_each_rank_local(calibrated):
    for rank in (0, 1):
        mine = [b for b in (union(UNEVEN)[:3], union(UNEVEN)[3:])][rank]
        want = stats_of(egp_fx.calibrate(kinds_net(), mine, progress=False, distributed=False))
        _assert_same_stats(calibrated[rank]["local"], want)


def test_compressed_graphs_identical_on_both_ranks_and_to_one_process(calibrated):
    a, b = calibrated[0]["compress"], calibrated[1]["compress"]
    assert a["code"] == b["code"]
    assert list(a["state"]) == list(b["state"])
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["report"] == b["report"]
    net = planted_net()
    one = graph_of(egp_fx.compress(net, union(UNEVEN), progress=False, verify_samples=6,
                                   holdout_loader=union(HOLDOUT)))
    assert a["code"] == one["code"]
    assert all(torch.equal(a["state"][k], one["state"][k]) for k in one["state"])
    assert a["report"]["max_error"] == one["report"]["max_error"]
    assert a["report"]["holdout_error"] == one["report"]["holdout_error"]
    applied = [r for r in a["report"]["rewrites"] if r["status"] == "applied"]
    assert len(applied) >= 3                     # the planted dead and linear units went
    assert calibrated[0]["untouched"] and calibrated[1]["untouched"]


def test_a_rank_that_raises_stops_the_other_naming_it(faults):
    first, second = faults[1][0]["raises"], faults[1][1]["raises"]
    assert second["error"] == "CalibrationError" and "NaN" in second["message"]
    assert first["error"] == "DistributedError"
    assert "rank 1 failed in calibration: CalibrationError" in first["message"]
    assert faults[1][0]["after_raise"] == [0, 1]       # the group is still usable


def test_a_rank_that_hangs_times_out_the_other_naming_it(faults):
    got = faults[1][0]["hangs"]
    assert got["error"] == "DistributedError"
    assert "rank 1 did not reach it" in got["message"] and "'calibration'" in got["message"]
    waited = float(re.search(r"failed after ([0-9.]+) s", got["message"]).group(1))
    assert HANG_TIMEOUT <= waited < HANG_TIMEOUT + 1.0     # the timeout, not the sleeping rank


def test_a_rank_that_dies_stops_the_other_naming_it(faults):
    outcomes, _ = faults
    got = outcomes[0].ok()["dies"]
    assert got["error"] == "DistributedError"
    assert "rank 1 did not reach it" in got["message"]
    assert outcomes[1].exitcode == 3 and outcomes[1].error_type == "NoResult"
