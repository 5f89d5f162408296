"""Calibration: per-call activation statistics (stats), the layer table (table), across ranks
(ranks); calibrate() runs data through a captured model (calibration)."""
from .calibration import calibrate, warn_unanalysed
from .stats import EGP_META_KEY, ActivationStats
from .table import LayerTable, layer_stats

__all__ = ["EGP_META_KEY", "ActivationStats", "LayerTable", "calibrate", "layer_stats",
           "warn_unanalysed"]
