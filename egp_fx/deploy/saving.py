"""save() and load(): a compressed model as a torch.export program, its report inside.

    egp_fx.save(small, "model.pt2")            # torch.export.save; report and layout inside
    module, report = egp_fx.load("model.pt2")   # a callable module, the report as a dict

save():
1. takes the example inputs (`example`, else the one compress kept; a tensor, a tuple of
   tensors or a dict of tensors) and a CPU copy of the module in eval mode (the module is not
   changed);
2. exports it with torch.export (non-strict). The batch axis (dim 0 of every input) is
   dynamic, and so is the sequence axis (dim 1 of 2-D inputs, `dynamic_sequence`, default: when
   the inputs are keywords): the description of inputs and axes export_onnx uses (inputs.py). It tries named dimensions from 1 up, then
   torch.export's own inference (Dim.AUTO, which bounds a sequence by the model's position
   table), then static shapes; the file records which axes ended up dynamic;
3. checks the program against the module on the example (and, with a dynamic batch, on the
   example doubled): each output within `tolerance` of its own scale (egp_fx.ir.compare's measure);
4. writes it with torch.export.save; the compress report (CompressReport.to_dict) and the
   layout (inputs, dynamic axes, versions) are stored inside, as the JSON extra files
   REPORT_FILE and INFO_FILE. A failure raises SaveError and leaves no file.
load() reads the program back (torch.export.load: tensors, no arbitrary pickles) and returns
(module, report): ExportedProgram.module(), called like the compressed module, and the report
as a dict (None for a program saved without one).

torch.save(small) / torch.load(..., weights_only=False) works as well (egp_fx.ir.pickling); it
stores the Python code and the module, without the original model.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from egp_fx.distributed import is_writer
from egp_fx.errors import SaveError
from egp_fx.ir.batches import Batch, as_batch
from egp_fx.ir.compare import ErrorMeter, tensor_leaves
from egp_fx.ir.copying import moved, structural_copy, tensor_bytes
from egp_fx.ir.pickling import pickled_meta
from egp_fx.pipeline.report import EXAMPLE_META_KEY, REPORT_META_KEY

from .inputs import BATCH, SEQUENCE, InputSpec

log = logging.getLogger(__name__)

REPORT_FILE = "egp_fx_report.json"
INFO_FILE = "egp_fx_info.json"
DEFAULT_TOLERANCE = 1e-5
FORMAT = 1


@dataclass
class Saved:
    path: Path
    dynamic: dict[str, dict[int, str]]      # input name -> {axis: "batch" | "sequence"}
    bytes: int                              # size of the file (0: another rank wrote it)
    tensor_bytes: int                       # parameters and constants of the module saved
    max_rel_err: float                      # program vs module on the example(s)
    inputs: list[str] = field(default_factory=list)


class Loaded(NamedTuple):
    module: nn.Module
    report: dict | None


def _example(module: nn.Module, example) -> Batch:
    if example is None:
        example = getattr(module, "meta", {}).get(EXAMPLE_META_KEY) \
            or pickled_meta(module).get(EXAMPLE_META_KEY)
    if example is None:
        raise SaveError("save needs example inputs: pass example= (a tensor, a tuple of tensors "
                        "or a dict of tensors); only modules returned by compress carry one")
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return Batch(tuple(example))
    if not isinstance(example, (torch.Tensor, Mapping, Batch)):
        raise SaveError(f"example must be a tensor, a tuple or a dict of tensors, not "
                        f"{type(example).__name__}")
    return as_batch(example)


def _export(model: nn.Module, batch: Batch, spec: InputSpec):
    """The ExportedProgram, trying named dynamic dims, then Dim.AUTO, then static shapes."""
    attempts = []
    if spec.dynamic:
        attempts += [(Dim("batch", min=1), Dim("sequence", min=1)), (Dim.AUTO, Dim.AUTO)]
    attempts.append((None, None))
    batch = spec.exportable(batch)
    failures = []
    for batch_dim, seq_dim in attempts:
        shapes = spec.dynamic_shapes(batch_dim, seq_dim) if batch_dim is not None else None
        try:
            with torch.no_grad():
                return torch.export.export(model, batch.args, kwargs=dict(batch.kwargs),
                                           dynamic_shapes=shapes, strict=False)
        except Exception as err:  # noqa: BLE001  (export raises many types; try the next)
            first = next((ln for ln in str(err).splitlines() if ln.strip()), "")
            failures.append(f"{type(err).__name__}: {first[:300]}")
            log.debug("torch.export with dims %s failed: %s", (batch_dim, seq_dim), err)
    raise SaveError("torch.export cannot capture the module: " + "; ".join(failures)
                    + ". torch.save(module) stores it as Python code instead")


def _dynamic_axes(program, spec: InputSpec) -> dict[str, dict[int, str]]:
    """Input name -> {axis: name} of the axes the program left symbolic."""
    user = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    out = {}
    for name, axes_asked, input_spec in zip(spec.names("program"), spec.axes, user):
        val = nodes[input_spec.arg.name].meta.get("val")
        shape = getattr(val, "shape", ())
        axes = {i: axes_asked.get(i, BATCH if i == 0 else SEQUENCE) for i, d in enumerate(shape)
                if not isinstance(d, int)}
        if axes:
            out[name] = axes
    return out


def _check(program, model: nn.Module, batches: list[Batch]) -> float:
    module = program.module()
    meter = ErrorMeter()
    with torch.no_grad():
        for b in batches:
            meter.add(tensor_leaves(b(module)), tensor_leaves(b(model)))
    return meter.error


def save(module: nn.Module, path: str | Path, example: Any = None, *, dynamic_batch: bool = True,
         dynamic_sequence: bool | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Saved:
    """Write `module` (what compress returned, or any exportable module) to `path` as a
    torch.export program with its report inside; see the module docstring. Under an
    initialised torch.distributed process group only rank 0 writes the file (the others check
    the program and return its record with bytes 0)."""
    path = Path(path)
    batch = _example(module, example).map(lambda t: t.detach().cpu())
    spec = InputSpec.of(batch, dynamic_batch, dynamic_sequence)
    model = moved(structural_copy(module), "cpu").eval()
    program = _export(model, batch, spec)
    dynamic = _dynamic_axes(program, spec)
    names = spec.names("program")
    if spec.dynamic and not dynamic:
        log.warning("saving %s with static shapes: torch.export could not keep an axis dynamic",
                    path)
    checks = [batch] + ([batch.map(lambda t: torch.cat([t, t]) if t.dim() else t)]
                        if any(0 in axes for axes in dynamic.values()) else [])
    err = _check(program, model, checks)
    if not err <= tolerance:
        raise SaveError(f"the exported program differs from the module: relative output error "
                        f"{err:.3g} (tolerance {tolerance:g})")
    report = _report_json(module)
    info = {"format": FORMAT, "inputs": names, "keyword_inputs": bool(batch.kwargs),
            "dynamic": {k: {str(a): n for a, n in v.items()} for k, v in dynamic.items()},
            "torch": torch.__version__, "max_rel_err": err}
    extra = {INFO_FILE: json.dumps(info)} | ({REPORT_FILE: report} if report else {})
    if not is_writer():          # across ranks every rank holds the same module: rank 0 writes it
        return Saved(path, dynamic, 0, tensor_bytes(model), err, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.export.save(program, str(path), extra_files=extra)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise SaveError(f"torch.export.save failed for {path}: {type(exc).__name__}: {exc}") from exc
    saved = Saved(path, dynamic, path.stat().st_size, tensor_bytes(model), err, names)
    log.info("saved %s (%d bytes; dynamic axes %s; relative error %.3g)", path, saved.bytes,
             dynamic or "none", err)
    return saved


def _report_json(module: nn.Module) -> str | None:
    report = getattr(module, "meta", {}).get(REPORT_META_KEY) \
        or pickled_meta(module).get(REPORT_META_KEY)
    return report.to_json() if report is not None else None


def load(path: str | Path) -> Loaded:
    """(module, report) from a file written by save(); the report is a dict or None."""
    path = Path(path)
    if not path.is_file():
        raise SaveError(f"{path}: no such file")
    extra = {INFO_FILE: "", REPORT_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        raise SaveError(f"{path} is not a torch.export program: {type(exc).__name__}: "
                        f"{str(exc)[:300]}") from exc
    module = program.module()
    if isinstance(module, fx.GraphModule) and extra[INFO_FILE]:
        module.meta["egp_saved"] = json.loads(extra[INFO_FILE])
    return Loaded(module, json.loads(extra[REPORT_FILE]) if extra[REPORT_FILE] else None)


def save_weights(module: nn.Module, path: str | Path) -> Path:
    """The module's state dict as a safetensors file, written atomically (a temporary file
    renamed into place, so an interrupted write never leaves a truncated checkpoint). Under an
    initialised torch.distributed process group only rank 0 writes (every rank holds the same
    weights); the others return the path."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    if not is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path
