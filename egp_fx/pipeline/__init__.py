"""compress: the passes run in order on a working copy, verified, rolled back where they fail.

compress     capture -> calibrate -> DEFAULT_PIPELINE -> verify -> report
rollback     the rewrite loop: group, pass by pass, bisection
verify       the Verifier (float64 re-check) over the error measure of ir.compare
report       what was measured and changed; measures: params, FLOPs, depth
memory       will compress fit; targets: one entry per hardware target (width multiple, bench
             backend, timer); timers, latency: its measured cost, through egp_fx.runtime
ranks        the same decisions on every rank of a process group
"""
