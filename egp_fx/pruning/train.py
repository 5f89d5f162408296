"""Fine-tuning between pruning rounds, and evaluation.

SGD with momentum 0.9 and weight decay 1e-4 on the cross-entropy loss; the learning rate starts
at `lr` and is multiplied by `gamma` (0.1) after the epochs floor(f * epochs) for f in
`milestones` (0.5, 0.75), as in the EGP reference. Pruned weights stay exactly zero: after every
optimizer step each masked weight tensor is multiplied by its 0/1 mask (momentum and weight
decay may move a pruned weight during the step; the mask puts it back to zero before the next
forward pass).

Across ranks (`distributed`, default: when a torch.distributed process group is initialised) the
model trains under DistributedDataParallel, each rank on its own loader (a DistributedSampler's
share of the data: then one step averages the gradients of the global batch, the ranks' batches
together), with the same masks, and ends with rank 0's parameters and buffers on every rank
(egp_fx.distributed.training); the history and the accuracy of evaluate() are over all ranks.
A sampler with set_epoch (DistributedSampler) is moved on by one epoch after every epoch, so each
epoch, in every round, draws a new order.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from egp_fx import distributed as ranks
from egp_fx.distributed import training as across
from egp_fx.errors import PruneError
from egp_fx.ir.batches import batch_input, batch_label

from .layers import apply_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Retraining after each pruning round (defaults: EGP reference, fewer epochs)."""

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.75)   # fractions of `epochs` where lr *= gamma
    gamma: float = 0.1
    device: str | None = None                      # None: where the model's parameters are
    input_key: str | None = None                   # for loaders that yield dicts
    label_key: str | None = None
    max_batches: int | None = None                 # per epoch (quick runs and tests)

    def milestone_epochs(self) -> list[int]:
        return sorted({int(f * self.epochs) for f in self.milestones} - {0})


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(model.parameters(), torch.empty(0)).device


def _xy(batch, config: FinetuneConfig, index: int, device: torch.device):
    y = batch_label(batch, config.label_key)
    if y is None:
        raise PruneError(f"batch {index} of the training/validation loader has no labels: "
                         "yield (input, label) pairs or dicts with a label key (label_key=)")
    return batch_input(batch, config.input_key).to(device), y.to(device)


def _next_epoch(loader: Iterable) -> None:
    """Move a DistributedSampler (anything with set_epoch and epoch) on by one epoch."""
    for holder in (loader, getattr(loader, "loader", None)):
        for sampler in (getattr(holder, "sampler", None),
                        getattr(getattr(holder, "batch_sampler", None), "sampler", None)):
            if hasattr(sampler, "set_epoch") and isinstance(getattr(sampler, "epoch", None), int):
                sampler.set_epoch(sampler.epoch + 1)
                return


def finetune(model: nn.Module, loader: Iterable, config: FinetuneConfig,
             masks: dict[str, torch.Tensor] | None = None, *, progress: bool = True,
             desc: str = "finetune", distributed: bool | None = None) -> list[dict]:
    """Train `model` in place; returns per-epoch {"epoch", "loss", "accuracy", "lr"}."""
    device = model_device(model, config.device)
    model.to(device).train()
    masks = {k: m.to(device) for k, m in (masks or {}).items()}
    spread = ranks.enabled(distributed)
    net = across.wrap(model, device, desc) if spread else model
    join = spread and across.uneven(loader, config.max_batches, desc)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, config.milestone_epochs(), config.gamma)
    history = []
    bar = tqdm(range(config.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        loss_sum, correct, seen = 0.0, 0, 0
        lr = opt.param_groups[0]["lr"]
        with across.epoch(net, f"{desc}: epoch {epoch + 1}", join) if spread \
                else contextlib.nullcontext():
            for i, batch in enumerate(loader):
                if config.max_batches is not None and i >= config.max_batches:
                    break
                x, y = _xy(batch, config, i, device)
                logits = net(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                apply_masks(model, masks)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
        if spread:
            loss_sum, correct, seen = across.sum_over_ranks([loss_sum, correct, seen],
                                                            f"{desc}: epoch {epoch + 1} history")
        if seen == 0:
            raise PruneError("the training loader yielded no batches")
        sched.step()
        _next_epoch(loader)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
                        "lr": lr})
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    if spread:
        across.sync_state(model, f"{desc}: end")
    log.debug("%s: %s", desc, history[-1] if history else "no epochs")
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, config: FinetuneConfig | None = None, *,
             distributed: bool | None = None) -> float:
    """Top-1 accuracy of `model` (eval mode) over `loader` (across ranks: over every rank's
    loader together); the model's mode is restored."""
    config = config or FinetuneConfig()
    device = model_device(model, config.device)
    was_training = model.training
    model.to(device).eval()
    spread = ranks.enabled(distributed)
    correct = seen = 0
    with ranks.together("evaluate", spread):
        for i, batch in enumerate(loader):
            x, y = _xy(batch, config, i, device)
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    model.train(was_training)
    if spread:
        correct, seen = across.sum_over_ranks([correct, seen], "evaluate")
    if seen == 0:
        raise PruneError("the evaluation loader yielded no batches")
    return correct / seen
