"""Weight masks that hold through any optimizer: a parametrization of each pruned weight.

For every pruned parameter W of the model (a conv/linear weight, by name), the pruner registers
torch.nn.utils.parametrize's

    module.weight  :=  W_orig * M        M a bool buffer of W's shape (False: pruned)

so the forward pass, and the gradient (dL/dW_orig = dL/dW * M), only ever see the kept weights,
whatever the optimizer does to W_orig (momentum, Adam's moments, weight decay): no code runs after
the optimizer's step. W_orig is the model's own Parameter object (parametrize keeps it), so an
optimizer made before the pruner still updates it. Pruning also zeroes W_orig where M is False,
so the state dict holds zeros there until an optimizer's momentum moves them; the masked value
is the one that counts. M lives in the module (`<module>.parametrizations.weight.0.mask`), so it
is saved and loaded with model.state_dict(), broadcast by DistributedDataParallel with the other
buffers, and read by torch.compile as an input: masks are changed in place, never rebound.

    remove()         W := W_orig * M as a plain Parameter again (the same object), no
                     parametrization left: a plain model
    plain_view()     a copy of the module tree sharing every tensor, with each masked weight
                     replaced by its masked value (a new tensor): what the entropy pass and
                     compress capture, so the captured graph holds plain weights
    plain_state()    the model's state dict with plain keys (`conv1.weight`) and masked values
    load_plain()     the inverse: plain weights in, masks = (W != 0)

A mask is taken from the weight's zeros when it is attached (mask = W != 0), so a checkpoint of
plain weights with zeros is all it takes to resume.
"""
from __future__ import annotations

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from egp_fx.errors import PruneError
from egp_fx.ir.copying import structural_copy

ORIGINAL = "original"


