"""The re-initialisation ablation of the EGP paper: train the architecture EGP collapsed to from scratch.

If the shallow network that EGP finds were as good when trained directly, the iterative pruning
would only be a way of searching architectures. The ablation (reference:
src/reinitialize_finetune.py) takes the pruned model and

    frozen      every conv/linear whose weights are all zero (a layer pruning emptied) keeps its
                parameters and gets no gradient (requires_grad = False, so neither the step nor
                the weight decay moves it): the collapsed layers stay collapsed
    re-drawn    every other conv/linear: w ~ Kaiming normal (mode fan_out, ReLU gain), over all
                its entries (the layer is dense again), bias = 0
    reset       norm layers: weight 1, bias 0, fresh running statistics; any other module with
                parameters of its own: its reset_parameters()

then trains it with the fine-tuning recipe (SGD, step schedule, or the objective prune() was
given) for a given number of epochs and no masks. The conv/linear layers are the weighted calls of
the captured graph (layers.find_weighted), named by the caller or found by a torch.fx capture. The reference re-draws conv and linear weights the same way and also resets the norm
layers' affine parameters; it keeps the trained Linear biases and BatchNorm running statistics,
which here start afresh (a from-scratch start).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from egp_fx.capture import trace

from .layers import find_weighted
from .train import FinetuneConfig, finetune

log = logging.getLogger(__name__)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def reinitialize(model: nn.Module, weights: list[str] | None = None) -> list[str]:
    """Re-draw `model` in place as described above; returns the names of the frozen layers.

    `weights` names the conv/linear weights (parameter names); None finds them on a torch.fx
    capture of the model."""
    if weights is None:
        weights = find_weighted(trace(model), model)
    layers = {name.rpartition(".")[0]: name.rpartition(".")[2] for name in weights}
    frozen = []
    for name, module in model.named_modules():
        if name in layers:
            weight = getattr(module, layers[name])
            if not bool(weight.ne(0).any()):
                frozen.append(name)
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
                continue
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, _NORMS) or (any(True for _ in module.parameters(recurse=False))
                                            and hasattr(module, "reset_parameters")):
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            module.reset_parameters()
    return frozen


def train_from_scratch(model: nn.Module, loader: Iterable, config: FinetuneConfig, epochs: int, *,
                       weights: list[str] | None = None, progress: bool = True,
                       distributed: bool | None = None, **objective) -> tuple[list[str], list[dict]]:
    """reinitialize(model, weights), then train it in place for `epochs`; returns (frozen
    layers, history). `objective`: loss_fn, metric_fn, optimizer, scheduler, as finetune.

    The frozen layers get requires_grad back at the end (their weights are still zero). Across
    ranks (`distributed`, as finetune) every rank starts from rank 0's re-drawn weights.
    """
    frozen = reinitialize(model, weights)
    log.info("re-initialisation ablation: %d frozen (emptied) layers, %d epochs", len(frozen), epochs)
    try:
        history = finetune(model, loader, replace(config, epochs=epochs), progress=progress,
                           desc="reinit", distributed=distributed, **objective)
    finally:
        for name in frozen:
            for p in model.get_submodule(name).parameters(recurse=False):
                p.requires_grad_(True)
    return frozen, history
