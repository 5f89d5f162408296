"""ONNX Runtime sessions and calls, as the benchmark and the latency cost both make them.

ort_session(model, provider, optimization, threads, spinning, optimized_path, quiet):
- `model` is an .onnx path or the serialized model (bytes);
- graph optimisation level `optimization` (a key of ORT_LEVELS; "all" = ORT_ENABLE_ALL,
  which folds BatchNorm into convolutions), sequential execution, `threads` intra-op threads
  (None: onnxruntime's default, one per physical core);
- "session.intra_op.allow_spinning" is `spinning` (several models timed in turn would spin their
  thread pools against each other; one model alone may spin);
- `optimized_path` keeps ORT's optimised graph there; `quiet` shows ORT's errors only.
ort_feed gives the inputs by name: dict batches by their keys, positional ones in order;
ort_runner makes one synchronous call (run() returns with the outputs ready).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from egp_fx.ir.batches import Batch

ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_session(model: bytes | str | os.PathLike, provider: str, *, optimization: str = "all",
                threads: int | None = None, spinning: bool = True,
                optimized_path: str | os.PathLike | None = None,
                quiet: bool = False):
    """An onnxruntime.InferenceSession on `provider` with the options above."""
    import onnxruntime as ort  # imported when a session is made: `import egp_fx` stays light

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               ORT_LEVELS[optimization])
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 0
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if quiet:
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=[provider])


def ort_feed(session, batch: Batch) -> dict:
    """numpy inputs for `session`: dict batches by input name, positional ones in order."""
    names = [i.name for i in session.get_inputs()]
    if batch.kwargs:
        missing = [n for n in names if n not in batch.kwargs]
        if missing:
            raise ValueError(f"the ONNX model's inputs {missing} are not in the batch "
                             f"(keys {sorted(batch.kwargs)})")
        return {n: batch.kwargs[n].detach().cpu().numpy() for n in names}
    if len(names) != len(batch.args):
        raise ValueError(f"the ONNX model takes {len(names)} inputs, the batch has "
                         f"{len(batch.args)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, batch.args)}


def ort_runner(session, batch: Batch) -> Callable[[], object]:
    """One synchronous call of `session` on `batch` (fed once, here)."""
    feed = ort_feed(session, batch)
    return lambda: session.run(None, feed)
