"""Running a captured graph: its inputs, the shapes of its nodes, the node where it fails.

`propagate(gm, example)` runs torch.fx's ShapeProp on fake tensors (shapes and dtypes only, no
arithmetic: about 10x cheaper than a real forward) and leaves a TensorMetadata in
node.meta["tensor_meta"]. A pass propagates once; a rewrite that changes a width updates the
shapes it changed (`set_dim`), so no pass re-propagates per rewrite.

`flat_args(gm, batch)` lists the placeholder values of gm for a Batch: positional tensors and
keywords by name for module-level graphs; the flattened (args, kwargs) tree for exported graphs,
whose generated forward takes the model's own signature.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from egp_fx.errors import CalibrationError

from .batches import Batch
from .ops import Ops, Role, main_input


def flat_args(gm: fx.GraphModule, batch: Batch) -> list:
    """The values of gm's placeholders, in order, for a call gm(*batch.args, **batch.kwargs)."""
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
        return fx_pytree.tree_flatten_spec((batch.args, batch.kwargs), codegen.pytree_info.in_spec)
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, p in enumerate(placeholders):
        name = str(p.target).lstrip("*")
        if i < len(batch.args):
            out.append(batch.args[i])
        elif name in batch.kwargs:
            out.append(batch.kwargs[name])
        elif p.args:
            out.append(p.args[0])
        else:
            raise CalibrationError(f"the batch gives no value for the model input {name!r} "
                                   f"(batch: {batch.describe()})")
    return out


class _ShapeProp(ShapeProp):
    """ShapeProp that does not compute what cannot change a shape: BatchNorm in eval mode and
    activations return their input (on fake tensors a BatchNorm is a dozen dispatched ops, most
    of the cost of a propagation through a ConvNet). Identity ops are computed: `contiguous`
    changes the strides a following `view` needs (timm's SpaceToDepth, MaxViT's partitions)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)

        ops = Ops(gm)
        self._same = {n for n in gm.graph.nodes
                      if ops(n).role in (Role.NORM, Role.ACTIVATION)
                      and main_input(n) is not None}
        self._main_input = main_input

    def run_node(self, n: fx.Node):
        if n in self._same:
            value = self.env[self._main_input(n)]
            if isinstance(value, torch.Tensor):
                n.meta["tensor_meta"] = _extract(value)
                n.meta["type"] = type(value)
                return value
        return super().run_node(n)


def _extract(t: torch.Tensor) -> TensorMetadata:
    from torch.fx.passes.shape_prop import _extract_tensor_metadata  # noqa: PLC0415

    return _extract_tensor_metadata(t)


REAL_RUN_BYTES = 256 * 2 ** 20


def real_run_is_cheap(module: torch.nn.Module) -> bool:
    """Run on real tensors rather than fake ones? For a model of at most REAL_RUN_BYTES of
    parameters on the CPU, two samples cost less than fake-tensor dispatch (DenseNet-121 at
    64 px: 15 ms against 1.4 s); for larger ones fake tensors skip the arithmetic."""
    total, device = 0, None
    for p in module.parameters():
        total += p.numel() * p.element_size()
        device = device or p.device
    return total <= REAL_RUN_BYTES and (device is None or device.type == "cpu")


def propagate(gm: fx.GraphModule, example: Batch) -> None:
    """Fill node.meta['tensor_meta'] for every node from one run on `example` widened to two
    samples (data.Batch.widen: the batch dim of every shape is 2), on real tensors when that
    is cheap, else on fake ones."""
    prop = _ShapeProp(gm)  # built outside the fake mode: it would deep-copy gm to fake tensors
    args = flat_args(gm, example.widen(2))
    with torch.no_grad():
        if real_run_is_cheap(gm):
            prop.propagate(*args)
            return
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            prop.propagate(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                             for t in args])


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(int(d) for d in tm.shape) if isinstance(tm, TensorMetadata) else None


def dtype_of(node: fx.Node, default: torch.dtype = torch.float32) -> torch.dtype:
    tm = node.meta.get("tensor_meta")
    return tm.dtype if isinstance(tm, TensorMetadata) else default


def set_dim(node: fx.Node, axis: int, size: int) -> None:
    """Record that `node`'s output now has `size` along `axis` (after a rewrite narrowed it)."""
    tm = node.meta.get("tensor_meta")
    if not isinstance(tm, TensorMetadata):
        return
    shape = list(tm.shape)
    shape[axis % len(shape)] = size
    node.meta["tensor_meta"] = tm._replace(shape=torch.Size(shape), stride=None)


class _Tracking(fx.Interpreter):
    """An Interpreter that knows which node runs now (`current`) and which failed first."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.current: fx.Node | None = None
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        try:
            return super().run_node(n)
        except Exception:
            if self.failed is None:
                self.failed = n
            raise


def describe_node(n: fx.Node) -> str:
    return f"{n.name} ({n.op} {getattr(n.target, '__name__', n.target)})"


def first_failing(gm: fx.GraphModule, batch: Batch) -> fx.Node | None:
    """The first node that raises on `batch` (run node by node), or None."""
    run = _Tracking(gm)
    try:
        with torch.no_grad():
            run.run(*flat_args(gm, batch))
    except Exception:  # noqa: BLE001  (we only want to know where it failed)
        pass
    return run.failed


def failing_node(gm: fx.GraphModule, batch: Batch) -> str | None:
    """`name (op target)` of the first node that raises on `batch`, or None."""
    node = first_failing(gm, batch)
    return describe_node(node) if node is not None else None


def call_quietly(module, batch: Batch):
    """batch(module), without the traceback of the generated code that torch.fx prints to
    stderr when a GraphModule raises (GraphModule.__call__ does; its forward does not): a
    caller that handles the error names the failing node itself (first_failing)."""
    return batch(module.forward if isinstance(module, fx.GraphModule) else module)


def tracking_interpreter(gm: fx.GraphModule) -> _Tracking:
    """An Interpreter whose `current` attribute is the node being run (for diagnoses)."""
    return _Tracking(gm)
