"""The registry of passes and their options, and the driver that runs one pass.

A pass module registers its generator under a name, saying whether it reads node shapes and
which frozen dataclass holds its options:

    @dataclass(frozen=True)
    class Options:
        channel_multiple: int = option(16, "keep narrowed widths a multiple of this")

    @register("dead_channels", shapes=True, options=Options)
    def run(gm, ctx): ...          # a generator of Candidate | Refusal (base.py)

An option is one field of one dataclass: compress takes it as a keyword argument
(collect_options), the command line as a flag (option_fields), and the pass reads it with
`ctx.options_of(Options)`. A name belongs to one pass's options only.

`run_pass` is the driver: it applies the candidates a pass proposes (all, or those `allow`
admits), then cleans up the graph.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.fx as fx

from egp_fx.errors import CompressError

from .base import Candidate, PassContext, PassOutcome, Refusal, Rewrite


@dataclass(frozen=True)
class PassSpec:
    name: str
    run: Callable
    shapes: bool                        # needs node shapes (propagated once per pass)
    options: type | None                # its options dataclass
    doc: str


PASSES: dict[str, PassSpec] = {}


def register(name: str, *, shapes: bool = False, options: type | None = None):
    """Decorator: register a pass generator under `name`, with its options dataclass."""
    def wrap(run: Callable) -> Callable:
        if options is not None:
            _check_names(name, options)
        module = sys.modules.get(run.__module__)
        doc = (getattr(module, "__doc__", None) or "").strip()
        PASSES[name] = PassSpec(name, run, shapes, options, doc.split("\n", 1)[0])
        return run
    return wrap


# ----------------------------------------------------------------------------------- options

def option(default, help: str, *, choices: tuple | None = None):
    """A field of a pass's options dataclass: its default, and the help of its command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class OptionField:
    """One option as the command line sees it."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None
    owner: str                          # the pass it belongs to


def _option_classes() -> dict[type, str]:
    """Every registered options dataclass, with the pass that registered it first."""
    out: dict[type, str] = {}
    for spec in PASSES.values():
        if spec.options is not None:
            out.setdefault(spec.options, spec.name)
    return out


def _check_names(name: str, options: type) -> None:
    taken = {f.name: owner for cls, owner in _option_classes().items() if cls is not options
             for f in dataclasses.fields(cls)}
    clash = [f.name for f in dataclasses.fields(options) if f.name in taken]
    if clash:
        raise ValueError(f"pass {name}: option(s) {clash} already belong to "
                         f"{sorted({taken[c] for c in clash})}")


def option_fields() -> list[OptionField]:
    """Every option of the registered passes, in registration order."""
    out = []
    for cls, owner in _option_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append(OptionField(f.name, hints[f.name], f.default, f.metadata.get("help", ""),
                                   f.metadata.get("choices"), owner))
    return out


def collect_options(given: Mapping[str, object]) -> dict[type, object]:
    """Each registered pass's options dataclass with the `given` values that belong to it (the
    rest at their defaults; a value None counts as not given). CompressError names an option no
    pass has."""
    given = {k: v for k, v in given.items() if v is not None}
    classes = _option_classes()
    known = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise CompressError(f"unknown option(s) {unknown}; the passes take: {sorted(known)}")
    return {cls: cls(**{k: v for k, v in given.items() if known[k] is cls}) for cls in classes}


# ------------------------------------------------------------------------------------ driver

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
