"""trace(model): the public face of capture (egp_fx.capture), for one model and one example."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .capture import capture as _capture
from .capture import LEAF_MODULES, register_leaf_module, register_wrapped_function
from .data import as_batch

__all__ = ["LEAF_MODULES", "register_leaf_module", "register_wrapped_function", "trace"]


def trace(model: nn.Module, example=None, *, capture: str = "auto",
          leaf_modules: dict[type, str] | None = None) -> fx.GraphModule:
    """Capture a copy of `model` in eval mode as a GraphModule; the model is never touched.

    `example` (a tensor, tuple or dict batch, as a calibration loader yields) lets the capture
    be checked against the model, and is required for torch.export. `capture` is "auto"
    (torch.fx, then torch.export), "fx" or "export". `leaf_modules` adds {type: reason} entries
    for this call on top of the registry.
    """
    batch = as_batch(example) if example is not None else None
    return _capture(model, batch, mode=capture, leaf_modules=leaf_modules)
