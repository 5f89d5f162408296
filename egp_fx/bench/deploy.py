"""A model as a user would deploy it with torch: a copy in eval mode, BatchNorm folded.

Any deployment folds an eval-mode BatchNorm into the convolution or Linear before it
(W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta). Timing a
model with its BatchNorm unfolded against a compressed one (compress folds it) would credit
compress with that folding. `deployable` folds it with torch.fx.experimental.optimization.fuse
on a copy; when plain torch.fx cannot trace the model, egp_fx's tracer (with its leaf registry)
is tried; when neither can, the copy is used as it is and the description says why.
"""
from __future__ import annotations

import copy
import logging

import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)

FOLDED = "BatchNorm folded (torch.fx fuse)"
NO_BATCHNORM = "as given (no BatchNorm)"


def _batchnorm_calls(gm: fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(modules.get(n.target), nn.modules.batchnorm._BatchNorm))


def deployable(model: nn.Module, fold_batchnorm: bool = True) -> tuple[nn.Module, str]:
    """(a copy of `model` in eval mode with its BatchNorm folded, how it was prepared).

    The model itself is not changed. Without BatchNorm modules, or with fold_batchnorm=False,
    the copy is returned as it is."""
    module = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module, NO_BATCHNORM
    if not fold_batchnorm:
        return module, "as given (BatchNorm not folded: fold_batchnorm=False)"
    try:
        fused = fuse(module)
    except Exception as plain_err:  # noqa: BLE001  (fx raises many types)
        from egp_fx.capture.fx_trace import fx_capture

        try:
            fused = fuse(fx_capture(copy.deepcopy(module)), inplace=True, no_trace=True)
        except Exception as err:  # noqa: BLE001
            log.warning("BatchNorm left unfolded: torch.fx cannot trace %s (%s)",
                        type(model).__name__, err)
            return module, (f"as given (BatchNorm not folded: torch.fx cannot trace it: "
                            f"{type(plain_err).__name__})")
    left = _batchnorm_calls(fused)
    if left:
        return fused, f"{FOLDED}; {left} BatchNorm calls not after a conv/Linear stay"
    return fused, FOLDED
