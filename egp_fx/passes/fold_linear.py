"""fold_linear: fold linear neighbours, to a fixpoint.

Sweeps every registered folding rule (fold_common.fold_rule), in order, until a sweep changes
nothing, since each can enable the others: constant per-channel scales and shifts into a
neighbouring layer (fold_affine.py), residual adds x + L(x) into L (fold_residual.py), and two
adjacent weighted layers into one (fold_chain.py). A transformer MLP whose hidden units are all
linear becomes one d x d Linear; a ResNet block whose ReLU was linearised becomes one conv.
"""
from __future__ import annotations

import torch.fx as fx

from . import register
from .base import PassContext, PassRun
from .fold_common import fold_to_fixpoint, rules_in_order


@register("fold_linear", positions=(50,), shapes=True)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    yield from fold_to_fixpoint(gm, ctx, rules_in_order())
