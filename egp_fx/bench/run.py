"""benchmark(): every model on every backend, variant and batch size, timed interleaved.

For each selected backend (registry.py) and each of its variants, every model is prepared once
(prepare()); then, per batch size, each gets a runner, is called once (a model that fails there
is skipped with the error, the others go on), and the cell is timed round-robin
(egp_fx.runtime.timing). Each backend gets the settings all share (repeats, warmup, threads) and
its own (its Settings, filled from benchmark()'s other keyword options).
Size figures come from egp_fx.pipeline.measures.measure at batch 1 (params, FlopCounterMode FLOPs,
weighted layers and nonlinear activations on the longest path); models given as .onnx files
report their initializer count as params and no FLOPs.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from egp_fx.deploy.default_form import export_default_form
from egp_fx.errors import ExportError
from egp_fx.ir.batches import Batch, as_batch
from egp_fx.runtime.timing import measure_cell

from .environment import environment
from .registry import BACKENDS, Backend, ModelLike, RunSettings, Skip, Workspace, backend_settings
from .result import BenchResult, BenchRow
from .rows import cell_rows

log = logging.getLogger(__name__)


def benchmark(models: Mapping[str, ModelLike], example_inputs, *,
              batch_sizes: Iterable[int] = (1,), backends: Iterable[str] = ("ort-cpu",),
              repeats: int = 50, warmup: int = 10, threads: int | None = None,
              workdir: str | os.PathLike | None = None, default_form_of: Iterable[str] = (),
              **options) -> BenchResult:
    """Measure every model on every backend/variant/batch size, interleaved.

    `models` maps names to nn.Modules (or to .onnx files, ONNX Runtime backends only); the first
    entry is the baseline of the speedup column. `example_inputs` is one sample -- a batch-1
    tensor, tuple of tensors or dict of tensors (token inputs: input_ids, attention_mask, ...),
    repeated along dim 0 to each batch size -- or a callable batch_size -> such inputs.
    `backends` are names from egp_fx.bench.BACKENDS. `options` are the backends' own, by name:
    ort_optimization ("all"), save_ort_optimized (False), spinning (None: only when one model is
    timed) for the ONNX Runtime backends; torch_variants (egp_fx.bench.DEFAULT_TORCH_VARIANTS;
    "+compile" ones of TORCH_VARIANTS are opt-in, they compile every model once per batch size)
    and fold_batchnorm (True: every model runs with its BatchNorm folded, as a user would deploy
    it) for the torch backends. Rows say how each model was prepared and which row their speedup
    is relative to.

    On the ONNX Runtime backends a model is timed in the fastest form export_onnx finds; each
    model named in `default_form_of` is also timed as torch.onnx.export's defaults write it, as
    the row "<name> (torch.onnx.export default)" right after it: what a user deploys without
    egp_fx (egp_fx.deploy.default_form; a model that does not export so is skipped with why).
    """
    backends, batch_sizes = tuple(backends), tuple(batch_sizes)
    settings = RunSettings(repeats, warmup, threads)
    own = _validate(models, backends, batch_sizes, settings, options)
    env = environment(threads)  # before the run: the load average is the one we ran under
    make_input = _input_maker(example_inputs)
    recorded = {"repeats": repeats, "warmup": warmup, "batch_sizes": list(batch_sizes),
                "order": "round-robin", "threads": threads if threads is not None else "default"}
    rows: list[BenchRow] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="egp_bench_") as tmp:
        folder = Path(workdir or tmp)
        onnx_only = _default_forms(models, tuple(default_form_of), backends, make_input(1),
                                   folder, skipped)
        models = _after_their_originals(models, onnx_only)
        sizes = {name: _sizes(m, make_input(1)) for name, m in models.items()}
        ws = Workspace(models, make_input, settings, folder)
        ws.files.update({name: str(path) for name, path in onnx_only.items()})
        for name in backends:   # the default-form files run on the ONNX Runtime backends only
            space = ws if name.startswith("ort-") or not onnx_only else \
                replace(ws, models={k: v for k, v in models.items() if k not in onnx_only})
            backend = BACKENDS[name](space, own[BACKENDS[name].Settings])
            recorded.update(backend.recorded_settings())
            rows += _run_backend(backend, space, batch_sizes, sizes, skipped)
    files = ws.files if workdir is not None else {}
    return BenchResult(rows, env, recorded, skipped, files)


DEFAULT_FORM_SUFFIX = " (torch.onnx.export default)"


def _default_forms(models, names: tuple[str, ...], backends, example: Batch, folder: Path,
                   skipped: list[dict]) -> dict[str, Path]:
    """Row name -> ONNX file of torch.onnx.export's default form, for each model in `names`
    (only when an ONNX Runtime backend runs)."""
    unknown = [n for n in names if n not in models or not isinstance(models[n], nn.Module)]
    if unknown:
        raise ValueError(f"default_form_of names {unknown}, which are not modules in `models`")
    if not any(b.startswith("ort-") for b in backends):
        return {}
    out = {}
    for name in names:
        row = name + DEFAULT_FORM_SUFFIX
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.torch-default.onnx"
        try:
            result = export_default_form(models[name], path, example)
        except ExportError as exc:
            log.warning("skipping %s: %s", row, exc)
            skipped.append({"model": row, "backend": "*", "variant": "*", "reason": str(exc)})
            continue
        log.info("%s: %s exporter, opset %d", row, result.exporter, result.opset)
        out[row] = path
    return out


def _after_their_originals(models, forms: dict[str, Path]) -> dict:
    """The models in order, each default-form row right after its model."""
    out = {}
    for name, model in models.items():
        out[name] = model
        if name + DEFAULT_FORM_SUFFIX in forms:
            out[name + DEFAULT_FORM_SUFFIX] = forms[name + DEFAULT_FORM_SUFFIX]
    return out


def _run_backend(backend: Backend, ws: Workspace, batch_sizes, sizes, skipped) -> list[BenchRow]:
    def skip(model: str, variant: str, reason: str) -> None:
        log.warning("skipping %s on %s %s: %s", model, backend.name, variant, reason)
        skipped.append({"model": model, "backend": backend.name, "variant": variant,
                        "reason": reason})

    reason = backend.available()
    if reason:
        skip("*", "*", reason)
        return []
    rows = []
    for variant in backend.variants():
        reason = backend.variant_unavailable(variant)
        if reason:
            skip("*", variant, reason)
            continue
        prepared = {}
        for name, model in ws.models.items():
            try:
                prepared[name] = backend.prepare(name, model, variant)
            except Skip as s:
                skip(name, s.variant or variant, s.reason)
        for batch in batch_sizes if prepared else ():
            x = ws.make_input(batch)
            runners = {}
            for name, ready in prepared.items():
                try:  # a model that cannot run this variant (dtype, capture) must not end the run
                    runners[name] = backend.runner(ready, x)
                    runners[name]()
                except Exception as exc:  # noqa: BLE001
                    skip(name, f"{variant} batch {batch}", f"{type(exc).__name__}: {exc}")
                    runners.pop(name, None)
            if runners:
                with backend.timing():
                    times = measure_cell(runners, ws.settings.repeats, ws.settings.warmup)
                how = {n: p.description for n, p in prepared.items()}
                rows += cell_rows(times, backend.name, variant, batch, sizes, how)
    return rows


def _validate(models, backends, batch_sizes, settings: RunSettings, options) -> dict:
    if not models:
        raise ValueError("benchmark needs at least one model")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backends {bad}; choose from {tuple(BACKENDS)}")
    own = backend_settings(options)
    if settings.repeats < 1 or settings.warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and batch sizes >= 1")
    return own


def _as_inputs(value) -> Batch:
    """A Batch from a tensor, a tuple/list of positional tensors, a dict or a Batch."""
    if isinstance(value, (tuple, list)) and value and all(isinstance(t, torch.Tensor)
                                                          for t in value):
        return Batch(tuple(value))
    return as_batch(value)


def _input_maker(example_inputs) -> Callable[[int], Batch]:
    if callable(example_inputs) and not isinstance(example_inputs, (torch.Tensor, Batch)):
        return lambda batch: _as_inputs(example_inputs(batch))
    try:
        one = _as_inputs(example_inputs).map(lambda t: t.detach().cpu())
    except Exception as err:  # noqa: BLE001  (CalibrationError and friends: the same advice)
        one, cause = None, err
    else:
        cause = None
    if one is None or one.size != 1:
        raise ValueError("example_inputs must be a batch-1 tensor, tuple or dict of tensors, or "
                         "a callable batch_size -> inputs") from cause
    return lambda batch: one.map(lambda t: t.repeat(batch, *([1] * (t.dim() - 1)))
                                 if t.dim() else t)


def _sizes(model: ModelLike, x: Batch) -> dict:
    if not isinstance(model, nn.Module):
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
        params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
        return {"params": params, "flops": None, "weighted_depth": None, "nonlinear_depth": None}
    try:
        from egp_fx.pipeline.measures import measure

        return measure(model, x).to_dict()
    except Exception as exc:  # noqa: BLE001  (an untraceable model still gets params/FLOPs)
        log.warning("measure() failed (%s); depth left out, params/FLOPs counted directly", exc)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        x(copy.deepcopy(model).eval())
    return {"params": sum(p.numel() for p in model.parameters()),
            "flops": int(counter.get_total_flops()), "weighted_depth": None,
            "nonlinear_depth": None}
