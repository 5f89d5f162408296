"""What the ranks of the multi-process tests run (spawn_ranks.run_ranks), and the shared inputs.

Every builder is deterministic, so the parent process builds the same models and batches for
the single-process references. Shards are lists of batches; "the union" is rank 0's batches
followed by rank 1's, which is what a single process is given.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch
from torch import nn

import egp_fx
from egp_fx.distributed import exchange
from egp_fx.stats import EGP_META_KEY, ActivationStats

INPUT_SHAPE = (3, 16, 16)
UNEVEN = ([5, 3, 4], [6])          # batch sizes of rank 0, rank 1
EMPTY = ([5, 3, 4, 6], [])
HOLDOUT = ([4], [])


class KindsNet(nn.Module):
    """One call of each supported kind, and one ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(8, 16)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(16, 16)
        self.hswish = nn.Hardswish()
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.relu(self.leaky(self.conv2(self.relu6(3 * self.conv1(x)))))
        h = self.relu(h - 0.1).mean((2, 3))
        return self.fc3(self.hswish(4 * self.fc2(self.gelu(self.fc1(h)))))


def kinds_net() -> KindsNet:
    torch.manual_seed(1)
    return KindsNet().eval()


def planted() -> nn.Module:
    from planted_models import planted_net  # noqa: PLC0415  (tests/ is on the path)

    return planted_net()


def batches(sizes: list[int], offset: int = 0) -> list[torch.Tensor]:
    """Batches of the given sizes; batch i of every call with the same offset is the same."""
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(1000 + offset + i)
        out.append(torch.randn(n, *INPUT_SHAPE, generator=g))
    return out


def shards(layout: tuple[list[int], list[int]]) -> list[list[torch.Tensor]]:
    """Each rank's batches; together, batches(union sizes) in rank order."""
    out, start = [], 0
    for sizes in layout:
        out.append(batches(sizes, offset=start))
        start += len(sizes)
    return out


def union(layout) -> list[torch.Tensor]:
    return [b for shard in shards(layout) for b in shard]


def stats_of(gm) -> dict[str, dict]:
    """The calibration record of every activation call, as plain values."""
    out = {}
    for node in gm.graph.nodes:
        st = node.meta.get(EGP_META_KEY)
        if isinstance(st, ActivationStats):
            out[node.name] = {"kind": st.kind, "n": st.n, "batches": st.batches, "on": st.on,
                              "low": st.low, "high": st.high, "zmin": st.zmin, "zmax": st.zmax,
                              "egp": st.egp_entropy, "easier": st.easier_entropy,
                              "unit": st.unit_entropy}
    return out


def graph_of(gm) -> dict:
    """What must be identical on every rank: the code, the weights, the report's numbers."""
    report = egp_fx.report_of(gm).to_dict()
    report.pop("seconds", None)
    for summary in report["passes"]:           # timings differ from run to run
        summary.pop("seconds", None)
    return {"code": gm.code, "state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
            "report": report}


# ----------------------------------------------------------------------------- rank functions

def calibration_cases(rank: int, world: int) -> dict:
    """Calibration with uneven and empty shards, opting out, and compress on uneven shards."""
    model = kinds_net()
    out = {"uneven": stats_of(egp_fx.calibrate(model, shards(UNEVEN)[rank], progress=False)),
           "empty": stats_of(egp_fx.calibrate(model, shards(EMPTY)[rank], progress=False)),
           "local": stats_of(egp_fx.calibrate(model, shards(UNEVEN)[rank], progress=False,
                                              distributed=False))}
    net = planted()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = egp_fx.compress(net, shards(UNEVEN)[rank], progress=False,
                            holdout_loader=shards(HOLDOUT)[rank], verify_samples=6)
    out["compress"] = graph_of(small)
    out["untouched"] = all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    exchange(None, "test: done")
    return out


HANG_SECONDS, HANG_TIMEOUT = 8.0, 2.0


