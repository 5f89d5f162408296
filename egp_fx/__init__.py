"""egp_fx: make trained networks shallower and faster by deleting dead units and folding linear ones."""
from .bench import BenchResult, BenchRow, benchmark
from .calibrate import calibrate
from .compress import compress
from .inspect import Inspection, inspect
from .errors import CalibrationError, CompressError, EGPError, TraceError
from .export import ExportError, ExportResult, export_onnx
from .stats import ActivationStats
from .measures import Totals, measure
from .report import CompressReport, report_of
from .table import LayerTable, layer_stats
from .tracing import register_leaf_module, register_wrapped_function, trace

__all__ = [
    "ActivationStats", "BenchResult", "BenchRow", "CalibrationError", "CompressError", "CompressReport", "EGPError",
    "ExportError", "ExportResult",
    "Inspection", "LayerTable", "Totals", "TraceError", "benchmark", "calibrate", "compress", "export_onnx", "inspect", "layer_stats", "measure",
    "register_leaf_module", "register_wrapped_function", "report_of", "trace",
]
