"""Losses and metrics for fine-tuning between pruning rounds: `loss_fn(output, batch) -> loss`,
`metric_fn(output, batch) -> float` (higher is better).

`output` is what the model returned for the batch (a tensor, a tuple whose first item is the
prediction, or an object or dict with `logits`); `batch` is the loader's item as it came.
The built-in ones (the CLI's --loss) read the labels as batch_label() does (the second item of
a tuple, or dict[label_key], "label" by default):

    cross-entropy   F.cross_entropy(logits, y)                      (class indices)
    bce             F.binary_cross_entropy_with_logits(logits, y)   (y as float, logits' shape)
    mse             F.mse_loss(prediction, y)                       (y as float, the prediction's shape)
    lm              the language model's own loss: the model is called with labels
                    (model(**batch, labels=...)), output.loss is the loss. labels are the batch's
                    "labels", else its input_ids (a causal LM shifts them itself); a tensor
                    batch is taken as input_ids.

A loss may say how the model is called for it: `inputs(batch, input_key) -> Batch` (the LM loss
does: labels go into the call). Otherwise the call is the calibration one
(egp_fx.ir.batches.as_batch: labels left out). `needs_labels` tells prune() to check that the
training batches carry labels before it starts.

    top1            mean over the batch of argmax(logits, dim 1) == y   (the default metric:
                    "accuracy")
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from egp_fx.errors import PruneError
from egp_fx.ir.batches import Batch, as_batch, batch_label


def prediction(output) -> torch.Tensor:
    """The prediction tensor of a model's output (see the module docstring)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise PruneError(f"cannot find the prediction in a model output of type "
                     f"{type(output).__name__}: return a tensor, a tuple or an object with "
                     "`logits`, or pass loss_fn=")


class _Labelled:
    """A loss on (prediction, labels); the labels come from batch[label_key]."""

    needs_labels = True
    name = ""

    def __init__(self, label_key: str | None = None):
        self.label_key = label_key

    def labels(self, batch) -> torch.Tensor:
        y = batch_label(batch, self.label_key)
        if y is None:
            raise PruneError(f"the {self.name} loss needs labels: yield (input, label) pairs or "
                             "dicts with a label key (label_key=)")
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(label_key={self.label_key!r})"


class CrossEntropy(_Labelled):
    name = "cross-entropy"

    def __call__(self, output, batch) -> torch.Tensor:
        logits = prediction(output)
        return F.cross_entropy(logits, self.labels(batch).to(logits.device))


def _float_target(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.to(pred.device, pred.dtype)
    return y.view_as(pred) if y.shape != pred.shape and y.numel() == pred.numel() else y


class BCE(_Labelled):
    name = "bce"

    def __call__(self, output, batch) -> torch.Tensor:
        logits = prediction(output)
        return F.binary_cross_entropy_with_logits(logits, _float_target(logits, self.labels(batch)))


class MSE(_Labelled):
    name = "mse"

    def __call__(self, output, batch) -> torch.Tensor:
        pred = prediction(output)
        return F.mse_loss(pred, _float_target(pred, self.labels(batch)))


class LMLoss:
    """A language model's own loss (Hugging Face: output.loss with labels in the call)."""

    needs_labels = False
    name = "lm"

    def inputs(self, batch, input_key: str | None = None) -> Batch:
        if isinstance(batch, torch.Tensor):
            return Batch((), {"input_ids": batch, "labels": batch})
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise PruneError("the lm loss needs token batches: dicts with input_ids (and "
                             "optionally labels, attention_mask) or tensors of token ids")
        kwargs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        kwargs.setdefault("labels", batch["input_ids"])
        return Batch((), kwargs)

    def __call__(self, output, batch) -> torch.Tensor:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise PruneError(f"the model returned no loss ({type(output).__name__} without "
                             "`loss`): the lm loss is a language model's own, computed when "
                             "it is called with labels")
        return loss

    def __repr__(self) -> str:
        return "LMLoss()"


class TopOne(_Labelled):
    """Top-1 accuracy of a batch (the default metric)."""

    name = "top1"

    @torch.no_grad()
    def __call__(self, output, batch) -> float:
        logits = prediction(output)
        y = self.labels(batch).to(logits.device)
        return float((logits.argmax(1) == y).double().mean())


LOSSES = {"cross-entropy": CrossEntropy, "bce": BCE, "mse": MSE, "lm": LMLoss}


def loss_by_name(name: str, label_key: str | None = None):
    """The built-in loss called `name` (see LOSSES)."""
    if name not in LOSSES:
        raise PruneError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LMLoss() if name == "lm" else LOSSES[name](label_key)


def model_inputs(loss_fn, batch, input_key: str | None) -> Batch:
    """The call of the model for `batch` under `loss_fn` (see the module docstring)."""
    inputs = getattr(loss_fn, "inputs", None)
    return inputs(batch, input_key) if callable(inputs) else as_batch(batch, input_key)
