"""What a benchmark returns: one row per (model, backend, variant, batch size), with the settings
and the machine it ran on, as JSON, markdown and a PNG."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class BenchRow:
    model: str
    backend: str
    variant: str
    batch_size: int
    median_ms: float
    p90_ms: float
    params: int | None
    flops: int | None                      # at batch 1
    layers_on_longest_path: int | None     # conv/linear layers
    nonlinear_on_longest_path: int | None
    speedup: float | None                  # median(baseline) / median(this row)
    baseline: str | None = None            # the row the speedup is relative to: the first model,
    #                                        same backend/variant/batch, and how it was prepared
    prepared: str = ""                     # how this model was prepared for the backend


@dataclass
class BenchResult:
    rows: list[BenchRow]
    environment: dict
    settings: dict
    skipped: list[dict] = field(default_factory=list)   # {"model", "backend", "variant", "reason"}
    files: dict[str, str] = field(default_factory=dict)  # ONNX files kept (workdir given)

    def to_dict(self) -> dict:
        return {"environment": self.environment, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows], "skipped": self.skipped,
                "files": self.files}

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_markdown(self, *, header: bool = True) -> str:
        """The table; with `header`, preceded by the machine, software and settings. Every
        speedup names its baseline; how each model was prepared for each backend follows."""
        env = self.environment
        lines = [f"Machine: {env['cpu_model']} ({env['logical_cpus']} logical CPUs, load average "
                 f"{env['load_average_1_5_15min'][0]} at the start)"
                 + (f", GPU {env['gpu']}" if env.get("gpu") else ""),
                 f"Software: python {env['python']}, torch {env['torch']}, onnxruntime "
                 f"{env['onnxruntime']}, onnx {env['onnx']}; {env['date']}"] if header else []
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), "",
                  "| model | backend | variant | batch | median ms | p90 ms | speedup | baseline "
                  "| params | GFLOPs (batch 1) | layers on longest path |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in self.rows:
            speedup = f"{r.speedup:.3f}x" if r.speedup is not None else "-"
            gflops = f"{r.flops / 1e9:.4g}" if r.flops is not None else "-"
            lines.append(f"| {r.model} | {r.backend} | {r.variant} | {r.batch_size} | "
                         f"{r.median_ms:.3f} | {r.p90_ms:.3f} | {speedup} | "
                         f"{r.baseline or '-'} | {_or_dash(r.params)} | {gflops} | "
                         f"{_or_dash(r.layers_on_longest_path)} |")
        prepared = dict.fromkeys((r.model, r.backend, r.variant, r.prepared) for r in self.rows
                                 if r.prepared)
        if prepared:
            lines += ["", "Prepared as:"]
            lines += [f"- {m} on {b} {v}: {p}" for m, b, v, p in prepared]
        if self.skipped:
            lines += ["", "Skipped:"]
            lines += [f"- {s['model']} {s['backend']} {s['variant']}: {s['reason']}"
                      for s in self.skipped]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: one panel per backend/variant (row) and batch size (column), each with its own
        scale; a bar per model at the median latency, its whisker reaching the p90."""
        from matplotlib.figure import (
            Figure,  # no pyplot: leaves the global backend alone
        )

        panels = list(dict.fromkeys((r.backend, r.variant) for r in self.rows))
        batches = sorted({r.batch_size for r in self.rows})
        models = list(dict.fromkeys(r.model for r in self.rows))
        colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
        fig = Figure(figsize=(1.2 + 0.9 * len(models) * max(len(batches), 1),
                              2.8 * max(len(panels), 1)), layout="constrained")
        axes = fig.subplots(max(len(panels), 1), max(len(batches), 1), squeeze=False)
        for (i, (backend, variant)), (j, batch) in itertools.product(enumerate(panels),
                                                                       enumerate(batches)):
            ax = axes[i][j]
            rows = [r for r in self.rows if (r.backend, r.variant, r.batch_size) ==
                    (backend, variant, batch)]
            med = [r.median_ms for r in rows]
            ax.bar(range(len(rows)), med, color=[colours[r.model] for r in rows],
                   yerr=[[0.0] * len(rows), [r.p90_ms - r.median_ms for r in rows]], capsize=3)
            ax.set_xticks(range(len(rows)), [r.model for r in rows], rotation=20, fontsize="small")
            ax.set_title(f"{backend} {variant}, batch {batch}", fontsize="medium")
            if j == 0:
                ax.set_ylabel("ms per call")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path


def _or_dash(value) -> str:
    return "-" if value is None else str(value)
