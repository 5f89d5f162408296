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
                                 batch; this is what egp_fx.runtime.timing.measure_cell times
    timing()                     a context held while a cell is timed (thread settings)
    Settings                     (class attribute) a frozen dataclass of the backend's own
                                 options, filled from benchmark()'s keyword options of the same
                                 names (ort_optimization=..., torch_variants=...); its
                                 __post_init__ rejects values it cannot honour (ValueError)

Every backend also reads the settings all share, `self.ws.settings` (repeats, warmup, threads),
and its own, `self.settings`. Adding a backend is one class, its options included, in one file
(next to the others, imported by bench/__init__.py, or in user code):

    @dataclass(frozen=True)
    class MySettings:
        my_level: int = 1

    @register_backend
    class MyBackend(Backend):
        name = "my-backend"
        Settings = MySettings
        def variants(self): return (f"level-{self.settings.my_level}",)
        def prepare(self, name, model, variant): return Prepared(model, "as given")
        def runner(self, prepared, batch): return lambda: batch(prepared.handle)

    benchmark(models, x, backends=("my-backend",), my_level=2)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
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
class RunSettings:
    """The settings every backend of one benchmark call shares (see benchmark())."""
    repeats: int
    warmup: int
    threads: int | None


@dataclass(frozen=True)
class NoSettings:
    """The settings of a backend without options of its own."""


def backend_settings(options: Mapping[str, object]) -> dict[type, object]:
    """Every registered backend's Settings, filled from `options` by field name.

    An option no registered backend takes is a TypeError (as an unknown keyword argument is);
    a value a backend cannot honour is its Settings' ValueError, whether or not that backend
    is among the ones run."""
    classes = dict.fromkeys(cls.Settings for cls in BACKENDS.values())
    known = {f.name for c in classes for f in fields(c)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"benchmark() got unknown options {unknown}; the backends take "
                        f"{sorted(known)}")
    return {c: c(**{f.name: options[f.name] for f in fields(c) if f.name in options})
            for c in classes}


@dataclass
class Workspace:
    """What every backend of one benchmark call shares: the models, how to make inputs, the
    settings, the folder for files, the files written there (name -> path) and the ONNX
    exports made so far (shared by the ONNX Runtime backends)."""
    models: Mapping[str, ModelLike]
    make_input: Callable[[int], Batch]
    settings: RunSettings
    folder: Path
    files: dict[str, str] = field(default_factory=dict)
    exports: dict[str, tuple[Path, str]] = field(default_factory=dict)   # name -> (ONNX, origin)


class Backend:
    """Base class of the backends (see the module docstring)."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings

    def __init__(self, workspace: Workspace, settings: object = None):
        self.ws = workspace
        self.settings = settings if settings is not None else self.Settings()

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
