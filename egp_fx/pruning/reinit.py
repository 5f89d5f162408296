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

then trains it with the fine-tuning recipe (SGD, step schedule) for a given number of epochs and
no masks. The reference re-draws conv and linear weights the same way and also resets the norm
layers' affine parameters; it keeps the trained Linear biases and BatchNorm running statistics,
which here start afresh (a from-scratch start).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from .layers import PRODUCERS
from .train import FinetuneConfig, finetune

log = logging.getLogger(__name__)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def reinitialize(model: nn.Module) -> list[str]:
    """Re-draw `model` in place as described above; returns the names of the frozen layers."""
    frozen = []
    for name, module in model.named_modules():
        if isinstance(module, PRODUCERS):
            if not bool(module.weight.ne(0).any()):
                frozen.append(name)
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
                continue
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, _NORMS) or (any(True for _ in module.parameters(recurse=False))
                                            and hasattr(module, "reset_parameters")):
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            module.reset_parameters()
    return frozen


def train_from_scratch(model: nn.Module, loader: Iterable, config: FinetuneConfig, epochs: int, *,
                       progress: bool = True, distributed: bool | None = None
                       ) -> tuple[list[str], list[dict]]:
    """reinitialize(model), then train it in place for `epochs`; returns (frozen layers, history).

    The frozen layers get requires_grad back at the end (their weights are still zero). Across
    ranks (`distributed`, as finetune) every rank starts from rank 0's re-drawn weights.
    """
    frozen = reinitialize(model)
    log.info("re-initialisation ablation: %d frozen (emptied) layers, %d epochs", len(frozen), epochs)
    try:
        history = finetune(model, loader, replace(config, epochs=epochs), progress=progress,
                           desc="reinit", distributed=distributed)
    finally:
        for name in frozen:
            for p in model.get_submodule(name).parameters(recurse=False):
                p.requires_grad_(True)
    return frozen, history
