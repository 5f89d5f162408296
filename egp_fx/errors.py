"""Every error egp_fx raises on purpose, and the command line's exit code for each.

Each names what failed and what the user can do about it. The CLI maps an error to its exit code
by type (EXIT_CODE_OF), most specific class first.
"""
from __future__ import annotations


class EGPError(Exception):
    """Base class of every error egp_fx raises on purpose."""


class UsageError(EGPError):
    """Bad arguments or input (a wrong option, a missing feature of this install)."""


class DataError(UsageError):
    """Calibration or training data could not be read as asked."""


class ModelLoadError(EGPError):
    """The model could not be built or its weights loaded (name, factory, checkpoint)."""


class TraceError(EGPError):
    """Neither torch.fx nor torch.export could capture the model; the message says why."""


class CalibrationError(EGPError):
    """The calibration data or the model rejected calibration; the message says which batch/node."""


class CompressError(EGPError):
    """compress() was asked for something it cannot do (the message says what)."""


class MemoryBudgetError(CompressError):
    """The model would not fit in memory for compress; the message gives the estimate."""


class PruneError(EGPError):
    """prune() was asked for something it cannot do."""


class DistributedError(EGPError):
    """A torch.distributed step failed (another rank, the backend, a timeout)."""


class ExportError(EGPError):
    """ONNX export failed or the exported file does not reproduce the model; no file is left."""


class ParityError(ExportError):
    """onnxruntime and torch disagree on an exported file beyond the tolerance."""


class SaveError(EGPError):
    """A compressed model could not be saved or loaded."""


class BenchError(EGPError):
    """The benchmark could not run as asked."""


class CLIError(EGPError):
    """An error the command line reports with the exit code it carries."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_MODEL, EXIT_COMPRESS, EXIT_EXPORT, EXIT_BENCH = range(7)
EXIT_INTERRUPTED = 130
EXIT_CODES = {EXIT_OK: "success", EXIT_INTERNAL: "internal error", EXIT_USAGE: "usage or bad input",
              EXIT_MODEL: "model could not be loaded",
              EXIT_COMPRESS: "calibration, compression or pruning failed",
              EXIT_EXPORT: "ONNX export or saving failed", EXIT_BENCH: "benchmark failed",
              EXIT_INTERRUPTED: "interrupted"}
EXIT_CODE_OF: tuple[tuple[type, int], ...] = (
    (UsageError, EXIT_USAGE), (ModelLoadError, EXIT_MODEL), (ExportError, EXIT_EXPORT),
    (SaveError, EXIT_EXPORT), (BenchError, EXIT_BENCH), (TraceError, EXIT_COMPRESS),
    (CalibrationError, EXIT_COMPRESS), (CompressError, EXIT_COMPRESS), (PruneError, EXIT_COMPRESS),
    (DistributedError, EXIT_COMPRESS), (EGPError, EXIT_COMPRESS),
)


def exit_code(err: BaseException) -> int:
    """The CLI exit code of an error: that of the first error raised on purpose in it or its
    causes (EXIT_INTERNAL when there is none)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, CLIError):
            return seen.code
        for cls, code in EXIT_CODE_OF:
            if isinstance(seen, cls):
                return code
        seen = seen.__cause__ or seen.__context__
    return EXIT_INTERNAL
