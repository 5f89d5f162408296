"""A self-checking run of egp_fx across ranks, for GPU machines (NCCL) and CPUs (gloo).

    torchrun --nproc_per_node N benchmarks/check_distributed.py --device cuda [--out check.json]
    torchrun --nproc_per_node 2 benchmarks/check_distributed.py --device cpu
    torchrun --nproc_per_node 2 benchmarks/check_distributed.py --device cuda:0 --backend gloo
        (two ranks on one GPU: gloo reduces the statistics on the CPU)

Every rank calibrates and compresses on its own shard (whole batches dealt in turn, uneven when
the batch count does not divide) and prunes under DistributedDataParallel; the checks, each
printed by rank 0 as PASS or FAIL with its numbers:
    stats       calibration statistics equal those of one process on the union of the shards
                (rank 0 computes that itself): counts and min/max exactly, entropies to 1e-12
    compress    the compressed graph (code and weights) is the same on every rank, and equal to
                one process's on the union
    prune       one IMP round of one epoch under DDP: weights and masks the same on every rank
    backend     (NCCL only) calibrating on the CPU in an NCCL group is a DistributedError
The exit code is 1 when a check fails. The models and data come from egp_fx.testing (ranks.py,
planted.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import egp_fx
from egp_fx.distributed import exchange, launch, rank, world_size
from egp_fx.distributed.training import digest
from egp_fx.pruning import FinetuneConfig, prune
from egp_fx.testing import ranks
from egp_fx.testing.planted import planted_net

SIZES = [5, 3, 4, 6, 2]


def _same_stats(got: dict, want: dict) -> tuple[bool, str]:
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        for key in ("on", "low", "high", "zmin", "zmax"):
            if not torch.equal(g[key], w[key]):
                return False, f"{name}.{key} differs"
        if (g["n"], g["batches"]) != (w["n"], w["batches"]):
            return False, f"{name}: n/batches differ"
        worst = max(worst, abs(g["egp"] - w["egp"]), abs(g["easier"] - w["easier"]))
    return worst <= 1e-12, f"{len(want)} activation calls; largest entropy difference {worst:.2e}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    ap.add_argument("--backend", help="create the group with this backend (default: egp-fx's "
                    "choice, NCCL for CUDA and gloo otherwise)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.backend:
        torch.distributed.init_process_group(args.backend)
    launch.setup(args.device)
    device = launch.rank_device(args.device)
    me, world = rank(), world_size()
    every = ranks.batches(SIZES)
    mine = [b.to(device) for b in every[me::world]]
    union = [b.to(device) for r in range(world) for b in every[r::world]]
    results = {"world": world, "backend": str(torch.distributed.get_backend()),
               "device": str(device), "checks": {}}

    def check(name: str, ok: bool, detail: str) -> None:
        results["checks"][name] = {"ok": bool(ok), "detail": detail}
        if me == 0:
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    model = ranks.kinds_net().to(device)
    got = ranks.stats_of(egp_fx.calibrate(model, mine, progress=False, device=device))
    want = ranks.stats_of(egp_fx.calibrate(model, union, progress=False, device=device,
                                           distributed=False))
    check("stats", *_same_stats(got, want))

    net = planted_net().to(device)
    small = ranks.graph_of(egp_fx.compress(net, mine, progress=False, device=device))
    one = ranks.graph_of(egp_fx.compress(net, union, progress=False, device=device,
                                         distributed=False))
    mark = digest(small["state"]) + small["code"]
    same = len(set(exchange(mark, "check: compressed graphs"))) == 1
    check("compress", same and small["code"] == one["code"] and
          digest(small["state"]) == digest(one["state"]),
          f"same on all {world} ranks: {same}; equal to one process: "
          f"{small['code'] == one['code'] and digest(small['state']) == digest(one['state'])}; "
          f"max error {small['report']['max_error']:.3g}")

    train, val = ranks.digits_loaders(world, me, ranks.RANK_BATCH)
    result = prune(ranks.tiny_net(me), train, method="imp", iterations=1, val_loader=val,
                   finetune=FinetuneConfig(epochs=1, lr=0.05, device=device),
                   measure_compress=False, progress=False)
    pruned = ranks.pruned_of(result, ["conv1", "conv2", "fc"])
    marks = exchange(digest(pruned["state"]) + digest(pruned["masks"]), "check: pruned")
    check("prune", len(set(marks)) == 1, f"accuracy {pruned['accuracy']}, sparsity "
          f"{pruned['sparsity'][-1]:.3f}, identical on all {world} ranks: {len(set(marks)) == 1}")

    if results["backend"] == "nccl":
        try:
            egp_fx.calibrate(ranks.kinds_net(), [b.cpu() for b in mine], progress=False,
                             device="cpu")
            check("backend", False, "calibrating on the CPU in an NCCL group did not fail")
        except egp_fx.DistributedError as err:
            check("backend", "NCCL" in str(err), str(err))
    ok = all(c["ok"] for c in results["checks"].values())
    if me == 0 and args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    launch.teardown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
