"""EGPPruner: EGP (or IMP) as one step in the user's own training loop.

    pruner = EGPPruner(model, calib_loader, ratio=0.5)    # masks attached to `model` itself
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)                  # any optimizer, DDP, torch.compile
        pruner.step()                                      # one pruning round
    pruner.remove()                                        # a plain model, zeros where pruned

Construction captures the model once, on the first calibration batch (`capture`: "auto" tries
torch.fx, then torch.export; "fx"; "export"), finds the prunable layers on the graph
(layers.py: a conv/linear feeding a ReLU-like activation, GELU or SiLU), maps them to the model's
parameters by module path, and attaches a mask to each weight it prunes (masks.py; mask = W != 0,
so zeros already in the model stay zero). EGP prunes the prunable layers; IMP the scope
`imp_scope`: "all" conv/linear layers (the reference's baseline) or the "prunable" ones.

step() runs one round, as the EGP reference code does:

    1. entropy pass: calibrate() a plain view of the model (masked weights as plain tensors,
       a copy in eval mode: the model keeps its mode, its BatchNorm statistics and its
       parameters) on calib_loader (its first `calib_batches` batches); H_l is the EGP entropy
       of the activation calls layer l feeds (record.layer_entropy), found again on this
       capture by weight name
    2. EGP: n_l = allocation.allocate(H_l, mean |w| over the kept weights, kept count, ratio);
       the n_l smallest |w| of layer l leave its mask (L1, unstructured)
       IMP: the smallest-|w| `ratio` of the kept weights of the scope leave, globally (imp.py)
    3. across ranks (`distributed`: the default process group, when one is initialised), the
       statistics are reduced in calibrate() and every rank computes the same masks from the
       same weights; their digests are compared, and a difference stops every rank

step(stats=gm) skips the pass and uses a GraphModule from entropy_pass() on the current weights.

The pruner works on the model it is given, in place, as a training loop needs: the masks are
parametrizations of its weights (`conv1.parametrizations.weight.original` and `...0.mask` in its
state dict) until remove() bakes them in. Make the pruner before wrapping the model in
DistributedDataParallel or torch.compile (a wrapped model is accepted too: the pruner works on
the module inside). Masks hold through every optimizer step with no code of the caller's, and are
saved and loaded with model.state_dict() as well as with the pruner's own state_dict().
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from torch import nn

from egp_fx import distributed as ranks
from egp_fx.calibrate import ranks as calibration_ranks
from egp_fx.calibrate.calibration import calibrate
from egp_fx.capture import CAPTURES, capture_info, trace
from egp_fx.distributed import training as across
from egp_fx.errors import PruneError
from egp_fx.ir.batches import Batch, as_batch

from .allocation import ROUNDINGS, Allocation, allocate
from .imp import global_magnitude_prune
from .layers import PRUNED_KINDS, PrunableLayer, find_prunable, find_weighted, layer_key
from .masks import Masks, is_masked, prune_smallest
from .record import compress_summary, layer_entropy, make_record
from .runlog import IterationRecord

log = logging.getLogger(__name__)
METHODS = ("egp", "imp")
IMP_SCOPES = ("all", "prunable")
STATE_VERSION = 1


@dataclass
class PruneStep:
    """What one step() did."""

    round: int                                     # 1 for the first step
    method: str
    budget: int                                    # weights pruned this round
    pruned: dict[str, int]                         # per layer (module path)
    emptied: list[str] = field(default_factory=list)          # layers whose last weights went
    excluded: dict[str, str] = field(default_factory=dict)    # layer -> why it was not in the pool
    entropy: dict[str, float] = field(default_factory=dict)   # H_l the allocation read (EGP)
    allocation: Allocation | None = None

    def as_dict(self) -> dict:
        """The step as the run log records it (no Allocation object)."""
        out = asdict(self)
        out.pop("allocation")
        return out


def check_options(method: str, ratio: float, imp_scope: str, capture: str = "auto",
                  rounding: str = "largest_remainder") -> None:
    if method not in METHODS:
        raise PruneError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise PruneError(f"ratio (the share of the remaining weights pruned per round) must be in "
                         f"(0, 1], got {ratio}")
    if imp_scope not in IMP_SCOPES:
        raise PruneError(f"imp_scope must be one of {IMP_SCOPES}, got {imp_scope!r}")
    if capture not in CAPTURES:
        raise PruneError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if rounding not in ROUNDINGS:
        raise PruneError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _first(loader: Iterable, input_key: str | None) -> Batch | None:
    for item in loader:
        return as_batch(item, input_key)
    return None


class EGPPruner:
    """EGP or IMP pruning rounds in the caller's training loop (see the module docstring)."""

    def __init__(self, model: nn.Module, calib_loader: Iterable, ratio: float = 0.5, *,
                 capture: str = "auto", input_key: str | None = None, method: str = "egp",
                 imp_scope: str = "all", calib_batches: int | None = None,
                 kinds: frozenset[str] = PRUNED_KINDS, rounding: str = "largest_remainder",
                 example=None, distributed: bool | None = None):
        check_options(method, ratio, imp_scope, capture, rounding)
        self.model = unwrap(model)
        if is_masked(self.model):
            raise PruneError(f"{type(self.model).__name__} already carries pruning masks: "
                             "remove() the other pruner first (or load_state_dict into it)")
        self.calib_loader, self.ratio, self.method = calib_loader, float(ratio), method
        self.imp_scope, self.input_key, self.calib_batches = imp_scope, input_key, calib_batches
        self.kinds, self.rounding = frozenset(kinds), rounding
        self.spread = ranks.enabled(distributed)
        self.round = 0
        self.steps: list[PruneStep] = []
        self.removed = False
        with ranks.together("EGPPruner: set-up", self.spread):
            gm = self._capture(calib_loader if example is None else [example], capture)
        self.capture = capture_info(gm).mode if capture_info(gm) is not None else capture
        self.layers: list[PrunableLayer] = find_prunable(gm, self.model, self.kinds)
        if not self.layers:
            raise PruneError(f"{type(self.model).__name__} has no prunable layer: no conv/linear "
                             f"feeds an activation of the kinds {sorted(self.kinds)}")
        self.weighted: list[str] = find_weighted(gm, self.model)
        self.pruned = self.weighted if method == "imp" and imp_scope == "all" \
            else [lay.weight for lay in self.layers]
        self.masks = Masks(self.model, self.pruned)
        log.info("EGPPruner: %d prunable layers, %d weights masked (%s, %s)", len(self.layers),
                 len(self.pruned), method, self.capture)

    def _capture(self, loader: Iterable, mode: str) -> fx.GraphModule:
        first = _first(loader, self.input_key)
        device = next(self.model.parameters(), torch.empty(0)).device
        if self.spread:
            first, _ = calibration_ranks.first_batch(first, device, self.model)
        if first is None:
            raise PruneError("the calibration loader yielded no batches")
        return trace(self.model, first.to(device).head(2), capture=mode)

    # ---------------------------------------------------------------- names
    @property
    def layer_names(self) -> list[str]:
        """The prunable layers by module path."""
        return [lay.module for lay in self.layers]

    @property
    def pruned_names(self) -> list[str]:
        """The layers that carry a mask, by module path."""
        return [layer_key(n) for n in self.pruned]

    # ---------------------------------------------------------------- the round
    def _check_live(self) -> None:
        if self.removed:
            raise PruneError("this pruner's masks were removed (remove()); make a new pruner")

    def entropy_pass(self) -> fx.GraphModule:
        """Calibrate a plain view of the model (eval mode, a copy) on the calibration batches."""
        self._check_live()
        view = self.masks.plain_view().eval()
        return calibrate(view, self.calib_loader, max_batches=self.calib_batches,
                         input_key=self.input_key, progress=False, capture_mode=self.capture,
                         distributed=self.spread)

    def layers_in(self, gm: fx.GraphModule) -> list[PrunableLayer]:
        """The prunable layers with the activation calls they feed in `gm` (found again)."""
        found = {lay.weight: lay for lay in find_prunable(gm, {lay.weight for lay in self.layers},
                                                          self.kinds)}
        missing = [lay.module for lay in self.layers if lay.weight not in found]
        if missing:
            raise PruneError(f"the entropy pass's capture feeds no activation from {missing}; "
                             "the model changed since the pruner was made")
        return [found[lay.weight] for lay in self.layers]

    def step(self, stats: fx.GraphModule | None = None) -> PruneStep:
        """One pruning round (see the module docstring); the model keeps its train/eval mode."""
        self._check_live()
        was_training = self.model.training
        try:
            gm = stats if stats is not None else self.entropy_pass()
            done = self._egp(gm) if self.method == "egp" else self._imp()
        finally:
            self.model.train(was_training)
        if self.spread:
            across.check_identical(self.masks.all(), f"the masks of round {self.round + 1}")
        self.round += 1
        self.steps.append(done)
        log.info("%s round %d: %d weights pruned, emptied %s", self.method, self.round,
                 done.budget, done.emptied)
        return done

    def _egp(self, gm: fx.GraphModule) -> PruneStep:
        layers = self.layers_in(gm)
        entropy = layer_entropy(gm, layers)
        remaining, mean_abs = {}, {}
        for lay in layers:
            mask = self.masks.mask(lay.weight)
            remaining[lay.module] = int(mask.sum())
            w = self.masks.weight(lay.weight)
            mean_abs[lay.module] = float(w[mask].abs().double().mean()) \
                if remaining[lay.module] else 0.0
        alloc = allocate(entropy, mean_abs, remaining, self.ratio, rounding=self.rounding)
        log.debug("EGP allocation: %d passes, emptied %s, excluded %s", alloc.passes,
                  alloc.emptied, alloc.excluded)
        for lay in layers:
            n = alloc.prune.get(lay.module, 0)
            if n:
                self.masks.set(lay.weight, prune_smallest(self.masks.weight(lay.weight),
                                                          self.masks.mask(lay.weight), n))
        return PruneStep(self.round + 1, "egp", alloc.pruned, dict(alloc.prune),
                         list(alloc.emptied), dict(alloc.excluded), entropy, alloc)

    def _imp(self) -> PruneStep:
        masks = self.masks.all()
        before = {n: int(m.sum()) for n, m in masks.items()}
        weights = {n: self.masks.weight(n) for n in self.pruned}
        new, lost = global_magnitude_prune(weights, masks, self.ratio)
        for name in self.pruned:
            self.masks.set(name, new[name])
        pruned = {layer_key(n): k for n, k in lost.items()}
        emptied = [layer_key(n) for n, k in lost.items() if k and k == before[n]]
        return PruneStep(self.round + 1, "imp", sum(lost.values()), pruned, emptied)

    # ---------------------------------------------------------------- reading
    @property
    def sparsity(self) -> float:
        """The share of pruned weights over the prunable layers."""
        kept = total = 0
        for lay in self.layers:
            mask = self.masks.mask(lay.weight)
            kept += int(mask.sum())
            total += mask.numel()
        return 1 - kept / total

    def plain_view(self) -> nn.Module:
        """A copy of the model sharing its tensors, with the masked weights as plain tensors."""
        self._check_live()
        return self.masks.plain_view()

    def report(self, *, stats: fx.GraphModule | None = None, compress: bool = True,
               compress_loader: Iterable | None = None, compress_options: dict | None = None
               ) -> IterationRecord:
        """The model as it is now: per-layer entropy (a fresh entropy pass unless `stats`),
        sparsity, the last step's allocation (budget, pruned, emptied, excluded), zero-entropy
        and dead/linear activation calls, and, with `compress`, what egp_fx.compress removes
        from the plain view (calibrated on `compress_loader`, default: the calibration batches,
        reusing the statistics of the pass)."""
        self._check_live()
        was_training = self.model.training
        try:
            gm = stats if stats is not None else self.entropy_pass()
            view = self.masks.plain_view().eval()
            last = self.steps[-1].as_dict() if self.steps else {}
            rec = make_record(self.round, self.method, view, gm, self.layers_in(gm),
                              self.weighted, last, None)
            if compress:
                reuse = compress_loader is None
                rec.compress = compress_summary(
                    view, self.calib_loader if reuse else compress_loader, gm if reuse else None,
                    {**(compress_options or {}), "distributed": self.spread})
        finally:
            self.model.train(was_training)
        return rec

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The pruner's state: options, round, steps and the masks (bool tensors on the CPU)."""
        return {"version": STATE_VERSION, "method": self.method, "ratio": self.ratio,
                "imp_scope": self.imp_scope, "round": self.round,
                "layers": self.layer_names, "pruned": list(self.pruned),
                "masks": {n: m.detach().cpu().clone() for n, m in self.masks.all().items()},
                "steps": [s.as_dict() for s in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        """Restore masks, round and steps from state_dict() (of a pruner of the same model,
        method and scope); the masked weights of the model are set to zero."""
        self._check_live()
        for key in ("method", "imp_scope"):
            if state.get(key) != getattr(self, key):
                raise PruneError(f"the state is of a pruner with {key} {state.get(key)!r}, this "
                                 f"one has {getattr(self, key)!r}")
        if list(state.get("pruned", [])) != list(self.pruned):
            raise PruneError(f"the state masks {state.get('pruned')}, this pruner "
                             f"{self.pruned}: not the same model")
        for name, mask in state["masks"].items():
            self.masks.set(name, mask)
        self.round = int(state["round"])
        self.steps = [PruneStep(**s) for s in state.get("steps", [])]

    # ---------------------------------------------------------------- the end
    def remove(self) -> nn.Module:
        """Bake the masks into the weights (W := W * mask, the same Parameter objects) and
        drop the parametrizations: the model is a plain model again. Returns it."""
        self._check_live()
        self.masks.remove()
        self.removed = True
        return self.model
