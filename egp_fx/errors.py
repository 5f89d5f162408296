"""Exceptions raised by egp_fx. Each names what failed and what the user can do about it."""


class EGPError(Exception):
    """Base class of every error egp_fx raises on purpose."""


class TraceError(EGPError):
    """torch.fx could not trace the model; the message names the module and the reason."""


class CalibrationError(EGPError):
    """The calibration data or the model rejected calibration; the message says which batch/node."""


class CompressError(EGPError):
    """compress() was asked for something it cannot do (the message says what)."""
