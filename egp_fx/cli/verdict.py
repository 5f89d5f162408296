"""What a benchmark says about the deliverable, in lines: compressed against the original in the
fastest form egp_fx exports, and against torch.onnx.export's default form.

For every cell (backend, variant, batch size) that timed both "original" and "compressed":
speed = original ms / compressed ms. Below egp_fx.deploy.deliverable.SLOWER (0.98) the line says
the compressed model is slower, and why (deliverable.reason_for from compress's report: nothing
removed, or a smaller graph the runtime runs slower). Where the cell also timed
"original (torch.onnx.export default)", the line adds what the user gains over that form.
"""
from __future__ import annotations

from typing import NamedTuple

from egp_fx.bench.run import DEFAULT_FORM_SUFFIX
from egp_fx.deploy.deliverable import SLOWER, render, reason_for


class CellVerdict(NamedTuple):
    text: str
    speed: float              # original ms / compressed ms
    slower: bool


def verdict_lines(bench, report=None, original: str = "original",
                  compressed: str = "compressed") -> list[CellVerdict]:
    """One per cell; see the module docstring."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in bench.rows:
        cells.setdefault((r.backend, r.variant, r.batch_size), {})[r.model] = r.median_ms
    lines = []
    for (backend, variant, batch), ms in cells.items():
        if original not in ms or compressed not in ms:
            continue
        speed = ms[original] / ms[compressed]
        line = (f"{backend} {variant} batch {batch}: compressed {ms[compressed]:.3g} ms, "
                f"{speed:.2f}x the original's speed ({ms[original]:.3g} ms)")
        default = ms.get(original + DEFAULT_FORM_SUFFIX)
        if default is not None:
            line += (f", {default / ms[compressed]:.2f}x that of the original as "
                     f"torch.onnx.export writes it by default ({default:.3g} ms)")
        if speed < SLOWER:
            line += ". Slower: " + render(*reason_for(report))
        lines.append(CellVerdict(line, speed, speed < SLOWER))
    return lines
