"""layer_stats(gm): one row per activation call, printable as a table and convertible to JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch.fx as fx

from egp_fx.ir.attrs import module_path

from .stats import EGP_META_KEY, ActivationStats


@dataclass
class LayerRow:
    node: str
    kind: str
    target: str               # module path of the call in the model
    channels: int
    channel_dim: int
    samples: int
    dead: list[int]
    constant: list[int]
    linear: list[int]
    egp_entropy: float
    easier_entropy: float
    min_margin: float      # smallest margin over channels in one exact region (0 if none)

    @property
    def state(self) -> str:
        n_dead, n_const, n_lin = len(self.dead), len(self.constant), len(self.linear)
        if n_dead == self.channels:
            return "dead"
        if n_dead + n_const + n_lin == self.channels:
            return "linear" if n_lin else "constant"
        return "mixed"


def _row(gm: fx.GraphModule, node: fx.Node, st: ActivationStats) -> LayerRow:
    """The row of one activation call; figures unrounded (the table rounds only for display)."""
    return LayerRow(node.name, st.kind, module_path(node, gm), st.num_channels, st.channel_dim,
                    st.n, st.dead_channels, st.constant_channels, st.linear_channels,
                    st.egp_entropy, st.easier_entropy, st.min_margin())


class LayerTable(list):
    """A list of LayerRow with a readable __str__ and to_json()."""

    def to_dicts(self) -> list[dict]:
        return [asdict(r) | {"state": r.state} for r in self]

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dicts(), **kw)

    def __str__(self) -> str:
        head = ("node", "module", "kind", "ch", "dead", "const", "linear", "H_egp", "H_easier",
                "margin", "state")
        rows = [(r.node, r.target, r.kind, str(r.channels), str(len(r.dead)), str(len(r.constant)),
                 str(len(r.linear)), f"{r.egp_entropy:.4f}", f"{r.easier_entropy:.4f}",
                 f"{r.min_margin:.3g}", r.state) for r in self]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def layer_stats(gm: fx.GraphModule) -> LayerTable:
    """One row per calibrated activation call of `gm` (the result of calibrate or compress)."""
    return LayerTable(_row(gm, n, n.meta[EGP_META_KEY]) for n in gm.graph.nodes
                      if isinstance(n.meta.get(EGP_META_KEY), ActivationStats))
