"""One self-contained HTML report of an Inspection: no scripts, no external URLs.

Sections: summary totals (before / after / change), the before-after picture and the EGP
entropy chart (inline SVG), the per-layer decision table, the diff per block and per node,
refusals and roll-backs, the passes, and benchmark numbers when given. CSS is inline; figures
are inline SVG with text kept as text; nothing is fetched when the page is opened.
"""
from __future__ import annotations

import html
import io
import json
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

from ._markup import html_table, percent_change

if TYPE_CHECKING:
    from . import Inspection

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;
 color:#1d2b38;max-width:1500px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5dbe1;
 padding-bottom:4px} p.sub{color:#5a6978;margin:0 0 12px}
table{border-collapse:collapse;font-size:12px;margin:6px 0} th,td{border:1px solid #d5dbe1;
 padding:3px 7px;text-align:left;vertical-align:top} th{background:#eef2f6;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums} tr.changed td{background:#fffbea}
.figure{overflow-x:auto;border:1px solid #e3e8ed;padding:6px;margin:8px 0}
.figure svg{max-width:100%;height:auto}
.chips span{display:inline-block;padding:2px 9px;margin:2px 4px 2px 0;border-radius:10px;font-size:12px}
details{margin:6px 0} summary{cursor:pointer;font-weight:600}
.d-removed td,.c-removed td{background:#f0f0f0;color:#6b6b6b}
.d-narrowed td{background:#fbf1c4} .d-linearised td{background:#dcf3e3}
.d-folded td,.c-folded td{background:#fde3c8} .d-not-analysed td{background:#f9d6d6} .d-changed td,.c-added td{background:#ece2f8}
.c-modified td{background:#fbf6e0}
.chip-removed{background:#e6e6e6} .chip-narrowed{background:#f4dc6b} .chip-linearised{background:#86d3a0}
.chip-folded{background:#f5b26b} .chip-changed{background:#c9b0ea} .chip-kept{background:#cfdbe8}
"""


ZOOM = 1.4   # matplotlib sizes text in points for print; on screen it wants to be larger


def svg_of(fig, zoom: float = ZOOM) -> str:
    """A matplotlib Figure as an inline <svg> element (text as text, no metadata block, no
    namespace URLs: the HTML parser puts inline <svg> and xlink:href in their namespaces)."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "egp_fx"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # inline SVG in HTML needs no namespace declarations; dropping them leaves no URL in the page
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    # display size = zoom x natural size (the viewBox keeps the drawing); CSS caps it at 100%
    return re.sub(r'(width|height)="([\d.]+)pt"',
                  lambda m: f'{m.group(1)}="{float(m.group(2)) * zoom:.1f}pt"', text, count=2)


def _summary(ins: Inspection) -> str:
    b, a = ins.report.before, ins.report.after
    rows = [[label, f"{getattr(b, key):,}", f"{getattr(a, key):,}",
             percent_change(getattr(b, key), getattr(a, key))]
            for label, key in (("parameters", "params"), ("FLOPs (one sample)", "flops"),
                               ("conv/linear layers on the longest path", "weighted_depth"),
                               ("nonlinear calls on the longest path", "nonlinear_depth"),
                               ("graph nodes", "nodes"))]
    r = ins.report
    facts = (f"{len(r.applied)} rewrites applied, {len(r.rolled_back)} rolled back, "
             f"{len(r.refusals)} refused; max relative output error {r.max_error:.2e} "
             f"(tolerance {r.tolerance:.0e})"
             + (f"; held-out error {r.holdout_error:.2e}" if r.holdout_error is not None else ""))
    chips = "".join(f'<span class="chip-{c}">{html.escape(c)}: {n}</span>'
                    for c, n in ins.table.counts().items() if n)
    return (html_table(("", "before", "after", "change"), rows, numeric=(1, 2, 3))
            + f"<p>{html.escape(facts)}</p>"
            + f'<p class="chips">activation calls ({len(ins.table)}): {chips}</p>')


def _issues(ins: Inspection) -> str:
    refusals = [[rf.pass_name, rf.key, rf.activation or "", rf.reason] for rf in ins.report.refusals]
    rolled = [[rw.pass_name, rw.kind, rw.key, f"{rw.error:.3g}" if rw.error is not None else "",
               rw.detail] for rw in ins.report.rolled_back]
    passes = [[p.name, str(p.rewrites), str(p.refusals), str(p.rolled_back), f"{p.max_error:.2e}",
               f"{p.seconds:.2f}"] for p in ins.report.passes]
    out = []
    if refusals:
        out.append(_details(f"Refusals ({len(refusals)})", html_table(
            ("pass", "key", "activation", "reason"), refusals)))
    if rolled:
        out.append(_details(f"Rolled back ({len(rolled)})", html_table(
            ("pass", "kind", "key", "error", "detail"), rolled)))
    if passes:
        out.append(_details(f"Passes ({len(passes)})", html_table(
            ("pass", "rewrites", "refusals", "rolled back", "max error", "seconds"), passes,
            numeric=(1, 2, 3, 4, 5))))
    return "".join(out) or "<p>No refusals and no roll-backs.</p>"


def _details(title: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(title)}</summary>{body}</details>"


def bench_rows(bench: Any) -> list[dict] | str | None:
    """Benchmark numbers as row dicts (or, failing that, text): accepts a BenchResult, its dict,
    its JSON or markdown text, a path to either, or a list of row dicts/dataclasses."""
    if bench is None:
        return None
    if isinstance(bench, Path) or (isinstance(bench, str) and "\n" not in bench and Path(bench).is_file()):
        bench = Path(bench).read_text(encoding="utf-8")
    if isinstance(bench, str):
        text = bench.strip()
        if text[:1] in "{[":
            try:
                return bench_rows(json.loads(text))
            except json.JSONDecodeError:
                return text
        return _markdown_rows(text) or text
    if hasattr(bench, "to_dict"):
        return bench_rows(bench.to_dict())
    if isinstance(bench, dict):
        return bench_rows(bench.get("rows", [bench]))
    if isinstance(bench, (list, tuple)):
        return [asdict(r) if is_dataclass(r) else dict(r) for r in bench]
    return str(bench)


def _markdown_rows(text: str) -> list[dict] | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return None
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head, body = cells[0], [c for c in cells[1:] if not all(set(x) <= set("-: ") for x in c)]
    return [dict(zip(head, row)) for row in body]   # noqa: B905  (ragged rows are fine)


def _bench(bench: Any) -> str:
    rows = bench_rows(bench)
    if rows is None:
        return ""
    if isinstance(rows, str):
        body = f"<pre>{html.escape(rows)}</pre>"
    else:
        head = list(dict.fromkeys(k for r in rows for k in r))
        cells = [[_fmt(r.get(k)) for k in head] for r in rows]
        numeric = [i for i, k in enumerate(head) if all(isinstance(r.get(k), (int, float)) for r in rows)]
        body = html_table(head, cells, numeric=numeric)
    return f"<h2>Benchmark</h2>{body}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_html(ins: Inspection) -> str:
    """The whole report as one HTML document."""
    figures = ins.figures()
    title = ins.title or "egp_fx compression report"
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="sub">What egp_fx.compress measured on the calibration data and what it changed.</p>',
        "<h2>Summary</h2>", _summary(ins),
        "<h2>Before and after</h2>",
        f'<div class="figure" id="picture">{svg_of(figures["before_after"])}</div>',
        "<h2>EGP entropy per activation call</h2>",
        f'<div class="figure" id="entropy">{svg_of(figures["entropy"])}</div>',
        "<h2>Per-layer decisions</h2>", ins.table.to_html(),
        "<h2>Graph diff by block</h2>", ins.diff.blocks_html(),
        _details(f"Node changes ({len(ins.diff.changes)})", ins.diff.changes_html()),
        "<h2>Refusals, roll-backs and passes</h2>", _issues(ins),
        _bench(ins.bench),
        "</body></html>",
    ]
    return "\n".join(parts)
