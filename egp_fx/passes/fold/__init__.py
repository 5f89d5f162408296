"""The folding rules fold_linear sweeps to a fixpoint, in the order they are tried on a node:

    affine      a constant scale or shift into the neighbouring layer
    residual    x + L(x) into L, as L + I
    chain       two adjacent weighted layers into one

Each rule is one file; adding one is that file and its line in FOLD_RULES. common.py holds the
sweep, the fixpoint loop and fold_linear's options (FoldOptions).
"""
from __future__ import annotations

from . import affine, chain, residual
from .common import FoldOptions, Rule, Sweep, fold_to_fixpoint

FOLD_RULES: tuple[Rule, ...] = (
    affine.rule,
    residual.rule,
    chain.rule,
)

__all__ = ["FOLD_RULES", "FoldOptions", "Rule", "Sweep", "fold_to_fixpoint"]
