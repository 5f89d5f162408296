"""egp_fx: make trained networks shallower and faster by deleting dead units and folding linear ones."""
from egp_fx.bench import BenchResult, BenchRow, benchmark
from egp_fx.calibrate import ActivationStats, LayerTable, calibrate, layer_stats
from egp_fx.capture import (
                     CaptureInfo,
                     capture_info,
                     register_leaf_module,
                     register_wrapped_function,
                     trace,
)
from egp_fx.deploy.into_model import into_model
from egp_fx.deploy.onnx import ExportResult, export_onnx
from egp_fx.deploy.saving import Loaded, Saved, load, save
from egp_fx.errors import (
                     CalibrationError,
                     CompressError,
                     DistributedError,
                     EGPError,
                     ExportError,
                     MemoryBudgetError,
                     PruneError,
                     SaveError,
                     TraceError,
)
from egp_fx.inspect import Inspection, inspect
from egp_fx.pipeline.compress import compress
from egp_fx.pipeline.measures import Totals, measure
from egp_fx.pipeline.report import CompressReport, report_of
from egp_fx.pruning import EGPPruner, prune

__all__ = [
    "ActivationStats", "BenchResult", "BenchRow", "CalibrationError", "CaptureInfo",
    "CompressError", "CompressReport", "DistributedError", "EGPError", "EGPPruner", "ExportError",
    "ExportResult", "Inspection", "LayerTable", "Loaded", "MemoryBudgetError", "PruneError",
    "Saved", "SaveError", "Totals", "TraceError", "benchmark", "calibrate", "capture_info",
    "compress", "export_onnx", "inspect", "into_model", "layer_stats", "load", "measure", "prune",
    "register_leaf_module", "register_wrapped_function", "report_of", "save", "trace",
]
