"""Iterative magnitude pruning (IMP), the baseline of the EGP paper: global L1 unstructured pruning.

Each round, over all layers of the scope together (imp_scope: "all" conv/linear layers,
classifier and shortcut convs included, as the reference's baseline; or "prunable", the layers
EGP prunes):

    N = number of weights still in the masks,  n = floor(ratio * N)   (ratio = 0.5)
    drop from the masks the n weights with the smallest |w| among those, wherever they are

so that after i rounds the sparsity of the scope is 1 - 0.5^i, and a layer keeps exactly the
weights that are larger than the global threshold. Ties are broken by position (layer order,
then flat index), so the count is exact.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def global_magnitude_prune(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                           ratio: float = 0.5) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(new masks, weights each layer lost): the smallest-|w| `ratio` of the weights still in
    `masks`, over all layers together, leave them. Nothing given is changed."""
    names = list(masks)
    alive = [torch.nonzero(masks[n].flatten()).flatten() for n in names]
    mags = torch.cat([weights[n].detach().flatten()[a].abs().double().cpu()
                      for n, a in zip(names, alive)])
    owner = torch.cat([torch.full((a.numel(),), i, dtype=torch.long) for i, a in enumerate(alive)])
    n = math.floor(ratio * mags.numel())
    chosen = torch.sort(mags, stable=True).indices[:n]
    new, pruned = {}, {}
    offset = 0
    for i, name in enumerate(names):
        local = chosen[owner[chosen] == i] - offset
        offset += alive[i].numel()
        flat = masks[name].flatten().clone()
        flat[alive[i][local.to(alive[i].device)]] = False
        new[name] = flat.view_as(masks[name])
        pruned[name] = int(local.numel())
    return new, pruned
