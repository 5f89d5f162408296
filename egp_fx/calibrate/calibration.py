"""Calibration: run data through the captured model and record per-call activation statistics.

An instrumented copy of the graph (sharing the modules and tensors, so no weights are copied) has
an observer call inserted before every activation call; the generated code runs at the speed of a
plain forward, and each observer reduces its input with a handful of tensor ops on the device.
The records end up in node.meta["egp"] of the returned, uninstrumented GraphModule. Under an
initialised torch.distributed process group the records are reduced over all ranks
(distributed/calibration.py), so every rank ends with the statistics of all the data.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from egp_fx import distributed as ranks
from egp_fx.capture import COVERAGE_META_KEY, Coverage, capture, coverage_of, rejected
from egp_fx.errors import CalibrationError
from egp_fx.ir.activations import GELU_MARGINS, SILU_MARGINS, region_spec
from egp_fx.ir.batches import Batch, iter_batches, loader_length
from egp_fx.ir.channels import channel_axis
from egp_fx.ir.copying import device_of, moved
from egp_fx.ir.ops import Ops, main_input
from egp_fx.ir.shapes import failing_node, propagate, shape_of

from . import ranks as across
from .stats import EGP_META_KEY, StatsAccumulator

log = logging.getLogger(__name__)


class _Observer(nn.Module):
    def __init__(self, acc: StatsAccumulator):
        super().__init__()
        self.acc = acc

    def forward(self, z: torch.Tensor) -> None:
        self.acc.update(z)


def _instrument(gm: fx.GraphModule, accumulators: dict[str, StatsAccumulator]) -> fx.GraphModule:
    """A copy of gm's graph with an observer before each accumulator's activation node."""
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    val_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    by_name = {n.name: n for n in graph.nodes}
    inst = fx.GraphModule(gm, graph)   # shares gm's submodules and tensors
    for i, (name, acc) in enumerate(accumulators.items()):
        node = by_name[name]
        target = f"_egp_observer_{i}"
        inst.add_module(target, _Observer(acc))
        with graph.inserting_before(node):
            graph.call_module(target, (main_input(node),))
    inst.recompile()
    return inst


def accumulators_for(gm: fx.GraphModule, example: Batch | None, gelu_margins=GELU_MARGINS,
                     silu_margins=SILU_MARGINS) -> tuple[dict[str, StatsAccumulator], dict[str, str]]:
    """One StatsAccumulator per supported activation call of gm (shapes from `example` tell
    the channel axis where a reshape sits between a layer and its activation), and the calls
    of a kind that are not observed, with the reason."""
    if example is not None:
        propagate(gm, example.head(1))
    ops = Ops(gm)
    out: dict[str, StatsAccumulator] = {}
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        spec = region_spec(ops(node), gelu_margins=gelu_margins, silu_margins=silu_margins)
        z = main_input(node)
        if spec is not None and z is not None:
            axis, how = channel_axis(z, ops)
            reason = _per_channel_mismatch(spec, axis, shape_of(z))
            if reason is not None:
                skipped[node.name] = reason
                continue
            out[node.name] = StatsAccumulator(spec, axis, how)
    return out, skipped


def _per_channel_mismatch(spec, axis: int, shape: tuple[int, ...] | None) -> str | None:
    """Why per-channel maps (PReLU's slopes, along dim 1 of its input) cannot be read per
    channel of the statistics, or None."""
    n = spec.channels
    if n is None:
        return None
    if not shape or len(shape) < 2:
        return f"its {n} per-channel slopes need an input with a channel dim"
    if axis % len(shape) != 1:
        return (f"its {n} per-channel slopes run along dim 1, but the layer before it writes "
                f"its channels along dim {axis % len(shape)}")
    if shape[1] != n:
        return f"it has {n} per-channel slopes for {shape[1]} channels"
    return None


def _check_backend(device: torch.device) -> None:
    """The process group must reduce data from `device`; a rank that cannot says so in the
    store before it stops (the others then name it)."""
    try:
        ranks.backend_device(device)
    except Exception as err:
        ranks.report_failure("calibration: backend check", err)
        raise


def warn_unanalysed(gm: fx.GraphModule) -> Coverage | None:
    """Log a warning when activation calls run in `gm` that calibration does not observe (the
    count and where they hide); returns the Coverage record (None when it was not measured)."""
    cov = gm.meta.get(COVERAGE_META_KEY)
    if cov is not None and cov.unanalysed:
        log.warning("%d of %d activation calls that run are not analysed (their units are kept "
                    "as they are): %s", cov.unanalysed, cov.run,
                    "; ".join(h.describe() for h in cov.hidden))
    return cov


def _observe(gm: fx.GraphModule, accumulators: dict[str, StatsAccumulator], batches: Iterable,
             device: torch.device, total: int | None, progress: bool, on_output=None) -> None:
    """The local pass: every batch through the instrumented copy of gm (on_output sees each
    batch's output)."""
    inst = _instrument(gm, accumulators)
    bar = tqdm(total=total, desc="calibrate", unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            try:
                out = batch(inst)
            except Exception as err:
                where = failing_node(gm, batch)
                raise CalibrationError(rejected(i, batch, err, where)) from err
            if on_output is not None:
                on_output(batch, out)
            bar.update(1)
    bar.close()


def calibrate(model: nn.Module, calib_loader: Iterable, *, max_batches: int | None = None,
              device: torch.device | str | None = None, input_key: str | None = None,
              progress: bool = True, gelu_margins: tuple[float, float] = GELU_MARGINS,
              silu_margins: tuple[float, float] = SILU_MARGINS, capture_mode: str = "auto",
              distributed: bool | None = None, on_output=None) -> fx.GraphModule:
    """Capture `model` and record, per activation call, its region statistics.

    Returns the captured GraphModule (on `device`, eval mode) with an ActivationStats record in
    node.meta["egp"] of every activation node, and in meta["egp_coverage"] a capture.Coverage:
    the activation calls that run on one sample and those inside leaves or unknown ops that are
    not analysed (logged as a warning). `model` itself is never modified. The loader may
    yield tensors, (input, ...) tuples or dicts of tensors (egp_fx.ir.batches). `capture_mode`:
    "auto" (torch.fx, then torch.export), "fx" or "export". `on_output(batch, output)`, when
    given, sees the model's output for every batch of this rank (compress keeps the references
    it verifies against this way, without another forward).

    `distributed`: reduce the statistics over the ranks of the default torch.distributed process
    group (default: when one is initialised; False keeps them local). Each rank then passes its
    own shard (`max_batches` counts per rank); shards may be uneven or empty, and every rank
    returns the statistics of the union of the shards (egp_fx.calibrate.ranks). A rank
    that fails makes every rank stop with an error naming it.
    """
    if isinstance(model, nn.Module) and model.training:
        log.warning("calibrate: the model is in training mode; statistics are taken in eval mode "
                    "on a copy (the model you passed is left as it is)")
    device = torch.device(device) if device is not None else device_of(model)
    reduce = ranks.enabled(distributed)
    if reduce:
        _check_backend(device)
    batches = iter_batches(calib_loader, max_batches=max_batches, input_key=input_key,
                           device=device_of(model), allow_empty=reduce)
    with ranks.together("calibration: first batch", reduce):
        first = next(batches, None)
    first, counted = across.first_batch(first, device_of(model), model) if reduce \
        else (first, True)
    with ranks.together("calibration", reduce):
        # the capture is checked against the model on two samples: a graph that computes
        # something else shows it there, and a check on a whole batch costs two forwards of it
        gm = moved(capture(model, first.head(2), mode=capture_mode), device)
        accumulators, skipped = accumulators_for(gm, first.to(device), gelu_margins,
                                                 silu_margins)
        if not accumulators:
            log.warning("calibrate: the model has no supported activation calls")
        gm.meta[COVERAGE_META_KEY] = coverage_of(gm, first.to(device).head(1), set(accumulators),
                                                 skipped)
        warn_unanalysed(gm)
        _observe(gm, accumulators, itertools.chain([first] if counted else [], batches), device,
                 loader_length(calib_loader, max_batches), progress, on_output)
    if reduce:
        across.reduce(accumulators, device)
    for node in gm.graph.nodes:
        if node.name in accumulators:
            node.meta[EGP_META_KEY] = accumulators[node.name].finish()
    log.info("calibrated %d activation calls", len(accumulators))
    return gm
