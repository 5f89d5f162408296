"""Copies that share tensors: the memory discipline of compress.

`structural_copy(module)` deep-copies the module tree (module objects, the fx graph, attributes)
but not its parameters and buffers: the copy holds the same tensor objects. Nothing in egp_fx
changes a tensor in place (rewrites bind new tensors, see layer.Layer.replace), so a structural
copy is a full snapshot that costs the graph and the module objects, not the weights. compress
takes its snapshots and trial copies this way; only the tensors a rewrite creates are new.

`own_tensors(module, foreign)` clones, at the end, the tensors still shared with `foreign` (the
caller's model), so the result can be trained without touching the model it came from.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def _tensors(module: nn.Module):
    yield from module.parameters(recurse=True)
    yield from module.buffers(recurse=True)
    for m in module.modules():   # plain tensor attributes of fx GraphModules (constants)
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                yield v


def structural_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that shares every parameter and buffer (see the module doc)."""
    memo = {id(t): t for t in _tensors(module)}
    return copy.deepcopy(module, memo)


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    """t's shape and dtype on the meta device; a Parameter stays a Parameter."""
    return nn.Parameter(t.to("meta"), requires_grad=t.requires_grad) \
        if isinstance(t, nn.Parameter) else t.to("meta")


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose tensors are on the meta device (shapes and dtypes, no data,
    no bytes): for what only needs shapes, such as counting FLOPs."""
    return copy.deepcopy(module, {id(t): _on_meta(t) for t in _tensors(module)})


@contextlib.contextmanager
def on_meta(module: nn.Module):
    """`module` itself with every parameter, buffer and tensor attribute on the meta device,
    put back on exit: meta_copy without copying the module (nor recompiling a GraphModule's
    code). For graphs egp_fx made: the module changes while the block runs."""
    saved = []
    for m in module.modules():
        for store in (m._parameters, m._buffers, m.__dict__):
            for name, t in list(store.items()):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    saved.append((store, name, t))
                    store[name] = _on_meta(t)
    try:
        yield module
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by the distinct parameters and buffers of `module` (views count once)."""
    seen, total = set(), 0
    for t in _tensors(module):
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    return total


def own_tensors(module: nn.Module, foreign: nn.Module) -> int:
    """Clone every parameter/buffer of `module` whose storage `foreign` also holds; bytes cloned."""
    shared = {t.untyped_storage().data_ptr() for t in _tensors(foreign) if t.device.type != "meta"}
    cloned = 0
    for m in module.modules():
        for group in (m._parameters, m._buffers):
            for name, t in list(group.items()):
                if t is None or t.device.type == "meta" or t.untyped_storage().data_ptr() not in shared:
                    continue
                new = t.detach().clone()
                group[name] = nn.Parameter(new, requires_grad=t.requires_grad) \
                    if isinstance(t, nn.Parameter) else new
                cloned += new.numel() * new.element_size()
    return cloned


@contextlib.contextmanager
def _rebinding():
    """Module.to()/.double() bind new Parameter objects instead of changing shared ones."""
    future = torch.__future__
    old = (future.get_overwrite_module_params_on_conversion(),
           future.get_swap_module_params_on_conversion())
    future.set_overwrite_module_params_on_conversion(True)
    future.set_swap_module_params_on_conversion(False)
    try:
        yield
    finally:
        future.set_overwrite_module_params_on_conversion(old[0])
        future.set_swap_module_params_on_conversion(old[1])


def moved(module: nn.Module, device=None, dtype=None) -> nn.Module:
    """module.to(device, dtype) without touching tensors it shares with other modules."""
    with _rebinding():
        return module.to(device=device, dtype=dtype)


def device_of(module: nn.Module) -> torch.device:
    """The device of the first parameter or buffer (CPU for a module without tensors)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
