"""prune across 2 gloo ranks under DistributedDataParallel, against one process with the same
global batch (tests/dist_prune_cases.py: prune_cases)."""
from __future__ import annotations

import pytest
import torch
from dist_prune_cases import (
    dense_digits_model,
    egp_round,
    egp_round_on_ranks,
    prune_cases,
)
from spawn_ranks import run_ranks

from egp_fx.pruning import FinetuneConfig, prune
from egp_fx.testing.ranks import RANK_BATCH, digits_loaders, pruned_of, tiny_net


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune")
    outcomes = run_ranks(prune_cases, folder, str(folder), timeout=240)
    assert outcomes[1].exitcode == 3
    return [outcomes[0].ok(), torch.load(folder / "partial1.pt")]


def _identical(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run", ["imp", "egp", "resumed"])
def test_weights_and_masks_identical_on_both_ranks(pruned, run):
    a, b = pruned[0][run], pruned[1][run]
    assert _identical(a["state"], b["state"])
    assert _identical(a["masks"], b["masks"])
    assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]
    assert all(0.0 < float(m.float().mean()) < 1.0 for m in a["masks"].values())


def test_ddp_step_equals_one_process_with_the_global_batch(pruned):
    """No BatchNorm, IMP masks from the same initial weights: the 2-rank run and one process with
    batches of 2 x RANK_BATCH in the same order train the same weights up to rounding."""
    train, val = digits_loaders(1, 0, 2 * RANK_BATCH)
    one = pruned_of(prune(tiny_net(), train, method="imp", iterations=1,
                                 finetune=FinetuneConfig(epochs=1, lr=0.05), val_loader=val,
                                 measure_compress=False, progress=False),
                    ["conv1", "conv2", "fc"])
    two = pruned[0]["imp"]
    assert _identical(one["masks"], two["masks"])
    for k in one["state"]:
        torch.testing.assert_close(two["state"][k], one["state"][k], rtol=1e-4, atol=1e-6)
    assert abs(two["accuracy"][-1] - one["accuracy"][-1]) <= 0.005
    assert two["loss"][-1] == pytest.approx(one["loss"][-1], rel=1e-5)
    # the negative case: the same run with the per-rank batch differs
    train, _ = digits_loaders(1, 0, RANK_BATCH)
    small = pruned_of(prune(tiny_net(), train, method="imp", iterations=1,
                                   finetune=FinetuneConfig(epochs=1, lr=0.05), val_loader=val,
                                   measure_compress=False, progress=False),
                      ["conv1", "conv2", "fc"])
    assert not torch.allclose(small["state"]["conv1.weight"], one["state"]["conv1.weight"],
                              rtol=1e-3, atol=1e-4)


def test_rank_0_writes_and_resume_restores_every_rank(pruned):
    assert pruned[0]["files"] == ["iter_1.safetensors", "log.json"]
    assert pruned[1]["files"] is None and pruned[1]["resumed_files"] is None
    assert pruned[0]["resumed_files"] == ["iter_1.safetensors", "iter_2.safetensors", "log.json"]
    first, resumed = pruned[0]["egp"], pruned[0]["resumed"]
    assert resumed["accuracy"][:2] == first["accuracy"]       # records 0 and 1 come from the log
    assert resumed["sparsity"][2] > resumed["sparsity"][1] > 0
    compress = pruned[0]["egp_compress"]
    assert compress is not None and "error" not in compress and pruned[1]["egp_compress"] == compress


def test_a_rank_that_fails_in_fine_tuning_stops_the_other_naming_it(pruned):
    mine, theirs = pruned[1]["fails"], pruned[0]["fails"]
    assert mine["error"] == "PruneError" and "has no labels" in mine["message"]
    assert theirs["error"] == "DistributedError"
    assert "rank 1 failed in imp iter 1: epoch 1: PruneError: batch 2" in theirs["message"]
    assert theirs["seconds"] < 15                  # not the 20 s collective timeout


def test_pruner_masks_hold_in_a_ddp_loop_on_two_ranks(pruned):
    """EGPPruner between DDP steps: both ranks compute the same masks from the reduced
    statistics, the masked weights stay zero through the momentum steps after each round, and
    the ranks end with the same weights."""
    a, b = pruned[0]["loop"], pruned[1]["loop"]
    assert len(a["masks"]) == 2
    for mine, theirs in zip(a["masks"], b["masks"]):
        assert _identical(mine, theirs)
    assert _identical(a["state"], b["state"]) and _identical(a["weights"], b["weights"])
    assert a["entropy"] == b["entropy"] and all(h > 0 for h in a["entropy"][0].values())
    last = a["masks"][-1]
    for name, w in a["weights"].items():
        mask = last[f"{name}.weight"]
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
        assert int(w.count_nonzero()) == int(mask.sum())
    assert a["sparsity"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.slow
def test_two_rank_egp_round_on_all_digits_matches_one_process(tmp_path):
    """The issue's bar: from a dense ResNet-18 (x0.25) trained by one process, one EGP round of
    one epoch on every digit by 2 ranks x 64 and by 1 process x 128: identical weights and
    masks on both ranks, validation accuracy within 0.5 points of one process's.

    The ranks normalise their BatchNorm batches of 64 on their own, one process its batches of
    128: the runs differ by that, and a one-epoch round at lr 0.1 amplifies it (on this machine
    76.1% against 83.3%, where one process alone moves between 70% and 91% with the data
    order); at 0.05 the two agreed to the image."""
    start = str(tmp_path / "dense.safetensors")
    dense_digits_model(start)
    lr = 0.05
    two = [o.ok() for o in run_ranks(egp_round_on_ranks, tmp_path / "ranks", start, lr,
                                     timeout=590, collective_timeout=120)]
    assert _identical(two[0]["state"], two[1]["state"])
    assert _identical(two[0]["masks"], two[1]["masks"])
    one = egp_round(start, 1, 0, 128, lr)
    print(f"accuracy before/after: 2 ranks {two[0]['accuracy']}, one process "
          f"{one['accuracy']}; sparsity {two[0]['sparsity'][-1]:.4f} / "
          f"{one['sparsity'][-1]:.4f}; seconds {two[0]['seconds']:.0f} / {one['seconds']:.0f}")
    assert two[0]["accuracy"][0] == one["accuracy"][0] > 0.9
    assert two[0]["sparsity"][-1] == pytest.approx(0.5, abs=0.01)
    assert abs(two[0]["accuracy"][-1] - one["accuracy"][-1]) <= 0.005


@pytest.mark.parametrize("case", ["even", "uneven", "empty"])
def test_uneven_and_empty_training_shards_do_not_hang(pruned, case):
    """Rank 1 trains on all 8 of its batches, 3 of them, or none: DDP's Join carries rank 0
    through its other batches (the whole run is bounded in time), and both end with the same
    weights, the same BatchNorm statistics (rank 0's) and the same history."""
    a, b = pruned[0][case], pruned[1][case]
    assert _identical(a["state"], b["state"])
    assert a["history"] == b["history"] and 0 < a["history"][0]["loss"] < 10
    assert not torch.equal(a["state"]["conv1.weight"], tiny_net().state_dict()["conv1.weight"])
    assert int(a["state"]["bn1.num_batches_tracked"]) == 8       # rank 0's, on every rank
    assert not _identical(pruned[0]["uneven"]["state"], pruned[0]["empty"]["state"])
    assert not _identical(pruned[0]["even"]["state"], pruned[0]["uneven"]["state"])
