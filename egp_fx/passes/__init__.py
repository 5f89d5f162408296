"""The rewrite passes, in pipeline order. Each module has one `run(gm, ctx) -> PassOutcome`.

fold_linear.run also sweeps the rules of fold_affine (constant scale/shift into a neighbour) and
fold_residual (x + L(x) into L), which share its helpers in fold_common.
"""
from . import cleanup, constants, dead_channels, fold_bn, fold_linear, linear_units

PASSES = {
    "cleanup": cleanup.run,
    "fold_bn": fold_bn.run,
    "constants": constants.run,
    "dead_channels": dead_channels.run,
    "linear_units": linear_units.run,
    "fold_linear": fold_linear.run,
}
