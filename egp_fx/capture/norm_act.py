"""Fused normalisation + activation modules, split into their parts before capture.

timm fuses a normalisation and an activation into one module. In eval mode each of these computes

    y = act(drop(norm(x)))

where `norm` is its torch base class's normalisation, `drop` an eval-mode no-op (nn.Identity or a
dropout) and `act` an activation module:

| class (timm.layers)   | norm in eval mode                                                   |
| BatchNormAct2d        | F.batch_norm with the running statistics: nn.BatchNorm2d.forward    |
| SyncBatchNormAct      | nn.SyncBatchNorm.forward, which is nn.BatchNorm2d's in eval mode    |
| FrozenBatchNormAct2d  | x * s + (b - m * s), s = w * rsqrt(v + eps): BatchNorm's eval map   |
| GroupNormAct          | F.group_norm (nn.GroupNorm.forward), when timm's fast norm is off   |
| GroupNorm1Act         | the same with one group                                             |
| LayerNormAct          | F.layer_norm (nn.LayerNorm.forward), when timm's fast norm is off   |

torchvision's FrozenBatchNorm2d (no activation) computes the same map as FrozenBatchNormAct2d.
`split_of` gives for each a NormAct(norm, drop, act), which canonical_modules swaps in before
capture, with `norm` a plain torch module holding the *same* tensors (nothing is copied; frozen
weights stay buffers), so the graph holds a BatchNorm call followed by an activation call, as in
a torchvision model, and fold_bn, dead_channels and linear_units apply unchanged. The activation keeps its module path
(`bn1.act`); the normalisation is named `bn1.norm`.

Only these exact classes are split (a subclass may compute something else), and only in eval
mode. FrozenBatchNorm's rsqrt and BatchNorm's 1/sqrt may differ in the last bit; the capture
is checked against the unchanged model either way (capture/__init__.py).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn


class NormAct(nn.Module):
    """act(drop(norm(x))): a fused norm+activation module as three torch modules."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x):
        return self.act(self.drop(self.norm(x)))


def _share(new: nn.Module, old: nn.Module, params: tuple[str, ...], buffers: tuple[str, ...]) -> nn.Module:
    """Bind old's tensors in new under the same names (parameters stay parameters, buffers
    buffers, whatever `new` registered for them); returns new in old's mode."""
    for name in params + buffers:
        new._parameters.pop(name, None)
        new._buffers.pop(name, None)
        t = old._parameters[name] if name in old._parameters else old._buffers.get(name)
        (new._parameters if name in old._parameters else new._buffers)[name] = t
    return new.train(old.training)


def _batch_norm(m) -> nn.Module:
    bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                        track_running_stats=m.track_running_stats, device="meta")
    return _share(bn, m, ("weight", "bias"), ("running_mean", "running_var", "num_batches_tracked"))


def _frozen_batch_norm(m) -> nn.Module:
    bn = nn.BatchNorm2d(m.weight.shape[0], eps=float(m.eps), affine=False, device="meta")
    bn = _share(bn, m, (), ("weight", "bias", "running_mean", "running_var"))
    bn.num_batches_tracked = None
    return bn


def _group_norm(m) -> nn.Module | None:
    if getattr(m, "_fast_norm", False):
        return None
    gn = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=m.affine, device="meta")
    return _share(gn, m, ("weight", "bias"), ())


def _layer_norm(m) -> nn.Module | None:
    if getattr(m, "_fast_norm", False):
        return None
    ln = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                      bias=m.bias is not None or not m.elementwise_affine, device="meta")
    return _share(ln, m, ("weight", "bias"), ())


def _with_act(make_norm: Callable) -> Callable[[nn.Module], nn.Module | None]:
    def split(m: nn.Module) -> nn.Module | None:
        norm = make_norm(m)
        if norm is None:
            return None
        drop, act = getattr(m, "drop", None), getattr(m, "act", None)
        return NormAct(norm, nn.Identity() if drop is None else drop,
                       nn.Identity() if act is None else act).train(m.training)
    return split


# (module, class name) -> the replacement (None: leave the module as it is)
SPLITS: dict[tuple[str, str], Callable[[nn.Module], nn.Module | None]] = {
    ("timm.layers.norm_act", "BatchNormAct2d"): _with_act(_batch_norm),
    ("timm.layers.norm_act", "SyncBatchNormAct"): _with_act(_batch_norm),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): _with_act(_frozen_batch_norm),
    ("timm.layers.norm_act", "GroupNormAct"): _with_act(_group_norm),
    ("timm.layers.norm_act", "GroupNorm1Act"): _with_act(_group_norm),
    ("timm.layers.norm_act", "LayerNormAct"): _with_act(_layer_norm),
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): _frozen_batch_norm,
}


def split_of(mod: nn.Module) -> nn.Module | None:
    """The replacement of `mod` (see the module docstring), or None to keep it."""
    make = SPLITS.get((type(mod).__module__, type(mod).__name__))
    if make is None or mod.training:
        return None
    return make(mod)
