"""egp_fx: make trained networks shallower and faster by deleting dead units and folding linear ones."""
from .calibrate import calibrate
from .errors import CalibrationError, CompressError, EGPError, TraceError
from .stats import ActivationStats
from .table import LayerTable, layer_stats
from .tracing import register_leaf_module, register_wrapped_function, trace

__all__ = [
    "ActivationStats", "CalibrationError", "CompressError", "EGPError", "LayerTable", "TraceError",
    "calibrate", "layer_stats", "register_leaf_module", "register_wrapped_function", "trace",
]
