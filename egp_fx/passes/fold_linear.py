"""fold_linear: fold linear neighbours, to a fixpoint.

Sweeps the folding rules (fold/, in the order of FOLD_RULES) until a sweep changes nothing, since
each can enable the others: constant per-channel scales and shifts into a neighbouring layer
(fold/affine.py), residual adds x + L(x) into L (fold/residual.py), and two adjacent weighted
layers into one (fold/chain.py). A transformer MLP whose hidden units are all linear becomes one
d x d Linear; a ResNet block whose ReLU was linearised becomes one conv. Options: FoldOptions
(fold/common.py).
"""
from __future__ import annotations

import torch.fx as fx

from .base import PassContext, PassRun
from .fold import FOLD_RULES, FoldOptions, fold_to_fixpoint
from .registry import register

NAME = "fold_linear"


@register(NAME, shapes=True, options=FoldOptions)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    yield from fold_to_fixpoint(gm, ctx, FOLD_RULES)
