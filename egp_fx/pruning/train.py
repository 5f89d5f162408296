"""Fine-tuning between pruning rounds, and evaluation.

Default (the EGP reference): SGD with momentum 0.9 and weight decay 1e-4 on the cross-entropy
loss; the learning rate starts at `lr` and is multiplied by `gamma` (0.1) after the epochs
floor(f * epochs) for f in `milestones` (0.5, 0.75). Any of it can be replaced:

    loss_fn(output, batch) -> loss           (losses.py: cross-entropy, bce, mse, lm)
    metric_fn(output, batch) -> float        higher is better; default top-1 accuracy
    optimizer(params) -> Optimizer           called with model.parameters() each round
    scheduler(optimizer) -> LR scheduler     stepped once per epoch

The model is called as the loss says (losses.model_inputs: the calibration call, or the LM
loss's call with labels). Pruned weights need nothing here: the pruner's masks are
parametrizations of the weights (masks.py), so they hold through any optimizer's steps.

A round's figures over a loader: loss and metric are means over the batches weighted by their
sizes (dim 0), sum(value_b * n_b) / sum(n_b); top-1 accuracy is then the share of samples right.

Across ranks (`distributed`, default: when a torch.distributed process group is initialised) the
model trains under DistributedDataParallel, each rank on its own loader (a DistributedSampler's
share of the data: then one step averages the gradients of the global batch, the ranks' batches
together), and ends with rank 0's parameters and buffers on every rank
(egp_fx.distributed.training); the history and the figures of evaluate() are over all ranks.
A sampler with set_epoch (DistributedSampler) is moved on by one epoch after every epoch, so each
epoch, in every round, draws a new order.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from egp_fx import distributed as ranks
from egp_fx.distributed import training as across
from egp_fx.errors import PruneError
from egp_fx.ir.batches import batch_label

from .losses import CrossEntropy, TopOne, model_inputs

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


@dataclass(frozen=True)
class Objective:
    """What fine-tuning minimises and reports, and how it steps (see the module docstring)."""

    loss_fn: Callable
    metric_fn: Callable | None
    optimizer: Callable | None = None
    scheduler: Callable | None = None

    @property
    def default_metric(self) -> bool:
        return isinstance(self.metric_fn, TopOne)


def objective(config: FinetuneConfig, loss_fn: Callable | None = None,
              metric_fn: Callable | None = None, optimizer: Callable | None = None,
              scheduler: Callable | None = None) -> Objective:
    """The Objective of these choices: with no loss_fn, cross-entropy and (no metric_fn) top-1
    accuracy on `config.label_key`; with a loss_fn and no metric_fn, no metric."""
    if loss_fn is None:
        loss_fn = CrossEntropy(config.label_key)
        metric_fn = metric_fn if metric_fn is not None else TopOne(config.label_key)
    return Objective(loss_fn, metric_fn, optimizer, scheduler)


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(model.parameters(), torch.empty(0)).device


def _next_epoch(loader: Iterable) -> None:
    """Move a DistributedSampler (anything with set_epoch and epoch) on by one epoch."""
    for holder in (loader, getattr(loader, "loader", None)):
        for sampler in (getattr(holder, "sampler", None),
                        getattr(getattr(holder, "batch_sampler", None), "sampler", None)):
            if hasattr(sampler, "set_epoch") and isinstance(getattr(sampler, "epoch", None), int):
                sampler.set_epoch(sampler.epoch + 1)
                return


def _optimizer(model: nn.Module, config: FinetuneConfig, goal: Objective):
    if goal.optimizer is not None:
        opt = goal.optimizer(model.parameters())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    sched = goal.scheduler(opt) if goal.scheduler is not None else \
        torch.optim.lr_scheduler.MultiStepLR(opt, config.milestone_epochs(), config.gamma)
    return opt, sched


def _forward(net: nn.Module, batch, goal: Objective, config: FinetuneConfig, index: int,
             device: torch.device, what: str):
    """(output, batch size) of one batch, after checking that it has the labels it needs."""
    for fn in (goal.loss_fn, goal.metric_fn):
        if getattr(fn, "needs_labels", False) and \
                batch_label(batch, getattr(fn, "label_key", None)) is None:
            raise PruneError(f"batch {index} of the {what} loader has no labels: yield (input, "
                             "label) pairs or dicts with a label key (label_key=)")
    call = model_inputs(goal.loss_fn, batch, config.input_key).to(device)
    return call(net), call.size


def _on_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _on_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_on_device(v, device) for v in batch)
    return batch


def finetune(model: nn.Module, loader: Iterable, config: FinetuneConfig, *,
             loss_fn: Callable | None = None, metric_fn: Callable | None = None,
             optimizer: Callable | None = None, scheduler: Callable | None = None,
             progress: bool = True, desc: str = "finetune", distributed: bool | None = None
             ) -> list[dict]:
    """Train `model` in place; returns per-epoch {"epoch", "loss", "lr"} and, with the default
    loss and metric, "accuracy" (top-1 on the training batches)."""
    goal = objective(config, loss_fn, metric_fn, optimizer, scheduler)
    device = model_device(model, config.device)
    model.to(device).train()
    spread = ranks.enabled(distributed)
    net = across.wrap(model, device, desc) if spread else model
    join = spread and across.uneven(loader, config.max_batches, desc)
    opt, sched = _optimizer(model, config, goal)
    history = []
    bar = tqdm(range(config.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        loss_sum, right, seen = 0.0, 0.0, 0
        lr = opt.param_groups[0]["lr"]
        with across.epoch(net, f"{desc}: epoch {epoch + 1}", join) if spread \
                else contextlib.nullcontext():
            for i, batch in enumerate(loader):
                if config.max_batches is not None and i >= config.max_batches:
                    break
                batch = _on_device(batch, device)
                output, n = _forward(net, batch, goal, config, i, device, "training")
                loss = goal.loss_fn(output, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * n
                if goal.default_metric:
                    right += goal.metric_fn(_detached(output), batch) * n
                seen += n
        if spread:
            loss_sum, right, seen = across.sum_over_ranks([loss_sum, right, seen],
                                                          f"{desc}: epoch {epoch + 1} history")
        if seen == 0:
            raise PruneError("the training loader yielded no batches")
        sched.step()
        _next_epoch(loader)
        entry = {"epoch": epoch + 1, "loss": loss_sum / seen, "lr": lr}
        if goal.default_metric:
            entry["accuracy"] = right / seen
        history.append(entry)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    if spread:
        across.sync_state(model, f"{desc}: end")
    log.debug("%s: %s", desc, history[-1] if history else "no epochs")
    return history


def _detached(output):
    return output.detach() if isinstance(output, torch.Tensor) else output


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, config: FinetuneConfig | None = None, *,
             loss_fn: Callable | None = None, metric_fn: Callable | None = None,
             distributed: bool | None = None) -> dict[str, float | None]:
    """{"loss", "metric"} of `model` (eval mode) over `loader` (weighted means, see the module
    docstring; across ranks, over every rank's loader together); the model's mode is restored.
    "metric" is None when there is none (a loss_fn without a metric_fn)."""
    config = config or FinetuneConfig()
    goal = objective(config, loss_fn, metric_fn)
    device = model_device(model, config.device)
    was_training = model.training
    model.to(device).eval()
    spread = ranks.enabled(distributed)
    loss_sum = metric_sum = 0.0
    seen = 0
    try:
        with ranks.together("evaluate", spread):
            for i, batch in enumerate(loader):
                batch = _on_device(batch, device)
                output, n = _forward(model, batch, goal, config, i, device, "validation")
                loss_sum += float(goal.loss_fn(output, batch)) * n
                if goal.metric_fn is not None:
                    metric_sum += float(goal.metric_fn(output, batch)) * n
                seen += n
    finally:
        model.train(was_training)
    if spread:
        loss_sum, metric_sum, seen = across.sum_over_ranks([loss_sum, metric_sum, seen], "evaluate")
    if seen == 0:
        raise PruneError("the evaluation loader yielded no batches")
    return {"loss": loss_sum / seen,
            "metric": metric_sum / seen if goal.metric_fn is not None else None}


def evaluate(model: nn.Module, loader: Iterable, config: FinetuneConfig | None = None, *,
             metric_fn: Callable | None = None, distributed: bool | None = None) -> float:
    """The metric of `model` over `loader` (default: top-1 accuracy); see validate()."""
    config = config or FinetuneConfig()
    metric = metric_fn if metric_fn is not None else TopOne(config.label_key)
    return validate(model, loader, config, loss_fn=_NoLoss(), metric_fn=metric,
                    distributed=distributed)["metric"]


class _NoLoss:
    """A loss of 0 (evaluate() reads the metric only; the batches need no labels for it)."""

    def __call__(self, output, batch) -> float:
        return 0.0
