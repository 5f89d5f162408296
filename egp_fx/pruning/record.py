"""What a pruning round reads from a calibrated model, and what it records.

Entropies are read from the ActivationStats records calibrate() leaves in node.meta["egp"], at
full precision (layer_stats() rounds its table to 6 decimals; a layer with 0 < H < 5e-7 would
read as zero there and leave the pool):

    H_l = mean over the activation calls a fed by layer l of  node.meta["egp"].egp_entropy (a)

A record is taken on a plain model (the pruner's plain_view: masked weights as plain tensors):
sparsity over the prunable weights and over all conv/linear weights, per-layer entropy and
nonzero count, per activation call its entropies and dead/linear units, and what
egp_fx.compress removes from it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass

import torch
import torch.fx as fx
from torch import nn

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.calibrate.table import layer_stats
from egp_fx.errors import PruneError
from egp_fx.pipeline.compress import compress

from .layers import PrunableLayer
from .runlog import IterationRecord

log = logging.getLogger(__name__)


def activation_stats(gm: fx.GraphModule) -> dict[str, ActivationStats]:
    """node name -> the ActivationStats of every calibrated activation call of `gm`."""
    return {n.name: n.meta[EGP_META_KEY] for n in gm.graph.nodes
            if isinstance(n.meta.get(EGP_META_KEY), ActivationStats)}


def layer_entropy(gm: fx.GraphModule, layers: list[PrunableLayer]) -> dict[str, float]:
    """H_l (unrounded EGP entropy) of every prunable layer, by layer name (PrunableLayer.module)."""
    stats = activation_stats(gm)
    out = {}
    for lay in layers:
        missing = [a for a in lay.activations if a not in stats]
        if missing:
            raise PruneError(f"the entropy pass holds no statistics for {missing}, which "
                             f"{lay.module} feeds")
        out[lay.module] = sum(stats[a].egp_entropy for a in lay.activations) / len(lay.activations)
    return out


def count_nonzero(model: nn.Module, weights: list[str]) -> tuple[int, int]:
    """(nonzero entries, all entries) of the named parameters of a plain model."""
    nz = tot = 0
    for name in weights:
        w = model.get_parameter(name)
        nz += int(torch.count_nonzero(w))
        tot += w.numel()
    return nz, tot


def _totals(t) -> dict:
    if is_dataclass(t):
        return asdict(t)
    if hasattr(t, "_asdict"):
        return dict(t._asdict())
    return {k: getattr(t, k) for k in ("params", "flops", "weighted_depth", "nonlinear_depth")
            if hasattr(t, k)}


def compress_summary(model: nn.Module, loader: Iterable, gm: fx.GraphModule | None, options: dict
                     ) -> dict | None:
    """What egp_fx.compress removes from `model` (reusing the statistics in `gm` when given)."""
    try:
        kwargs = {"progress": False, **({"calibrated": gm} if gm is not None else {}), **options}
        report = compress(model, loader, **kwargs).meta["egp_report"]
        before, after = _totals(report.before), _totals(report.after)
    except Exception as err:  # reason: a failing measurement must not end a long pruning run
        log.warning("compress failed on the pruned model: %s: %s", type(err).__name__, err)
        return {"error": f"{type(err).__name__}: {err}"}
    removed = None
    if "weighted_depth" in before and "weighted_depth" in after:
        removed = before["weighted_depth"] - after["weighted_depth"]
    return {"before": before, "after": after, "removed_weighted_layers": removed}


def make_record(i: int, method: str, model: nn.Module, gm: fx.GraphModule,
                layers: list[PrunableLayer], weighted: list[str], step: dict,
                accuracy: float | None) -> IterationRecord:
    """The IterationRecord of a plain `model` (the pruner's plain view) with the statistics in
    `gm`; `weighted` names all conv/linear weights (the overall sparsity)."""
    names = [lay.weight for lay in layers]
    nz, tot = count_nonzero(model, names)
    nz_all, tot_all = count_nonzero(model, weighted)
    params = sum(p.numel() for p in model.parameters())
    nonzero_params = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    rows, stats = layer_stats(gm), activation_stats(gm)
    feeder = {a: lay.module for lay in layers for a in lay.activations}
    acts = [{"node": r.node, "module": feeder.get(r.node), "channels": r.channels,
             "dead": len(r.dead), "linear": len(r.linear),
             "egp_entropy": stats[r.node].egp_entropy, "easier_entropy": stats[r.node].easier_entropy,
             "state": r.state} for r in rows]
    entropy = layer_entropy(gm, layers)
    per_layer = []
    for lay in layers:
        w = model.get_parameter(lay.weight)
        nonzero = int(torch.count_nonzero(w))
        per_layer.append({"module": lay.module, "weights": w.numel(), "nonzero": nonzero,
                          "sparsity": 1 - nonzero / w.numel(), "entropy": entropy[lay.module]})
    return IterationRecord(
        iteration=i, method=method, accuracy=accuracy, sparsity=1 - nz / tot,
        sparsity_all=1 - nz_all / tot_all, nonzero_params=nonzero_params, params=params,
        budget=step.get("budget", 0), pruned=step.get("pruned", {}), emptied=step.get("emptied", []),
        excluded=step.get("excluded", {}), layers=per_layer, activations=acts,
        zero_entropy_layers=sum(a["egp_entropy"] == 0 for a in acts),
        off_layers=sum(r.state == "dead" for r in rows),
        on_layers=sum(len(r.linear) == r.channels for r in rows), activation_layers=len(rows),
        frozen=step.get("frozen", []))

