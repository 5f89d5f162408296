"""Tiny helpers shared by the text and HTML renderings (no dependencies, no styling decisions)."""
from __future__ import annotations

import html
from collections.abc import Sequence


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]], *,
               right: Sequence[int] = ()) -> str:
    """Fixed-width columns; columns listed in `right` are right-aligned (numbers)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def html_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, row_classes=None,
               numeric: Sequence[int] = (), css_class: str = "") -> str:
    """An HTML <table>; every cell is escaped. row_classes[i] is added to row i's class."""
    cls = f' class="{html.escape(css_class)}"' if css_class else ""
    out = [f"<table{cls}><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        out.append(f'<tr class="{html.escape(rc)}">' if rc else "<tr>")
        out += [f'<td class="num">{html.escape(c)}</td>' if j in numeric
                else f"<td>{html.escape(c)}</td>" for j, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def signed(n: int | float) -> str:
    """'+1,234' / '-1,234' / '0' for a change."""
    return f"{n:+,}" if n else "0"


def percent_change(before: float, after: float) -> str:
    if before == after:
        return "0" if before else ""
    if before == 0:
        return "new"
    return f"{100.0 * (after - before) / before:+.1f}%"
