"""Calibration: run data through the traced model and record per-call activation statistics.

An instrumented copy of the graph (sharing the modules, so no weights are copied) has an
observer call inserted before every activation call; the generated code runs at the speed of a
plain forward, and each observer reduces its input with a handful of tensor ops on the device.
The records end up in node.meta["egp"] of the returned, uninstrumented GraphModule.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .channels import channel_axis
from .data import iter_inputs, loader_length
from .errors import CalibrationError
from .regions import GELU_MARGINS, SILU_MARGINS, activation_input, region_spec
from .stats import EGP_META_KEY, StatsAccumulator
from .tracing import trace

log = logging.getLogger(__name__)


class _Observer(nn.Module):
    def __init__(self, acc: StatsAccumulator):
        super().__init__()
        self.acc = acc

    def forward(self, z: torch.Tensor) -> None:
        self.acc.update(z)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _instrument(gm: fx.GraphModule, accumulators: dict[str, StatsAccumulator]) -> fx.GraphModule:
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):  # submodules and tensors, by dotted path
            root[node.target] = operator.attrgetter(node.target)(gm)
    by_name = {n.name: n for n in graph.nodes}
    for i, (name, acc) in enumerate(accumulators.items()):
        node = by_name[name]
        target = f"_egp_observer_{i}"
        root[target] = _Observer(acc)
        with graph.inserting_before(node):
            graph.call_module(target, (activation_input(node),))
    return fx.GraphModule(root, graph)


def _failing_node(gm: fx.GraphModule, x: torch.Tensor) -> str | None:
    class _Locator(fx.Interpreter):
        failed: fx.Node | None = None

        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception:
                if self.failed is None:
                    self.failed = n
                raise

    loc = _Locator(gm)
    try:
        with torch.no_grad():
            loc.run(x)
    except Exception:  # we only want to know where it failed
        pass
    if loc.failed is None:
        return None
    n = loc.failed
    return f"{n.name}` ({n.op} {getattr(n.target, '__name__', n.target)})"



def activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if region_spec(n, modules) is not None]


def calibrate(model: nn.Module, calib_loader: Iterable, *, max_batches: int | None = None,
              device: torch.device | str | None = None, input_key: str | None = None,
              progress: bool = True, gelu_margins: tuple[float, float] = GELU_MARGINS,
              silu_margins: tuple[float, float] = SILU_MARGINS,
              keep_outputs: list | None = None) -> fx.GraphModule:
    """Trace a copy of `model` and record, per activation call, its region statistics.

    Returns the traced GraphModule (on `device`, eval mode) with an ActivationStats record in
    node.meta["egp"] of every activation node. `model` itself is never modified.
    `keep_outputs`, when given a list, receives the model's output for each batch (compress
    uses them as the reference, which saves a forward pass).
    """
    if isinstance(model, nn.Module) and model.training:
        log.warning("calibrate: the model is in training mode; statistics are taken in eval mode "
                    "on a copy (the model you passed is left as it is)")
    device = torch.device(device) if device is not None else _model_device(model)
    gm = trace(model).to(device)
    modules = dict(gm.named_modules())
    accumulators: dict[str, StatsAccumulator] = {}
    for node in gm.graph.nodes:
        spec = region_spec(node, modules, gelu_margins=gelu_margins, silu_margins=silu_margins)
        if spec is not None:
            axis, how = channel_axis(activation_input(node), modules)
            accumulators[node.name] = StatsAccumulator(spec, axis, how)
    if not accumulators:
        log.warning("calibrate: the model has no supported activation calls")
    inst = _instrument(gm, accumulators)
    total = loader_length(calib_loader, max_batches)
    bar = tqdm(total=total, desc="calibrate", unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for i, x in enumerate(iter_inputs(calib_loader, max_batches=max_batches,
                                          input_key=input_key, device=device)):
            try:
                out = inst(x)
            except Exception as err:
                where = _failing_node(gm, x)
                raise CalibrationError(
                    f"batch {i} (input shape {tuple(x.shape)}) was rejected by the model"
                    + (f" at node `{where}" if where else "") + f": {type(err).__name__}: {err}"
                ) from err
            if keep_outputs is not None:
                keep_outputs.append(out)
            bar.update(1)
    bar.close()
    for node in gm.graph.nodes:
        if node.name in accumulators:
            node.meta[EGP_META_KEY] = accumulators[node.name].finish()
    log.info("calibrated %d activation calls", len(accumulators))
    return gm
