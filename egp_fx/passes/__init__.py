"""The rewrite passes, in pipeline order. Each module has one `run(gm, ctx) -> PassOutcome`."""
from . import cleanup, constants, dead_channels, fold_bn, linear_units

PASSES = {
    "cleanup": cleanup.run,
    "fold_bn": fold_bn.run,
    "constants": constants.run,
    "dead_channels": dead_channels.run,
    "linear_units": linear_units.run,
}

try:  # folding of linear neighbours lives in its own module
    from . import fold_linear
    PASSES["fold_linear"] = fold_linear.run
except ImportError:  # pragma: no cover - only while the module is absent
    pass
