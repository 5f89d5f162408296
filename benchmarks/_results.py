"""Benchmark results as the scripts write them: markdown tables and JSON runs."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from egp_fx.bench import BenchResult, BenchRow


def table(align: str, head: list[str], rows: Iterable[list]) -> list[str]:
    """The lines of a markdown table; `align` has a letter a column: l (text) or r (numbers)."""
    rule = {"l": "---", "r": "---:"}
    return (["| " + " | ".join(head) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def by_batch(result: BenchResult) -> Iterator[tuple[int, dict[str, BenchRow]]]:
    """(batch size, {model: row}) of a benchmark result, batch sizes in increasing order."""
    for batch in sorted({r.batch_size for r in result.rows}):
        yield batch, {r.model: r for r in result.rows if r.batch_size == batch}


def plain_runs(runs: list[dict], nest: bool = False) -> list[dict]:
    """The runs as JSON data: each run's BenchResult ("result") merged into the run, or kept
    under "result" with `nest`."""
    def plain(run: dict) -> dict:
        rest = {k: v for k, v in run.items() if k != "result"}
        data = run["result"].to_dict()
        return {**rest, "result": data} if nest else {**rest, **data}
    return [plain(run) for run in runs]
