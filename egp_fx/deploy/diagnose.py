"""Why an export failed, in a line per exporter, and where the unsupported operator is called."""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from egp_fx.ir.batches import Batch
from egp_fx.ir.shapes import flat_args, tracking_interpreter

from egp_fx.errors import ParityError

log = logging.getLogger(__name__)

_OP_PATTERNS = (re.compile(r"operator '(\w+)::(\w+)'"),          # TorchScript exporter
                re.compile(r"OpOverload\(op='(\w+)\.(\w+)'"),     # dynamo exporter
                re.compile(r"target=torch\.ops\.(\w+)\.(\w+)"))


def summarise(exc: BaseException) -> str:
    """The first line of the two innermost causes of an exporter failure (they name the op)."""
    if isinstance(exc, ParityError):
        return f"parity check failed: {exc}"
    texts = []
    while exc is not None:
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().split("\n", 1)[0]
        texts.append(f"{type(exc).__name__}: {first_line[:300]}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(reversed(texts[-2:]))  # outer layers only add boilerplate


def unsupported_op(failures: dict[str, str]) -> str | None:
    for text in failures.values():
        for pattern in _OP_PATTERNS:
            found = pattern.search(text)
            if found:
                return f"{found.group(1)}::{found.group(2)}"
    return None


class _OpRecorder(TorchDispatchMode):
    def __init__(self, op: str, where: list[str], context: list[str]):
        super().__init__()
        self.op, self.where, self.context = op, where, context

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == self.op and self.context and self.context[-1] not in self.where:
            self.where.append(self.context[-1])
        return func(*args, **(kwargs or {}))


def locate_op(model: nn.Module, batch: Batch, op: str) -> str | None:
    """Where `op` is called: the fx node (GraphModule) or the innermost module path."""
    context: list[str] = []
    where: list[str] = []
    handles = []

    def enter(label: str):
        return lambda *_: context.append(label)  # list.append returns None: input unchanged

    def leave(*_) -> None:  # a forward hook must return None or it replaces the output
        context.pop()

    for name, sub in model.named_modules():
        handles.append(sub.register_forward_pre_hook(
            enter(f"module `{name or '<root>'}` ({type(sub).__name__})")))
        handles.append(sub.register_forward_hook(leave))
    try:
        with torch.no_grad(), _OpRecorder(op, where, context):
            if isinstance(model, fx.GraphModule):
                _run_tracking(model, batch, context)
            else:
                batch(model)
    except Exception:  # noqa: BLE001  (diagnosis is best effort; the export error stands)
        log.debug("could not locate %s in the model", op, exc_info=True)
    finally:
        for handle in handles:
            handle.remove()
    return ", ".join(where[:3]) or None


def _run_tracking(gm: fx.GraphModule, batch: Batch, context: list[str]) -> Any:
    run = tracking_interpreter(gm)
    original = run.run_node

    def run_node(n: fx.Node):
        context.append(f"fx node `{n.format_node()}`")
        try:
            return original(n)
        finally:
            context.pop()

    run.run_node = run_node
    return run.run(*flat_args(gm, batch))


def failure_message(model: nn.Module, batch: Batch, path, failures: dict[str, str]) -> str:
    lines = [f"ONNX export of {type(model).__name__} to {path} failed with every exporter "
             f"({', '.join(failures)}); no file was written."]
    op = unsupported_op(failures)
    if op is not None:
        where = locate_op(model, batch, op)
        lines.insert(1, f"Operator {op} is not supported by the ONNX exporters"
                        + (f"; it is called by {where}." if where else "."))
    lines += [f"  {name}: {why}" for name, why in failures.items()]
    return "\n".join(lines)
