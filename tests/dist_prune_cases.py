"""What the ranks of the multi-process prune tests run (spawn_ranks.run_ranks), and the
one-process references the parent builds the same way; the small network on the shipped digits
and the DistributedSampler shares come from egp_fx.testing.ranks.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from dist_cases import _attempt

from egp_fx.distributed import exchange
from egp_fx.testing.ranks import RANK_BATCH, digits_loaders, pruned_of, tiny_net


def prune_cases(rank: int, world: int, folder: str) -> dict:
    """IMP and EGP, 1 round of 1 epoch, on the ranks' shares of 256 digits; then a resume."""
    from egp_fx.pruning import FinetuneConfig, prune  # noqa: PLC0415

    train, val = digits_loaders(world, rank, RANK_BATCH)
    config = FinetuneConfig(epochs=1, lr=0.05)
    out = {}
    imp = prune(tiny_net(), train, method="imp", iterations=1, finetune=config,
                       val_loader=val, measure_compress=False, progress=False)
    out["imp"] = pruned_of(imp, ["conv1", "conv2", "fc"])
    run = f"{folder}/run{rank}"                   # every rank its own path: rank 0 alone writes
    egp = prune(tiny_net(rank), train, method="egp", iterations=1, finetune=config,
                       val_loader=val, out_dir=run, progress=False)
    out["egp"] = pruned_of(egp, ["conv1", "conv2"])
    out["egp_compress"] = egp.log[-1].compress
    out["files"] = sorted(p.name for p in Path(run).iterdir()) if Path(run).exists() else None
    resumed = prune(tiny_net(rank), train, method="egp", iterations=2, finetune=config,
                           val_loader=val, out_dir=run, resume=True, progress=False)
    out["resumed"] = pruned_of(resumed, ["conv1", "conv2"])
    out["resumed_files"] = sorted(p.name for p in Path(run).iterdir()) \
        if Path(run).exists() else None
    from egp_fx.pruning import finetune  # noqa: PLC0415
    for name, keep in (("even", None), ("uneven", 3), ("empty", 0)):   # rank 1: 8, 3 or 0 of 8
        model = tiny_net(batchnorm=True)
        history = finetune(model, _First(train, keep if rank == 1 else None), config,
                           progress=False)
        out[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                     "history": history}
    out["loop"] = loop_case(train)
    exchange(None, "test: done")
    broken = _NoLabelsAt(train, 2 if rank == 1 else None)   # last: the group does not survive it
    out["fails"] = _attempt(lambda: prune(tiny_net(), broken, method="imp", iterations=1,
                                          finetune=config, measure_compress=False,
                                          progress=False))
    if rank == 1:
        torch.save(out, f"{folder}/partial{rank}.pt")
        os._exit(3)                                # a failing rank ends its process
    return out


def loop_case(train) -> dict:
    """EGPPruner in a plain DDP loop: the pruner made on the model, then DDP and an SGD with
    momentum built before the first round; 3 steps, a round, 3 steps, a round, 3 steps. Each
    rank calibrates on its own share (the statistics are reduced over both)."""
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    from egp_fx.pruning import EGPPruner  # noqa: PLC0415

    model = tiny_net(seed=3)
    pruner = EGPPruner(model, train, calib_batches=2)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    masks = []
    for phase in range(3):
        for i, (x, y) in enumerate(train):
            if i == 3:
                break
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if phase < 2:
            pruner.step()
            masks.append({n: m.clone() for n, m in pruner.masks.all().items()})
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in pruner.pruned_names}
    return {"masks": masks, "weights": weights, "sparsity": pruner.sparsity,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "entropy": [s.entropy for s in pruner.steps]}


class _NoLabelsAt:
    """A loader whose batch `index` has lost its labels (None: a loader as good as `loader`)."""

    def __init__(self, loader, index: int | None):
        self.loader, self.index = loader, index

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            yield x if i == self.index else (x, y)


def dense_digits_model(path: str, epochs: int = 4) -> None:
    """A dense ResNet-18 (CIFAR stem, width x0.25) trained on all digits by one process, saved
    to `path` (the start of the EGP round below)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from egp_fx.pruning import FinetuneConfig, finetune, resnet18_cifar  # noqa: PLC0415

    torch.manual_seed(0)
    model = resnet18_cifar(width_mult=0.25)
    train, _ = digits_loaders(1, 0, 128, train=0, val=0, size=32)
    finetune(model, train, FinetuneConfig(epochs=epochs, lr=0.1), progress=False,
             distributed=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def egp_round(start: str, world: int, rank: int, rank_batch: int, lr: float) -> dict:
    """One EGP round of one epoch from the model saved at `start`, on all 1,437 training digits
    (this rank's DistributedSampler share, batches of `rank_batch`), scored on all 360
    validation digits."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from egp_fx.pruning import FinetuneConfig, prune, resnet18_cifar  # noqa: PLC0415

    model = resnet18_cifar(width_mult=0.25)
    model.load_state_dict(load_file(start))
    train, val = digits_loaders(world, rank, rank_batch, train=0, val=0, size=32)
    t0 = time.monotonic()
    result = prune(model, train, method="egp", iterations=1, val_loader=val,
                   finetune=FinetuneConfig(epochs=1, lr=lr), measure_compress=False,
                   progress=False)
    out = pruned_of(result, [lay["module"] for lay in result.log[-1].layers])
    out["seconds"] = time.monotonic() - t0
    return out


def egp_round_on_ranks(rank: int, world: int, start: str, lr: float) -> dict:
    return egp_round(start, world, rank, 64, lr)


class _First:
    """The first `n` batches of a loader (None: all of them)."""

    def __init__(self, loader, n: int | None):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return len(self.loader) if self.n is None else self.n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.n is not None and i >= self.n:
                return
            yield batch
