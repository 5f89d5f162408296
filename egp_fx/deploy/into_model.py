"""into_model: the narrowed layers of a compress result, put back into the user's own model class.

compress returns a GraphModule: the captured function, rewritten. A model's class often carries
more than its forward: a Hugging Face model has generate(), its key/value cache, its config and
eager code paths (attention without a mask tensor where the mask is causal) that the captured
function does not keep. Where the rewrites that matter are narrowings (narrow_channels: dead
units of a language model's FFN removed from the layer that makes them and the layers that read
them), the same saving fits in the model itself:

    small = egp_fx.compress(model, calib)
    model_small = egp_fx.into_model(small, model)     # an OPTForCausalLM, fc1/fc2 narrowed

The result is a copy of `model` (its class and code, the caller's model untouched) in which each
tensor a narrowing replaced holds the compressed value, and each layer module states its new
width (in_features / out_features, in_channels / out_channels). Rewrites of other kinds are not
carried over: the model's code computes what they folded (they are listed in the log). The copy
is checked against the compressed module on the example compress kept, with the tolerance
compress used; it is refused (CompressError) when it differs, as it does when a narrowed tensor
was also changed by a rewrite that changed the graph (a BatchNorm folded into a convolution, a
width written into a reshape).

A configuration that states one width for all layers (config.ffn_dim) no longer describes the
narrowed model: save it with torch.save or egp_fx.save, not save_pretrained/from_pretrained.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter

import torch
from torch import fx, nn

from egp_fx.capture import capture_info
from egp_fx.capture.export_trace import fixed_keywords
from egp_fx.errors import CompressError
from egp_fx.ir.attrs import attr
from egp_fx.ir.batches import Batch
from egp_fx.ir.compare import ErrorMeter, tensor_leaves
from egp_fx.passes.base import RewriteKind
from egp_fx.pipeline.report import EXAMPLE_META_KEY, report_of

log = logging.getLogger(__name__)

NARROWING = RewriteKind.NARROW_CHANNELS


def _model_name(name: str, prefix: str) -> str:
    if prefix and not name.startswith(prefix):
        raise CompressError(f"into_model: {name} is not under the model's path prefix {prefix!r}")
    return name[len(prefix):]


def _replacements(compressed: fx.GraphModule, model: nn.Module) -> dict[str, torch.Tensor]:
    """Model tensor path -> the compressed value, for every tensor a narrowing replaced."""
    report = report_of(compressed)
    info = capture_info(compressed) or report.capture
    prefix = info.prefix if info is not None else ""
    transposed = set(getattr(info, "transposed", ()))
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    out = {}
    for rewrite in report.applied:
        if rewrite.kind != NARROWING:
            continue
        if not rewrite.tensors:
            raise CompressError(f"into_model: the narrowing at {rewrite.path} does not name the "
                                "tensors it replaced (a result of an older egp_fx)")
        for name in rewrite.tensors:
            path = _model_name(name, prefix)
            if path not in own:
                raise CompressError(f"into_model: the narrowing at {rewrite.path} replaced "
                                    f"{path}, which {type(model).__name__} does not hold")
            value = attr(compressed, name)
            out[path] = value.t() if name in transposed else value
    return out


def _state_widths(module: nn.Module) -> None:
    """The width attributes of a layer module follow its (narrowed) weight."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        module.nf = w.shape[1]          # Hugging Face's Conv1D: weight [in, out], forward reads nf


def _copy_with(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `model` in which the tensors at `values`' paths hold those values (the
    replaced originals are not copied first)."""
    memo = {}
    for path, value in values.items():
        owner, _, name = path.rpartition(".")
        old = getattr(model.get_submodule(owner), name)
        new = value.detach().clone().to(device=old.device, dtype=old.dtype)
        memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else new
    out = copy.deepcopy(model, memo)
    for path in values:
        _state_widths(out.get_submodule(path.rpartition(".")[0]))
    return out


def _check(result: nn.Module, compressed: fx.GraphModule, example: Batch, tolerance: float) -> float:
    call = Batch(example.args, {**example.kwargs, **fixed_keywords(result)}) \
        if example.kwargs else example
    meter = ErrorMeter()
    advice = ("a rewrite that changed the graph also changed a narrowed layer, or a tensor the "
              "narrowing missed. Use the compressed module, or compress with passes that only "
              "narrow")
    with torch.no_grad():
        try:
            out = call(result)
        except Exception as err:  # noqa: BLE001  (a copy that cannot run is a refused copy)
            raise CompressError(f"into_model: {type(result).__name__} with the narrowed tensors "
                                f"differs from the compressed module: it fails to run "
                                f"({type(err).__name__}: {err}); {advice}") from err
        meter.add(tensor_leaves(out), tensor_leaves(example(compressed)))
    if meter.error > tolerance:
        raise CompressError(
            f"into_model: {type(result).__name__} with the narrowed tensors differs from the "
            f"compressed module (relative error {meter.error:.3g} > {tolerance:g}); {advice}")
    return meter.error


def into_model(compressed: fx.GraphModule, model: nn.Module) -> nn.Module:
    """`model`'s class holding the compressed narrowings (see the module docstring)."""
    if isinstance(model, fx.GraphModule):
        raise CompressError("into_model expects the model compress was given, not a GraphModule")
    report = report_of(compressed)
    values = _replacements(compressed, model)
    left = Counter(str(r.kind) for r in report.applied if r.kind != NARROWING)
    if not values:
        raise CompressError("into_model: compress narrowed no layer; nothing to put back "
                            f"(applied: {dict(left) or 'nothing'})")
    result = _copy_with(model, values).eval()
    example = getattr(compressed, "meta", {}).get(EXAMPLE_META_KEY)
    if example is None:
        raise CompressError("into_model needs the example compress kept (lost by a save and "
                            "load); call it on the result of compress")
    error = _check(result, compressed, example, report.tolerance)
    if left:
        log.info("into_model: %d narrowing(s) put back; not carried over (the model's code "
                 "computes them): %s", sum(r.kind == NARROWING for r in report.applied),
                 ", ".join(f"{n} {k}" for k, n in sorted(left.items())))
    log.info("into_model: %s matches the compressed module (relative error %.3g)",
             type(result).__name__, error)
    return result