def _attempt(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001  (the test judges the error)
        return {"error": type(err).__name__, "message": str(err), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _nan_in_second_batch(rank: int):
    data = batches([4, 4], offset=10 * rank)
    if rank == 1:
        data[1][0, 0, 0, 0] = float("nan")
    return data


def _slow(rank: int, seconds: float):
    yield from batches([4], offset=20 + rank)
    if rank == 1:
        time.sleep(seconds)
    yield from batches([4], offset=30 + rank)


def _dies(rank: int):
    yield from batches([4], offset=40 + rank)
    if rank == 1:
        os._exit(3)
    yield from batches([4], offset=50 + rank)


def calibration_then_faults(rank: int, world: int, store_folder: str) -> dict:
    """calibration_cases, then a rank that raises, then (same group) one that hangs, then (new
    group) one that dies. Rank 1 saves what it has before it dies, as partial1.pt."""
    import torch.distributed as dist  # noqa: PLC0415

    model = kinds_net()
    out = calibration_cases(rank, world)
    out["raises"] = _attempt(lambda: egp_fx.calibrate(model, _nan_in_second_batch(rank),
                                                       progress=False))
    out["after_raise"] = exchange(rank, "test: the group still works")
    egp_fx.distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=HANG_TIMEOUT)
    out["hangs"] = _attempt(lambda: egp_fx.calibrate(model, _slow(rank, HANG_SECONDS),
                                                     progress=False))
    egp_fx.distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
    torch.save(out, f"{store_folder}/partial{rank}.pt")      # rank 1 dies before returning
    dist.destroy_process_group()
    store = dist.FileStore(f"{store_folder}/store2", world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    out["dies"] = _attempt(lambda: egp_fx.calibrate(model, _dies(rank), progress=False))
    return out


# ----------------------------------------------------------------------------- prune

PRUNE_TRAIN, PRUNE_VAL, RANK_BATCH = 256, 120, 16


class TinyNet(nn.Module):
    """Two prunable convs and a classifier. Without BatchNorm one step of DDP over the ranks'
    batches equals one step of one process over the global batch, up to float rounding; with
    it (`batchnorm`), each rank's running statistics follow its own batches."""

    def __init__(self, batchnorm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x))))).mean((2, 3)))


def tiny_net(seed: int = 0, batchnorm: bool = False) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(batchnorm)


def digits_loaders(world: int, rank: int, batch: int, *, train: int = PRUNE_TRAIN,
                   val: int = PRUNE_VAL, size: int = 8, seed: int = 0):
    """(train loader through a DistributedSampler of `world` replicas, validation loader: all of
    it on every rank) over the first images of the shipped digits."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset  # noqa: PLC0415

    from egp_fx.prune.datasets import load_digits_data  # noqa: PLC0415

    data = load_digits_data(size=size)
    train_set = Subset(data.train, range(train)) if train else data.train
    val_set = Subset(data.val, range(val)) if val else data.val
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed)
    return (DataLoader(train_set, batch_size=batch, sampler=sampler),
            DataLoader(val_set, batch_size=64))


def pruned_of(result, names) -> dict:
    model = result.model
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "masks": {n: model.get_submodule(n).weight.detach() != 0 for n in names},
            "accuracy": [r.accuracy for r in result.log],
            "sparsity": [r.sparsity for r in result.log],
            "loss": [r.train[-1]["loss"] if r.train else None for r in result.log]}


def prune_cases(rank: int, world: int, folder: str) -> dict:
    """IMP and EGP, 1 round of 1 epoch, on the ranks' shares of 256 digits; then a resume."""
    from egp_fx.prune import FinetuneConfig, prune  # noqa: PLC0415

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
    from egp_fx.prune import finetune  # noqa: PLC0415
    for name, keep in (("even", None), ("uneven", 3), ("empty", 0)):   # rank 1: 8, 3 or 0 of 8
        model = tiny_net(batchnorm=True)
        history = finetune(model, _First(train, keep if rank == 1 else None), config,
                           progress=False)
        out[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                     "history": history}
    exchange(None, "test: done")
    broken = _NoLabelsAt(train, 2 if rank == 1 else None)   # last: the group does not survive it
    out["fails"] = _attempt(lambda: prune(tiny_net(), broken, method="imp", iterations=1,
                                          finetune=config, measure_compress=False,
                                          progress=False))
    if rank == 1:
        torch.save(out, f"{folder}/partial{rank}.pt")
        os._exit(3)                                # a failing rank ends its process
    return out


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

    from egp_fx.prune import FinetuneConfig, finetune, resnet18_cifar  # noqa: PLC0415

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

    from egp_fx.prune import FinetuneConfig, prune, resnet18_cifar  # noqa: PLC0415

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
