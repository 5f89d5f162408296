"""Before and after, side by side: one row per block, one glyph per layer, coloured by its fate.

Each row is a block of the model (blocks.py: `layer2.0`, `layers.1.blocks.0`); consecutive
top-level blocks of one or two layers (conv1, bn1, relu, maxpool) share a row, and rows of one
stage sit on one background band. Per row the left panel shows the block's layers in the
original graph and the right panel what is left of them, as glyphs in graph order:

    C conv   L linear   M matmul   N norm   + add   | concat   P pool   R/G/S.. activation
    F any other op that does FLOPs (a fused attention function, for one)

Colours say what happened (struck-out glyphs are gone after compression): kept, removed,
folded (into a neighbour), linearised (activation replaced by an affine map), narrowed
(channels deleted, or reshaped by a fold), absorbed a fold (kept, weights changed), added by a
rewrite. The right margin gives the change in conv/linear and activation counts, parameters
and FLOPs.
Drawn with matplotlib's object API (no pyplot state), saved as SVG and PNG.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import networkx as nx
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle

from .blocks import INPUT_BLOCK, OUTPUT_BLOCK, stage_of

UNIT = 0.22          # inches per layout unit
ROW = 1.25           # row pitch, units
FATES = {            # fate -> (face, edge, struck out, legend text)
    "kept": ("#cfdbe8", "#4a5a6a", False, "kept"),
    "removed": ("#ececec", "#9a9a9a", True, "removed"),
    "folded": ("#f5b26b", "#b35c00", True, "folded into a neighbour"),
    "linearised": ("#86d3a0", "#2e7d4f", True, "linearised"),
    "narrowed": ("#f4dc6b", "#9a7d00", False, "narrowed / reshaped"),
    "absorbed": ("#cfdbe8", "#d35400", False, "absorbed a fold (weights changed)"),
    "added": ("#c9b0ea", "#6a3d9a", False, "added by a rewrite"),
}
_ROLE_LETTER = {"conv": "C", "linear": "L", "matmul": "M", "norm": "N", "add": "+", "concat": "|",
                "pool": "P", "compute": "F"}
_ACT_LETTER = {"relu": "R", "relu6": "R6", "leaky_relu": "LR", "hardtanh": "HT", "gelu": "G",
               "silu": "S", "hardswish": "HS"}
_WIDTH = {"norm": 0.6, "add": 0.6, "concat": 0.6}   # glyph pitch; others 1.0


@dataclass
class _Row:
    label: str
    stage: str
    blocks: list[str]
    mergeable: bool = False       # made of small top-level blocks only
    before: list[dict] = field(default_factory=list)
    after: list[dict] = field(default_factory=list)


def fate(attrs: dict) -> str:
    """The colour key of one annotated node (graph.py attributes)."""
    status, cat = attrs.get("status", "kept"), attrs.get("category", "")
    if status == "folded":
        return "folded"
    if status == "removed":
        return "linearised" if cat == "linearised" else "removed"
    if status == "added":
        return "added"
    if cat == "narrowed" or (status == "modified" and "] -> [" in attrs.get("change", "")):
        return "narrowed"
    return "absorbed" if status == "modified" else "kept"


def _glyph_nodes(g: nx.DiGraph) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name, a in g.nodes(data=True):
        if a["block"] in (INPUT_BLOCK, OUTPUT_BLOCK):
            continue
        out.setdefault(a["block"], [])
        if a["role"] in _ROLE_LETTER or a["role"] == "act":
            out[a["block"]].append({"name": name, **a})
    return out


def _rows(before: nx.DiGraph, after: nx.DiGraph) -> list[_Row]:
    gb, ga = _glyph_nodes(before), _glyph_nodes(after)
    rows: list[_Row] = []
    for block in dict.fromkeys([*gb, *ga]):
        b, a = gb.get(block, []), ga.get(block, [])
        if not b and not a:
            continue
        small = "." not in block and len(b) <= 2 and len(a) <= 2
        last = rows[-1] if rows else None
        if small and last is not None and last.mergeable and len(last.before) + len(b) <= 8:
            last.blocks.append(block)
            last.before += b
            last.after += a
            last.label = f"{last.blocks[0]} … {block}"
            continue
        stage = stage_of(block) if "." in block else ""
        rows.append(_Row(block, stage if stage != block else "", [block], small, b, a))
    return rows


def _letter(a: dict) -> str:
    if a["role"] == "act":
        return _ACT_LETTER.get(a["activation"], "σ")
    return _ROLE_LETTER[a["role"]]


def _pitch(a: dict) -> float:
    return _WIDTH.get(a["role"], 1.0)


def _draw_glyph(ax, x: float, y: float, a: dict) -> None:
    face, edge, struck, _ = FATES[fate(a)]
    role, w = a["role"], _pitch(a) - 0.2
    lw = 1.4 if fate(a) in ("absorbed", "narrowed", "added") else 0.7
    if role in ("act", "add", "concat"):
        r = 0.38 if role == "act" else 0.22
        ax.add_patch(Circle((x + w / 2, y), r, facecolor=face, edgecolor=edge, linewidth=lw))
    else:
        pad = 0.18 if role == "pool" else 0.06
        ax.add_patch(FancyBboxPatch((x + pad, y - 0.4 + pad), w - 2 * pad, 0.8 - 2 * pad,
                                    boxstyle=f"round,pad={pad}", facecolor=face, edgecolor=edge,
                                    linewidth=lw))
    color = "#888888" if struck else "#1d2b38"
    ax.text(x + w / 2, y, _letter(a), ha="center", va="center", fontsize=5.5 if role in
            ("norm", "add", "concat") else 6.5, color=color, family="DejaVu Sans")
    if struck:
        ax.add_line(Line2D([x - 0.02, x + w + 0.02], [y + 0.42, y - 0.42], color="#c0392b",
                           linewidth=1.0))


def _strip_width(nodes: list[dict]) -> float:
    return sum(_pitch(a) for a in nodes)


def _draw_strip(ax, x0: float, y: float, nodes: list[dict], empty_text: str) -> None:
    if not nodes:
        ax.text(x0 + 0.2, y, empty_text, ha="left", va="center", fontsize=6.5, color="#9a9a9a",
                style="italic")
        return
    x = x0
    for a in nodes:
        _draw_glyph(ax, x, y, a)
        x += _pitch(a)


def _count(nodes: list[dict], key: str) -> int:
    return sum(bool(a.get(key)) for a in nodes)


def _sums(g: nx.DiGraph, blocks: list[str]) -> tuple[int, int, int, int]:
    sel = [a for _, a in g.nodes(data=True) if a["block"] in blocks]
    return (sum(a["params"] for a in sel), sum(a["flops"] for a in sel), _count(sel, "weighted"),
            _count(sel, "nonlinear"))


def _pct(b: int, a: int) -> str:
    return "±0" if a == b else ("new" if b == 0 else f"{100 * (a - b) / b:+.0f}%")


def _row_note(before: nx.DiGraph, after: nx.DiGraph, row: _Row) -> tuple[str, bool]:
    pb, fb, wb, nb = _sums(before, row.blocks)
    pa, fa, wa, na = _sums(after, row.blocks)
    shown = {a["name"] for a in row.before}
    others = sum(1 for n, a in before.nodes(data=True) if a["block"] in row.blocks
                 and n not in shown and a["status"] in ("removed", "folded"))
    tail = f" · {others} other node{'s' * (others != 1)} removed" if others else ""
    if (pb, fb, wb, nb) == (pa, fa, wa, na) and not any(fate(a) != "kept" for a in row.before):
        return ("unchanged" + tail), bool(tail)
    return (f"conv/lin {wb}→{wa} · act {nb}→{na} · params {_pct(pb, pa)} · FLOPs {_pct(fb, fa)}"
            + tail, True)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _headline(before: nx.DiGraph, after: nx.DiGraph) -> str:
    tb = [sum(a[k] for _, a in before.nodes(data=True)) for k in ("params", "flops")]
    ta = [sum(a[k] for _, a in after.nodes(data=True)) for k in ("params", "flops")]
    db, da = before.graph, after.graph
    return (f"params {_human(tb[0])} → {_human(ta[0])} ({_pct(tb[0], ta[0])})   "
            f"FLOPs {_human(tb[1])} → {_human(ta[1])} ({_pct(tb[1], ta[1])})   "
            f"conv/linear depth {db.get('weighted_depth', '?')} → {da.get('weighted_depth', '?')}   "
            f"nonlinear depth {db.get('nonlinear_depth', '?')} → {da.get('nonlinear_depth', '?')}")


def _legend_layout(x0: float, width: float) -> list[tuple[str, float, int]]:
    """(fate, x, line) of each colour key, wrapped to `width`."""
    out, x, line = [], x0, 0
    for key, (_, _, _, text) in FATES.items():
        step = 1.6 + 0.3 * len(text)
        if x + step > width and x > x0:
            x, line = x0, line + 1
        out.append((key, x, line))
        x += step
    return out


def _draw_legend(ax, x0: float, y: float, width: float) -> None:
    layout = _legend_layout(x0, width)
    for key, x, line in layout:
        yy = y + 1.2 * line
        _draw_glyph(ax, x, yy, {"role": "conv", "status": "kept", "category": "", "change": "",
                                **_fake(key)})
        ax.text(x + 1.0, yy, FATES[key][3], va="center", fontsize=6.5, color="#333333")
    ax.text(x0, y + 1.2 * (layout[-1][2] + 1), "C conv  L linear  M matmul  N norm  + add  "
            "| concat  P pool  F other op with FLOPs  R relu  G gelu  S silu  σ other nonlinearity",
            va="center", fontsize=6.5, color="#333333")


def _fake(key: str) -> dict:
    """Node attributes that `fate` maps to `key` (for legend glyphs)."""
    return {"kept": {}, "removed": {"status": "removed"}, "folded": {"status": "folded"},
            "linearised": {"status": "removed", "category": "linearised"},
            "narrowed": {"category": "narrowed"}, "absorbed": {"status": "modified"},
            "added": {"status": "added"}}[key]


def before_after(before: nx.DiGraph, after: nx.DiGraph, *, title: str = "") -> Figure:
    """The side-by-side picture of two annotated graphs (graph.graph_of) as a Figure."""
    rows = _rows(before, after)
    label_w = max([len(r.label) for r in rows] + [8]) * 0.36 + 1.0
    panel_w = max([_strip_width(r.before) for r in rows] + [_strip_width(r.after) for r in rows]
                  + [6.0]) + 1.0
    note_w = 21.0
    x_before, x_after = label_w, label_w + panel_w + 1.0
    x_note = x_after + panel_w + 0.5
    width = x_note + note_w
    top = 3.6
    legend_lines = _legend_layout(0.4, width)[-1][2] + 2
    height = top + len(rows) * ROW + 1.0 + 1.2 * legend_lines + 0.6
    fig = Figure(figsize=(width * UNIT, height * UNIT))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.text(0.4, 0.9, title or "before / after compression", fontsize=10, weight="bold",
            va="center")
    ax.text(0.4, 2.0, _headline(before, after), fontsize=7, va="center", color="#333333")
    for x, text in ((x_before, "before (original graph)"), (x_after, "after (compressed graph)")):
        ax.text(x, top - 0.6, text, fontsize=8, weight="bold", va="center")
    band, prev_stage = 0, None
    for i, row in enumerate(rows):
        y = top + i * ROW + ROW / 2
        if row.stage != prev_stage or not row.stage:
            band += 1
            prev_stage = row.stage
        if band % 2:
            ax.add_patch(Rectangle((0.1, y - ROW / 2), width - 0.2, ROW, facecolor="#f4f6f8",
                                   edgecolor="none", zorder=-1))
        ax.text(0.4, y, row.label, fontsize=7, va="center", family="DejaVu Sans Mono")
        _draw_strip(ax, x_before, y, row.before, "")
        _draw_strip(ax, x_after, y, row.after, "(nothing left)")
        note, changed = _row_note(before, after, row)
        ax.text(x_note, y, note, fontsize=6.5, va="center",
                color="#1d2b38" if changed else "#9a9a9a")
    ax.add_line(Line2D([x_after - 0.5] * 2, [top - 0.2, top + len(rows) * ROW], color="#b0b7bf",
                       linewidth=0.8))
    _draw_legend(ax, 0.4, top + len(rows) * ROW + 1.0, width)
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: tuple[str, ...] = ("svg", "png"),
                dpi: int = 150) -> list[Path]:
    """Write `fig` as stem.<format> for each format (SVG keeps text as text); returns the paths."""
    paths = []
    for fmt in formats:
        path = Path(stem).with_suffix(f".{fmt}")
        if fmt == "svg":
            with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "egp_fx"}):
                fig.savefig(path, format="svg", metadata={"Date": None})
        else:
            fig.savefig(path, format=fmt, dpi=dpi)
        paths.append(path)
    return paths
