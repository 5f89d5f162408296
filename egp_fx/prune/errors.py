"""The error the prune package raises on purpose."""
from ..errors import EGPError


class PruneError(EGPError):
    """prune() cannot run as asked: the message says what is missing (labels, prunable layers, ...)."""
