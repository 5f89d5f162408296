"""Calibration batches: what a loader yields, turned into the call of the model, and checked.

A loader may yield
- a tensor: the model is called as model(x);
- a tuple or list: its first item is the input (a tensor, or a tuple of tensors for models with
  several positional inputs), the rest (labels) is ignored;
- a dict of tensors (`input_ids`, `attention_mask`, `pixel_values`, ...): the model is called as
  model(**batch), label entries ("label", "labels") left out; `input_key=` instead selects one
  entry as the single input.
A Batch holds that call: positional tensors and keyword tensors.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from egp_fx.errors import CalibrationError

LABEL_KEYS = ("label", "labels")


@dataclass(frozen=True)
class Batch:
    """One call of a model: model(*args, **kwargs), every argument a tensor."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self, module):
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def map(self, fn) -> Batch:
        """A Batch with fn applied to every tensor."""
        return Batch(tuple(fn(t) for t in self.args), {k: fn(t) for k, t in self.kwargs.items()})

    def to(self, device=None, dtype=None) -> Batch:
        """On `device`; floating tensors also cast to `dtype` when given."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def head(self, n: int) -> Batch:
        """The first n samples (dim 0 of every tensor)."""
        return self.map(lambda t: t[:n] if t.dim() else t)

    def widen(self, n: int = 2) -> Batch:
        """At least n samples: the batch repeated along dim 0 when it has fewer.

        Shape propagation and FLOP counting run on fake tensors, where a batch of one gives some
        views strides a real run never sees (Hugging Face's grouped-query attention); they run
        on two samples instead."""
        if self.size >= n:
            return self
        reps = -(-n // self.size)
        return self.map(lambda t: t.repeat(reps, *([1] * (t.dim() - 1)))[:n] if t.dim() else t)

    @property
    def size(self) -> int:
        """The batch size: dim 0 of the first tensor."""
        first = next((t for t in self.tensors() if t.dim()), None)
        return int(first.shape[0]) if first is not None else 1

    def describe(self) -> str:
        parts = [f"{tuple(t.shape)}" for t in self.args]
        parts += [f"{k}={tuple(t.shape)}" for k, t in self.kwargs.items()]
        return ", ".join(parts)


def as_batch(item, input_key: str | None = None) -> Batch:
    """The Batch of one loader item (see the module docstring)."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,))
    if isinstance(item, Mapping):
        if input_key is not None:
            if input_key not in item:
                raise CalibrationError(f"input_key {input_key!r} is not in the batch (keys {sorted(item)})")
            return as_batch(item[input_key])
        kwargs = {k: v for k, v in item.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
        if not kwargs:
            raise CalibrationError(f"the batch dict (keys {sorted(item)}) holds no input tensor")
        return Batch((), kwargs)
    if isinstance(item, (tuple, list)) and item:
        first = item[0]
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, torch.Tensor) for t in first):
            return Batch(tuple(first))
        return as_batch(first, input_key)
    raise CalibrationError(
        f"cannot find a tensor in a batch of type {type(item).__name__}: yield tensors, "
        "(input, ...) tuples or dicts of tensors")


def batch_input(batch, input_key: str | None = None) -> torch.Tensor:
    """The single input tensor of one loader item (models called with one tensor)."""
    b = as_batch(batch, input_key)
    tensors = b.tensors()
    if len(tensors) != 1:
        raise CalibrationError(f"the batch holds {len(tensors)} inputs ({b.describe()}); "
                               "pass input_key= to say which one is the input")
    return tensors[0]


def batch_label(batch, label_key: str | None = None) -> torch.Tensor | None:
    """The labels of one batch when it has them: the second tuple item or dict[label_key]."""
    if isinstance(batch, Mapping):
        return batch.get(label_key or "label")
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def check_finite(batch: Batch, index: int) -> None:
    bad = sum(int((~torch.isfinite(t)).sum()) for t in batch.tensors() if t.is_floating_point())
    if bad:
        raise CalibrationError(f"batch {index} holds {bad} NaN/Inf values: clean the calibration data")


def iter_batches(loader: Iterable, *, max_batches: int | None = None, input_key: str | None = None,
                 device: torch.device | str | None = None, allow_empty: bool = False
                 ) -> Iterator[Batch]:
    """Yield checked Batches (moved to `device`); raise CalibrationError on an empty loader
    unless `allow_empty` (a rank's shard may be empty: the ranks decide together)."""
    count = 0
    for i, item in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = as_batch(item, input_key)
        check_finite(batch, i)
        count += 1
        yield batch.to(device) if device is not None else batch
    if count == 0 and not allow_empty:
        raise CalibrationError("the calibration loader yielded no batches")


def loader_length(loader, max_batches: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return min(n, max_batches) if max_batches is not None else n
