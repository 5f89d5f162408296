"""egp_fx: make trained networks shallower and faster by deleting dead units and folding linear ones."""
from . import prune  # the EGP package; egp_fx.prune(...) calls egp_fx.prune.egp.prune
from .bench import BenchResult, BenchRow, benchmark
from .calibrate import calibrate
from .capture import CaptureInfo, capture_info
from .compress import compress
from .errors import (CalibrationError, CompressError, DistributedError, EGPError, ExportError,
                     MemoryBudgetError, PruneError, SaveError, TraceError)
from .export import ExportResult, export_onnx
from .inspect import Inspection, inspect
from .into_model import into_model
from .measures import Totals, measure
from .report import CompressReport, report_of
from .saving import Loaded, Saved, load, save
from .stats import ActivationStats
from .table import LayerTable, layer_stats
from .tracing import register_leaf_module, register_wrapped_function, trace

__all__ = [
    "ActivationStats", "BenchResult", "BenchRow", "CalibrationError", "CaptureInfo",
    "CompressError", "CompressReport", "DistributedError", "EGPError", "ExportError",
    "ExportResult", "Inspection", "LayerTable", "Loaded", "MemoryBudgetError", "PruneError",
    "Saved", "SaveError", "Totals", "TraceError", "benchmark", "calibrate", "capture_info",
    "compress", "export_onnx", "inspect", "into_model", "layer_stats", "load", "measure", "prune",
    "register_leaf_module", "register_wrapped_function", "report_of", "save", "trace",
]
