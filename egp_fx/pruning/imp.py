"""Iterative magnitude pruning (IMP), the baseline of the EGP paper: global L1 unstructured pruning.

Each round, over all layers of the scope together (prune(imp_scope=...): "all" conv/linear layers,
classifier and shortcut convs included, as the reference's baseline; or "prunable", the layers
EGP prunes):

    N = number of nonzero weights,  n = floor(ratio * N)   (ratio = 0.5)
    zero the n weights with the smallest |w| among the nonzero ones, wherever they are

so that after i rounds the sparsity of the scope is 1 - 0.5^i, and a layer keeps exactly the
weights that are larger than the global threshold. Ties are broken by position (layer order,
then flat index), so the count is exact.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import weight_of


@torch.no_grad()
def global_magnitude_prune(model: nn.Module, masks: dict[str, torch.Tensor], ratio: float = 0.5
                           ) -> dict[str, int]:
    """Zero the smallest-|w| `ratio` of the nonzero weights of all masked layers; update `masks`.

    Returns how many weights each layer lost.
    """
    names = list(masks)
    alive = [torch.nonzero(masks[n].flatten()).flatten() for n in names]
    mags = torch.cat([weight_of(model, n).detach().flatten()[a].abs().double().cpu()
                      for n, a in zip(names, alive)])
    owner = torch.cat([torch.full((a.numel(),), i, dtype=torch.long) for i, a in enumerate(alive)])
    n = math.floor(ratio * mags.numel())
    chosen = torch.sort(mags, stable=True).indices[:n]
    pruned = {}
    offset = 0
    for i, name in enumerate(names):
        local = chosen[owner[chosen] == i] - offset
        offset += alive[i].numel()
        flat = masks[name].flatten().clone()
        flat[alive[i][local.to(alive[i].device)]] = False
        masks[name] = flat.view_as(masks[name])
        weight_of(model, name).masked_fill_(~masks[name], 0.0)
        pruned[name] = int(local.numel())
    return pruned
