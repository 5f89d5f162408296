"""The rewrite passes, one per file, and the order compress runs them in (DEFAULT_PIPELINE):

    cleanup         eval-mode no-ops out, so that a BatchNorm meets the layer before it
    fold_bn         eval BatchNorm into the conv/linear before it
    constants       dead activations and all-zero layers become constants, propagated
    dead_channels   constant channels leave their producer and every reader
    linear_units    an activation linear on every channel becomes that map
    fold_linear     linear neighbours folded to a fixpoint (the rules in fold/)
    constants       again: the folds leave zero constants and non-negative inputs behind
    cleanup         again: the dead code the rewrites left

A pass may appear more than once; compress(passes=...) takes any sequence of registered names.
The contract is base.py (Candidate, Refusal, Rewrite, PassContext); the registry, the options
and the driver registry.py; the reasons of refusals and decisions, and their text, reasons.py.
Helpers the passes share: util.py, channel_walk.py (dead_channels), constant_values.py
(constants). Adding a pass is one file (registered with `register`) and its name, imported here,
in DEFAULT_PIPELINE.
"""
from __future__ import annotations

from collections.abc import Iterable

from egp_fx.errors import CompressError

from . import cleanup, constants, dead_channels, fold_bn, fold_linear, linear_units
from .registry import (
    PASSES,
    OptionField,
    PassSpec,
    collect_options,
    drive,
    finish,
    option,
    option_fields,
    register,
    run_pass,
)

DEFAULT_PIPELINE: tuple[str, ...] = (
    cleanup.NAME,
    fold_bn.NAME,
    constants.NAME,
    dead_channels.NAME,
    linear_units.NAME,
    fold_linear.NAME,
    constants.NAME,
    cleanup.NAME,
)


def pipeline_of(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """The pipeline `names` (None: DEFAULT_PIPELINE), each a registered pass; CompressError
    names the unknown ones. The one check of a pipeline, for compress and the command line."""
    names = DEFAULT_PIPELINE if names is None else tuple(names)
    unknown = [p for p in names if p not in PASSES]
    if unknown:
        raise CompressError(f"unknown pass(es) {unknown}; available: {sorted(PASSES)}")
    return names


__all__ = ["DEFAULT_PIPELINE", "PASSES", "OptionField", "PassSpec", "collect_options", "drive",
           "finish", "option", "option_fields", "pipeline_of", "register", "run_pass"]
