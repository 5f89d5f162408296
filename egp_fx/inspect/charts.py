"""The EGP entropy of every activation call as a bar chart, coloured by the decision taken.

Bars: the EGP layer entropy (stats.py: per batch, the mean unit entropy over the channels that
were mixed in that batch; 0 for a layer with no mixed channel), in graph order. Dots (right
axis): the share of channels that stayed in one region (dead, constant or linear) -- the units
compress can act on. Low entropy with a high share is where the rewrites come from.
"""
from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .picture import FATES
from .table import DecisionTable

CATEGORY_COLOURS = {"removed": "#a6a6a6", "narrowed": FATES["narrowed"][0],
                    "linearised": FATES["linearised"][0], "folded": FATES["folded"][0],
                    "changed": FATES["added"][0], "kept": "#8fa6bd", "not analysed": "#e06666"}


def entropy_chart(table: DecisionTable, *, title: str = "") -> Figure:
    """A Figure with one bar per row of `table`."""
    n = len(table)
    longest = max((len(r.node) for r in table), default=0)
    fig = Figure(figsize=(max(6.0, 0.16 * n + 2.0), 2.8 + 0.075 * longest), layout="constrained")
    ax = fig.add_subplot()
    xs = range(n)
    ax.bar(xs, [r.egp_entropy for r in table], color=[CATEGORY_COLOURS[r.category] for r in table],
           edgecolor="#333333", linewidth=0.3, width=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("EGP entropy (bits)")
    ax.set_xticks(list(xs), [r.node for r in table], rotation=90, fontsize=5.5 if n > 30 else 7)
    ax.set_xlim(-0.7, n - 0.3)
    share = ax.twinx()
    share.plot(xs, [r.single_region / r.channels if r.channels else 0.0 for r in table], "o",
               color="#1d2b38", markersize=2.5)
    share.set_ylim(0, 1.05)
    share.set_ylabel("share of single-region channels (dots)", fontsize=7)
    used = [c for c in CATEGORY_COLOURS if any(r.category == c for r in table)]
    if used:
        fig.legend(handles=[Patch(facecolor=CATEGORY_COLOURS[c], edgecolor="#333333", label=c)
                            for c in used], fontsize=7, loc="outside upper right", ncols=len(used),
                   frameon=False)
    fig.suptitle(title or "EGP entropy per activation call", fontsize=9, x=0.02, ha="left")
    if not n:
        ax.text(0.5, 0.5, "no calibrated activation calls", transform=ax.transAxes, ha="center")
    return fig
