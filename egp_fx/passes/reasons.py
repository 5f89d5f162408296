"""Why a rewrite was refused, rolled back or decided: a code and its facts, rendered in one place.

A check that fails gives a `Why(code, details)`: `code` is a member of `Reason`, `details` the
facts it is about (node names, counts, ratios). Text is made from them here only, by the format
string MESSAGES[code] filled from the details, as clang renders a diagnostic from its ID and its
arguments. Tests and tools read the code and the facts; people read the text (report, table,
HTML). A detail that is itself a Why or a Reason renders as its text; `times` (width -> seconds)
as "8: 0.12 ms, 16: 0.15 ms"; `sides` (where -> Why) as "producer: ...; consumer: ...".

A new check is one member here and one line in MESSAGES (test_passes checks that each has one).
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Reason(str, enum.Enum):
    """What a refusal, a verdict or a decision is about. The value is the code in JSON."""

    # fold_bn
    BN_INPUT_NOT_LAYER = "bn_input_not_layer"
    BN_LINEAR_NOT_2D = "bn_linear_not_2d"
    BN_LAYER_USERS = "bn_layer_users"
    BN_LAYER_SHARED = "bn_layer_shared"
    BN_MODULE_SHARED = "bn_module_shared"
    # constants: what made a seed constant, and why it stays
    ALL_DEAD = "all_dead"
    ALL_CONSTANT = "all_constant"
    ZERO_WEIGHTS = "zero_weights"
    CONSTANT_NEEDS_BATCH = "constant_needs_batch"
    # dead_channels, and the walk along the channels (channel_walk.py)
    DC_NO_PRODUCER = "dc_no_producer"
    DC_PRODUCER_SHARED = "dc_producer_shared"
    DC_PRODUCER_GROUPED = "dc_producer_grouped"
    DC_READ_AS_WEIGHT = "dc_read_as_weight"
    DC_OTHER_AXIS = "dc_other_axis"
    DC_NO_SHAPE = "dc_no_shape"
    DC_RESHAPE = "dc_reshape"
    DC_CAT_AXIS = "dc_cat_axis"
    DC_UNKNOWN_GATE = "dc_unknown_gate"
    DC_FEEDS = "dc_feeds"
    DC_READ_TWICE = "dc_read_twice"
    DC_READER_SHARED = "dc_reader_shared"
    DC_READER_GROUPED = "dc_reader_grouped"
    DC_ALL_SLOWER = "dc_all_slower"
    DC_ABOVE_MULTIPLE = "dc_above_multiple"
    DC_KEPT_FOR_MULTIPLE = "dc_kept_for_multiple"
    DC_KEPT_FOR_SPEED = "dc_kept_for_speed"
    # linear_units
    LU_PARTLY_LINEAR = "lu_partly_linear"
    # fold_linear's rules: chain (pass_name fold_linear), residual, affine
    CHAIN_GROUPED = "chain_grouped"
    CHAIN_SAME_PADDING = "chain_same_padding"
    CHAIN_STRIDED = "chain_strided"
    CHAIN_PADDING_MODES = "chain_padding_modes"
    CHAIN_APPROXIMATE = "chain_approximate"
    CHAIN_NO_SHAPES = "chain_no_shapes"
    CHAIN_SLOWER = "chain_slower"
    CHAIN_MORE_FLOPS = "chain_more_flops"
    CHAIN_USERS = "chain_users"
    CHAIN_SHARED = "chain_shared"
    CHAIN_DTYPE_DEVICE = "chain_dtype_device"
    CHAIN_NOT_2D = "chain_not_2d"
    CHAIN_RESHAPES = "chain_reshapes"
    BIAS_AT_BORDER = "bias_at_border"                  # why a merge is approximate
    PADDED_BORDER = "padded_border"
    RES_USERS = "res_users"
    RES_SHARED = "res_shared"
    RES_SHAPES = "res_shapes"
    RES_DTYPE = "res_dtype"
    RES_LINEAR_NOT_SQUARE = "res_linear_not_square"
    RES_NOT_SQUARE = "res_not_square"
    RES_PADDING = "res_padding"
    AFFINE_NOT_FOLDED = "affine_not_folded"            # details: sides, each a Why below
    AFFINE_SHAPE_OR_DTYPE = "affine_shape_or_dtype"
    AFFINE_NOT_PER_CHANNEL = "affine_not_per_channel"
    AFFINE_USERS = "affine_users"
    AFFINE_SHARED = "affine_shared"
    AFFINE_APPROXIMATE = "affine_approximate"
    # verification (the Verdict) and the rewrite loop
    OUTPUT_RAISES = "output_raises"
    OUTPUT_INVALID = "output_invalid"
    BEYOND_TOLERANCE = "beyond_tolerance"
    WITHIN_TOLERANCE = "within_tolerance"
    ROLLED_BACK = "rolled_back"
    PASS_FAILED = "pass_failed"
    # decisions
    CONSTANT_OUTPUT = "constant_output"
    NONNEGATIVE_INPUT = "nonnegative_input"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


MESSAGES: dict[Reason, str] = {
    Reason.BN_INPUT_NOT_LAYER: "BatchNorm not folded: input is not a conv/linear",
    Reason.BN_LINEAR_NOT_2D: "BatchNorm not folded: BatchNorm after Linear on non-2-D input",
    Reason.BN_LAYER_USERS: "BatchNorm not folded: {layer} has {users} users",
    Reason.BN_LAYER_SHARED: "BatchNorm not folded: {sharing}",
    Reason.BN_MODULE_SHARED: "BatchNorm not folded: BatchNorm module shared by several calls",
    Reason.ALL_DEAD: "all channels dead",
    Reason.ALL_CONSTANT: "all channels constant",
    Reason.ZERO_WEIGHTS: "all weights zero (collapsed layer)",
    Reason.CONSTANT_NEEDS_BATCH: "{seed}, but constant would reach {node} ({op} {target}), "
                                 "which needs the batch",
    Reason.DC_NO_PRODUCER: "dead channels kept: the pre-activation is not written by a "
                           "conv/linear alone",
    Reason.DC_PRODUCER_SHARED: "dead channels kept: {layer} has other users or is shared",
    Reason.DC_PRODUCER_GROUPED: "dead channels kept: {layer} is a grouped conv (its inputs would "
                                "need narrowing too)",
    Reason.DC_READ_AS_WEIGHT: "dead channels kept: {node} takes the tensor as a weight, not as "
                              "its input",
    Reason.DC_OTHER_AXIS: "dead channels kept: {node} reads another axis than the channels",
    Reason.DC_NO_SHAPE: "dead channels kept: cannot follow the channels through {node} (no shape)",
    Reason.DC_RESHAPE: "dead channels kept: cannot follow the channels through {node}",
    Reason.DC_CAT_AXIS: "dead channels kept: concatenated along another axis at {node}",
    Reason.DC_UNKNOWN_GATE: "dead channels kept: multiplied at {node} by a tensor no layer of its "
                            "own writes",
    Reason.DC_FEEDS: "dead channels kept: feeds {node} ({op} {target})",
    Reason.DC_READ_TWICE: "dead channels kept: a layer reads the channels twice",
    Reason.DC_READER_SHARED: "dead channels kept: reader {layer}: {sharing}",
    Reason.DC_READER_GROUPED: "dead channels kept: grouped reader {layer} cannot be narrowed "
                              "consistently",
    Reason.DC_ALL_SLOWER: "dead channels kept: every narrower width measures slower on the target "
                          "({times})",
    Reason.DC_ABOVE_MULTIPLE: "dead channels kept: removing {removable} would not shrink the width "
                              "below the next multiple of {multiple}",
    Reason.DC_KEPT_FOR_MULTIPLE: "{kept} of {removable} removable channel(s) kept so that the "
                                 "width is a multiple of {multiple}",
    Reason.DC_KEPT_FOR_SPEED: "{kept} of {removable} removable channel(s) kept so that the width "
                              "is the fastest width measured ({times})",
    Reason.LU_PARTLY_LINEAR: "nonlinearity kept: only {linear} of {channels} channels are linear",
    Reason.CHAIN_GROUPED: "not folded: {what}: grouped conv (groups {groups1} and {groups2})",
    Reason.CHAIN_SAME_PADDING: "not folded: {what}: asymmetric 'same' padding",
    Reason.CHAIN_STRIDED: "not folded: {what}: first conv strided or a conv dilated",
    Reason.CHAIN_PADDING_MODES: "not folded: {what}: padding modes {mode1}/{mode2}",
    Reason.CHAIN_APPROXIMATE: "not folded: {what}: {inexact} (approximate; allow_approximate is "
                              "off)",
    Reason.CHAIN_NO_SHAPES: "not folded: {what}: no shapes",
    Reason.CHAIN_SLOWER: "not folded: {what} slower ({ratio:.2f}x measured latency)",
    Reason.CHAIN_MORE_FLOPS: "not folded: {what} raises FLOPs {ratio:.2f}x",
    Reason.CHAIN_USERS: "not folded: output of {node} has {users} users",
    Reason.CHAIN_SHARED: "not folded: {sharing}",
    Reason.CHAIN_DTYPE_DEVICE: "not folded: dtype/device differ ({dtype1}, {dtype2})",
    Reason.CHAIN_NOT_2D: "not folded: only 2-D convolutions are merged",
    Reason.CHAIN_RESHAPES: "not folded: the reshapes between the layers change the leading dims",
    Reason.BIAS_AT_BORDER: "first bias nonzero: padded border sees b1",
    Reason.PADDED_BORDER: "wrong on the zero-padded border of the second conv",
    Reason.RES_USERS: "residual not folded: output of {node} has {users} users",
    Reason.RES_SHARED: "residual not folded: {sharing}",
    Reason.RES_SHAPES: "residual not folded: shapes differ: {shapes}",
    Reason.RES_DTYPE: "residual not folded: dtype of {node} differs from the weights",
    Reason.RES_LINEAR_NOT_SQUARE: "residual not folded: linear is not square",
    Reason.RES_NOT_SQUARE: "residual not folded: not stride 1 with as many output as input "
                           "channels",
    Reason.RES_PADDING: "residual not folded: padding {padding} does not keep the size",
    Reason.AFFINE_NOT_FOLDED: "constant not folded: {sides}",
    Reason.AFFINE_SHAPE_OR_DTYPE: "constant changes the shape or dtype",
    Reason.AFFINE_NOT_PER_CHANNEL: "constant of shape {shape} is not per channel",
    Reason.AFFINE_USERS: "output of {node} has {users} users",
    Reason.AFFINE_SHARED: "{sharing}",
    Reason.AFFINE_APPROXIMATE: "shift into a zero-padded conv is approximate at the border "
                               "(allow_approximate is off)",
    Reason.OUTPUT_RAISES: "output {failure}",
    Reason.OUTPUT_INVALID: "output {failure}",
    Reason.BEYOND_TOLERANCE: "output error {error:.3g} beyond tolerance {bound:.3g}",
    Reason.WITHIN_TOLERANCE: "output error {error:.3g} within tolerance {bound:.3g}",
    Reason.ROLLED_BACK: "rolled back: {verdict}",
    Reason.PASS_FAILED: "pass failed: {error}",
    Reason.CONSTANT_OUTPUT: "constant output",
    Reason.NONNEGATIVE_INPUT: "input is non-negative",
}


@dataclass(frozen=True, eq=True)
class Why:
    """A reason and the facts behind it; str() renders it."""

    code: Reason
    details: Mapping[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        return render(self.code, self.details)


def render(code: Reason, details: Mapping[str, object] | None = None) -> str:
    """The text of `code` with its details: the one place a reason becomes prose."""
    return MESSAGES[code].format_map({k: _text(k, v) for k, v in (details or {}).items()})


def _text(key: str, value: object) -> object:
    if isinstance(value, Why):
        return str(value)
    if isinstance(value, Reason):
        return MESSAGES[value]
    if key == "times":
        return ", ".join(f"{w}: {t * 1e3:.3g} ms" for w, t in sorted(value.items()))
    if key == "sides":
        return "; ".join(f"{side}: {why}" for side, why in value.items())
    return value