class WeightMask(nn.Module):
    """The parametrization W_orig -> W_orig * mask (mask: a bool buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().bool())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def split_name(name: str) -> tuple[str, str]:
    """'layer1.0.conv1.weight' -> ('layer1.0.conv1', 'weight')."""
    owner, _, tensor = name.rpartition(".")
    return owner, tensor


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, tensor = split_name(name)
    return (model.get_submodule(path) if path else model), tensor


def _mask_module(model: nn.Module, name: str) -> WeightMask | None:
    owner, tensor = _owner(model, name)
    if not parametrize.is_parametrized(owner, tensor):
        return None
    found = [p for p in owner.parametrizations[tensor] if isinstance(p, WeightMask)]
    return found[0] if found else None


def plain_key(key: str) -> str | None:
    """The plain state-dict key of a parametrized one ('a.parametrizations.weight.original' ->
    'a.weight'); None for a mask buffer; the key itself otherwise."""
    parts = key.split(".")
    if "parametrizations" not in parts:
        return key
    i = parts.index("parametrizations")
    if parts[-1] == ORIGINAL and len(parts) == i + 3:
        return ".".join(parts[:i] + [parts[i + 1]])
    return None


class Masks:
    """The masks of a model's pruned weights (see the module docstring), by parameter name."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model
        self.names = list(names)
        params = dict(model.named_parameters())
        for name in self.names:
            if _mask_module(model, name) is not None:
                continue                                   # attached before (a second pruner)
            if name not in params:
                raise PruneError(f"{name} is not a parameter of {type(model).__name__}")
            owner, tensor = _owner(model, name)
            order = list(owner._parameters)
            parametrize.register_parametrization(owner, tensor, WeightMask(params[name] != 0))
            owner.parametrizations[tensor].egp_order = order

    # ---------------------------------------------------------------- reading
    def mask(self, name: str) -> torch.Tensor:
        """The mask buffer itself (bool, True: kept)."""
        found = _mask_module(self.model, name)
        if found is None:
            raise PruneError(f"{name} carries no mask (was remove() called?)")
        return found.mask

    def original(self, name: str) -> nn.Parameter:
        owner, tensor = _owner(self.model, name)
        return owner.parametrizations[tensor].original

    @torch.no_grad()
    def weight(self, name: str) -> torch.Tensor:
        """The masked weight W_orig * M (a new tensor, no grad)."""
        return self.original(name).detach() * self.mask(name)

    def all(self) -> dict[str, torch.Tensor]:
        return {n: self.mask(n) for n in self.names}

    def remaining(self) -> dict[str, int]:
        return {n: int(self.mask(n).sum()) for n in self.names}

    # ---------------------------------------------------------------- writing
    @torch.no_grad()
    def set(self, name: str, mask: torch.Tensor) -> None:
        """Make `mask` the mask of `name` (in place) and zero the pruned entries of W_orig."""
        held = self.mask(name)
        if mask.shape != held.shape:
            raise PruneError(f"the mask for {name} has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(held.shape)}")
        held.copy_(mask.to(held.device, torch.bool))
        self.original(name).masked_fill_(~held, 0.0)

    @torch.no_grad()
    def reset_from_zeros(self) -> None:
        """mask = (W_orig != 0) for every name (after plain weights were loaded)."""
        for n in self.names:
            self.mask(n).copy_(self.original(n) != 0)

    def remove(self) -> None:
        """Bake W_orig * M into W (the same Parameter object) and drop the parametrizations."""
        for name in self.names:
            if _mask_module(self.model, name) is None:
                continue
            owner, tensor = _owner(self.model, name)
            order = getattr(owner.parametrizations[tensor], "egp_order", [])
            parametrize.remove_parametrizations(owner, tensor, leave_parametrized=True)
            _reorder(owner, order)

    # ---------------------------------------------------------------- plain forms
    def plain_view(self) -> nn.Module:
        """A copy of the model (sharing its tensors) whose masked weights are plain tensors."""
        view = structural_copy(self.model)
        for name in self.names:
            owner, tensor = _owner(view, name)
            held = owner.parametrizations
            if len(held) > 1 or len(held[tensor]) > 1:
                raise PruneError(f"{split_name(name)[0]} has parametrizations besides the mask of "
                                 f"{name}; the pruner cannot take a plain view of it")
            value = getattr(owner, tensor).detach()
            # this copy alone goes back to its own class (parametrize gave it a subclass)
            del owner._modules["parametrizations"]
            owner.__class__ = type(owner).__bases__[0]
            order = getattr(held[tensor], "egp_order", [])
            owner.register_parameter(tensor, nn.Parameter(value, requires_grad=False))
            _reorder(owner, order)
        return view

    def plain_state(self) -> dict[str, torch.Tensor]:
        """The state dict with plain keys, the masked weights in place of W_orig."""
        out = {}
        for key, value in self.model.state_dict().items():
            plain = plain_key(key)
            if plain is not None:
                out[plain] = value
        for name in self.names:
            out[name] = self.weight(name)
        return out

    def load_plain(self, state: dict[str, torch.Tensor]) -> None:
        """Load plain weights (plain_state()'s form) into the model; masks from their zeros."""
        mine = {plain_key(k): k for k in self.model.state_dict() if plain_key(k) is not None}
        renamed = {}
        for key, value in state.items():
            if key not in mine:
                raise PruneError(f"the weights hold {key}, which the model does not")
            renamed[mine[key]] = value
        missing = sorted(set(mine) - set(state))
        if missing:
            raise PruneError(f"the weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        masks = {k: v for k, v in self.model.state_dict().items() if plain_key(k) is None}
        try:
            self.model.load_state_dict({**renamed, **masks})
        except RuntimeError as err:
            raise PruneError(f"the weights do not fit the model: {err}") from err
        self.reset_from_zeros()


def _reorder(module: nn.Module, order: list[str]) -> None:
    """Put the module's parameters back in their order before the mask (state-dict order)."""
    params = module._parameters
    for key in [k for k in order if k in params] + [k for k in params if k not in order]:
        params[key] = params.pop(key)


def is_masked(model: nn.Module) -> bool:
    """Does any module of `model` carry a WeightMask?"""
    return any(isinstance(m, WeightMask) for m in model.modules())


@torch.no_grad()
def prune_smallest(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """The mask with the n smallest-|w| weights among those still in `mask` removed (ties
    broken by position, so the count is exact); `weight` and `mask` are not changed."""
    alive = torch.nonzero(mask.flatten()).flatten()
    n = min(int(n), alive.numel())
    if n <= 0:
        return mask.clone()
    mags = weight.detach().flatten()[alive].abs()
    order = torch.sort(mags, stable=True).indices[:n]
    new = mask.flatten().clone()
    new[alive[order]] = False
    return new.view_as(mask)
