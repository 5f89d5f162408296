"""Calibration batches: take the input out of whatever a loader yields, and check it."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from .errors import CalibrationError


def batch_input(batch, input_key: str | None = None) -> torch.Tensor:
    """The model input of one batch: a tensor, the first item of a tuple/list, or dict[input_key]."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if input_key is None:
            raise CalibrationError(
                f"the loader yields dicts (keys {sorted(batch)}): pass input_key= to say which holds the input")
        if input_key not in batch:
            raise CalibrationError(f"input_key {input_key!r} is not in the batch (keys {sorted(batch)})")
        return batch_input(batch[input_key])
    if isinstance(batch, (tuple, list)) and batch:
        return batch_input(batch[0], input_key)
    raise CalibrationError(
        f"cannot find a tensor in a batch of type {type(batch).__name__}: yield tensors, "
        "(input, ...) tuples or dicts")


def batch_label(batch, label_key: str | None = None) -> torch.Tensor | None:
    """The labels of one batch when it has them: the second tuple item or dict[label_key]."""
    if isinstance(batch, Mapping):
        return batch.get(label_key or "label")
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def check_finite(x: torch.Tensor, index: int) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise CalibrationError(f"batch {index} holds {bad} NaN/Inf values: clean the calibration data")


def iter_inputs(loader: Iterable, *, max_batches: int | None = None, input_key: str | None = None,
                device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Yield checked input tensors (moved to `device`); raise CalibrationError on an empty loader."""
    count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch_input(batch, input_key)
        check_finite(x, i)
        count += 1
        yield x.to(device) if device is not None else x
    if count == 0:
        raise CalibrationError("the calibration loader yielded no batches")


def loader_length(loader, max_batches: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return min(n, max_batches) if max_batches is not None else n
