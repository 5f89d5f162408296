"""The egp-fx command line: parser and entry point (app), subcommands (commands), calibration
data (data), model loading (models), the demo (demo)."""
from .app import main

__all__ = ["main"]
