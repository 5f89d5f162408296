"""The rewrite passes: one file each, registered where they are written.

A pass module declares itself, its place in the default pipeline and what it reads:

    @register("dead_channels", positions=(40,), shapes=True)
    def run(gm, ctx): ...          # a generator of Candidate | Refusal (see base.py)

The default pipeline is every registered pass at each of its positions, in increasing order
(a pass may run more than once). The folding rules that fold_linear sweeps to a fixpoint
register with `fold_rule` (fold_common.py) in the same way. Adding a pass or a rule means adding
one file; nothing else lists them. `run_pass` is the driver: it applies the candidates a pass
proposes (all, or those `allow` admits), then cleans up the graph.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from .base import Candidate, PassContext, PassOutcome, Refusal, Rewrite


@dataclass(frozen=True)
class PassSpec:
    name: str
    run: Callable
    positions: tuple[float, ...]        # places in the default pipeline
    shapes: bool                        # needs node shapes (propagated once per pass)
    doc: str


PASSES: dict[str, PassSpec] = {}


def register(name: str, *, positions: tuple[float, ...] = (), shapes: bool = False):
    """Decorator: register a pass generator under `name`."""
    def wrap(run: Callable) -> Callable:
        doc = (run.__module__ and importlib.import_module(run.__module__).__doc__ or "").strip()
        PASSES[name] = PassSpec(name, run, tuple(positions), shapes, doc.split("\n", 1)[0])
        return run
    return wrap


def default_pipeline() -> tuple[str, ...]:
    """Every registered pass at each of its positions, in order."""
    slots = sorted((pos, name) for name, spec in PASSES.items() for pos in spec.positions)
    return tuple(name for _, name in slots)


def run_pass(name: str, gm: fx.GraphModule, ctx: PassContext,
             allow: Callable[[str], bool] | None = None) -> PassOutcome:
    """Run pass `name` on gm in place, applying the candidates `allow` admits (default: all)."""
    spec = PASSES[name]
    return drive(spec.run, gm, ctx, shapes=spec.shapes, allow=allow)


def drive(run: Callable, gm: fx.GraphModule, ctx: PassContext, *, shapes: bool = True,
          allow: Callable[[str], bool] | None = None) -> PassOutcome:
    """Run a pass generator `run(gm, ctx)` on gm in place (see run_pass)."""
    ctx.begin(gm, shapes)
    rewrites: list[Rewrite] = []
    refusals: list[Refusal] = []
    gen = run(gm, ctx)
    reply = None
    while True:
        try:
            item = gen.send(reply)
        except StopIteration:
            break
        reply = None
        if isinstance(item, Refusal):
            refusals.append(item)
        elif isinstance(item, Candidate) and (allow is None or allow(item.key)):
            reply = item.apply()
            rewrites.append(reply)
    finish(gm, bool(rewrites))
    return PassOutcome(gm, bool(rewrites), rewrites, refusals)


def drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers that neither a get_attr node nor a called module reads."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) + "." for n in gm.graph.nodes if n.op == "call_module"}
    for mod_path, mod in list(gm.named_modules()):
        prefix = f"{mod_path}." if mod_path else ""
        if any(prefix.startswith(c) for c in called):
            continue
        for group in (mod._parameters, mod._buffers):
            for name in list(group):
                if f"{prefix}{name}" not in read:
                    del group[name]


def finish(gm: fx.GraphModule, modified: bool) -> None:
    """Common tail of every pass: clean the graph, check it, regenerate code."""
    if modified:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
