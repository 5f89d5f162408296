"""What every rank of a multi-process check builds the same way: nets, batches, and the records
of a result that must agree across ranks (or with one process on the union of the shards).

Every builder is deterministic (seeded), so a parent process builds the same models and batches
for its single-process references.
- kinds_net(): one call of each supported activation kind, and one ReLU module called twice;
  batches(sizes, offset): inputs for it (and for planted.planted_net), INPUT_SHAPE each.
- tiny_net(): two prunable convs and a classifier for the prune checks on the shipped digits;
  digits_loaders: a rank's DistributedSampler share of them.
- stats_of, graph_of, pruned_of: a calibration, a compressed graph, a prune result as plain
  values to compare.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.pipeline.report import report_of
from egp_fx.pruning.datasets import load_digits_data

INPUT_SHAPE = (3, 16, 16)
PRUNE_TRAIN, PRUNE_VAL, RANK_BATCH = 256, 120, 16


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


def batches(sizes: list[int], offset: int = 0) -> list[torch.Tensor]:
    """Batches of the given sizes; batch i of every call with the same offset is the same."""
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(1000 + offset + i)
        out.append(torch.randn(n, *INPUT_SHAPE, generator=g))
    return out


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
    report = report_of(gm).to_dict()
    report.pop("seconds", None)
    for summary in report["passes"]:           # timings differ from run to run
        summary.pop("seconds", None)
    return {"code": gm.code, "state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
            "report": report}


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
    data = load_digits_data(size=size)
    train_set = Subset(data.train, range(train)) if train else data.train
    val_set = Subset(data.val, range(val)) if val else data.val
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed)
    return (DataLoader(train_set, batch_size=batch, sampler=sampler),
            DataLoader(val_set, batch_size=64))


def pruned_of(result, names) -> dict:
    """The weights, masks and per-round figures of a prune result (`names`: the pruned layers)."""
    model = result.model
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "masks": {n: model.get_submodule(n).weight.detach() != 0 for n in names},
            "accuracy": [r.accuracy for r in result.log],
            "sparsity": [r.sparsity for r in result.log],
            "loss": [r.train[-1]["loss"] if r.train else None for r in result.log]}
