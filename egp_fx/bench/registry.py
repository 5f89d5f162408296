"""Benchmark backends: one class per backend, registered by name.

A backend turns a model into something it can call and says how one call is made:

    available()                  None, or why it cannot run here (its cells are then skipped)
    variants()                   the variants it runs ("opt-all" for ONNX Runtime; "fp16",
                                 "fp16+compile", ... for torch)
    variant_unavailable(variant) None, or why that variant cannot run here
    prepare(name, model, variant) -> Prepared
                                 once per model and variant: an ONNX Runtime session, a module
                                 copied, BatchNorm-folded, cast and compiled, ...; raises Skip
                                 for a model it cannot take
    runner(prepared, batch)      a zero-argument callable making ONE synchronous call on that
                                 batch; this is what timing.measure_cell times
    timing()                     a context held while a cell is timed (thread settings)
    check(settings)              (classmethod) reject settings it does not understand

Adding a backend is one class in one place (here, next to the others, or in user code):

    @register_backend
    class MyBackend(Backend):
        name = "my-backend"
        def variants(self): return ("default",)
        def prepare(self, name, model, variant): return Prepared(model, "as given")
        def runner(self, prepared, batch): return lambda: batch(prepared.handle)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Union

from torch import nn

from egp_fx.ir.batches import Batch

ModelLike = Union[nn.Module, str, os.PathLike]

BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make `cls` available to benchmark(backends=...) under cls.name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    BACKENDS[cls.name] = cls
    return cls


class Skip(Exception):
    """A model (or a variant) a backend cannot run; the reason is recorded, the run goes on."""

    def __init__(self, reason: str, variant: str | None = None):
        super().__init__(reason)
        self.reason, self.variant = reason, variant


@dataclass
class Prepared:
    handle: object          # what runner() needs: a module, an ONNX Runtime session, ...
    description: str        # how the model was prepared, reported with its rows


@dataclass(frozen=True)
class Settings:
    """The options of one benchmark call (see benchmark())."""
    repeats: int
    warmup: int
    threads: int | None
    ort_optimization: str
    save_ort_optimized: bool
    spin: bool
    torch_variants: tuple[str, ...]
    fold_batchnorm: bool


@dataclass
class Workspace:
    """What every backend of one benchmark call shares: the models, how to make inputs, the
    settings, the folder for files, the files written there (name -> path) and the ONNX
    exports made so far (shared by the ONNX Runtime backends)."""
    models: Mapping[str, ModelLike]
    make_input: Callable[[int], Batch]
    settings: Settings
    folder: Path
    files: dict[str, str] = field(default_factory=dict)
    exports: dict[str, tuple[Path, str]] = field(default_factory=dict)   # name -> (ONNX, origin)


class Backend:
    """Base class of the backends (see the module docstring)."""

    name: ClassVar[str] = ""

    def __init__(self, workspace: Workspace):
        self.ws = workspace

    @classmethod
    def check(cls, settings: Settings) -> None:
        """Raise ValueError for settings this backend cannot honour."""

    def available(self) -> str | None:
        return None

    def variants(self) -> Iterable[str]:
        raise NotImplementedError

    def variant_unavailable(self, variant: str) -> str | None:
        return None

    def prepare(self, name: str, model: ModelLike, variant: str) -> Prepared:
        raise NotImplementedError

    def runner(self, prepared: Prepared, batch: Batch) -> Callable[[], object]:
        raise NotImplementedError

    def timing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def recorded_settings(self) -> dict:
        """Settings of this backend worth recording with the results."""
        return {}
