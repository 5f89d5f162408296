"""prune across 2 gloo ranks under DistributedDataParallel, against one process with the same
global batch (tests/dist_cases.py: prune_cases)."""
from __future__ import annotations

import pytest
import torch

from dist_cases import RANK_BATCH, digits_loaders, prune_cases, pruned_of, tiny_net
from egp_fx.prune import FinetuneConfig, prune
from spawn_ranks import run_ranks


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
