"""How a model is run and timed: one ONNX Runtime session builder, one way to call a torch
module, one interleaved timing loop.

    ort.py          ort_session(model, provider, ...): an InferenceSession with the benchmark's
                    options; ort_feed / ort_runner: numpy inputs by name, one synchronous call
    torch_calls.py  eager_runner, cuda_graph_runner: one synchronous call of a module;
                    torch_threads: a context that sets torch's intra-op threads
    timing.py       measure_cell: warm-up, then round-robin rounds of one call per runner

Two floors measure through these: egp_fx.bench (which exports, prepares and reports whole
models) and egp_fx.pipeline.latency (which times single layers on compress's target). The
floor sits just above egp_fx.ir, whose Batch it feeds, and below everything else: it knows
nothing of graphs, passes, exports or reports, so the pipeline reaches it without climbing to
deploy/ or bench/ (pyproject.toml, the import-linter contract).
"""
