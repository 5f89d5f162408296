"""Mutation check of the test suite: small, deliberate bugs that the default test run must catch.

    .venv/bin/python tests/mutants.py [--only NAME ...] [--out benchmarks/results/mutants.md]
    make mutants

Each mutant replaces one exact piece of source text (which must occur exactly once, so a mutant
whose code moved fails loudly instead of passing unnoticed) in a scratch copy of the repository,
runs the tests named for it there (default markers: the slow ones stay out) and counts it killed
when pytest fails. Every mutant must be killed; the exit status is 1 otherwise. The list grows
with each new pass.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str              # the bug it stands for
    path: str             # file, relative to the repository root
    find: str             # exact source text, present exactly once
    replace: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("verify-nan-dropped", "the error measure lets NaN through (Python's max drops it)",
           "egp_fx/ir/compare.py",
           "    if not bool(torch.equal(ref_ok, out_ok)):",
           "    if False:",
           ("tests/test_verify.py",)),
    Mutant("report-error-from-subset", "the report's error is the verification error on a "
           "subset of the calibration data", "egp_fx/pipeline/compress.py",
           "    report.max_error = verdict.float32 if whole and verdict",
           "    report.max_error = verdict.float32 if verdict",
           ("tests/test_verify.py",)),
    Mutant("bisect-over-rollback", "a failed group never keeps a passing subset",
           "egp_fx/pipeline/rollback.py",
           "        if not known_bad:\n",
           "        if False:\n",
           ("tests/test_verify.py",)),
    Mutant("rollback-keeps-bad", "the rolled-back rewrite stays in the graph",
           "egp_fx/pipeline/rollback.py",
           "            return base, None, 1",
           "            return trial, None, 1",
           ("tests/test_verify.py", "tests/test_compress.py")),
    Mutant("refusal-facts-dropped", "a refusal's text leaves out its facts (the format string "
           "is not filled)", "egp_fx/passes/reasons.py",
           "    return MESSAGES[code].format_map({k: _text(k, v) for k, v in (details or {}).items()})",
           "    return MESSAGES[code]",
           ("tests/test_passes.py",)),
    Mutant("verdict-raise-unnamed", "a rewrite that raises is reported as a NaN/Inf output",
           "egp_fx/pipeline/verify.py",
           "            code = Reason.OUTPUT_RAISES if raised else Reason.OUTPUT_INVALID",
           "            code = Reason.OUTPUT_INVALID",
           ("tests/test_verify.py",)),
    Mutant("pass-options-dropped", "an option given to compress never reaches its pass",
           "egp_fx/passes/registry.py",
           "    return {cls: cls(**{k: v for k, v in given.items() if known[k] is cls}) for cls in classes}",
           "    return {cls: cls() for cls in classes}",
           ("tests/test_extending.py", "tests/test_passes.py")),
    Mutant("concat-offset-off-by-one", "a channel behind a concat is mapped one position off",
           "egp_fx/passes/channel_walk.py",
           "                    before += shape_of(t)[axis]",
           "                    before += shape_of(t)[axis] - 1",
           ("tests/test_compress.py", "tests/test_compress_property.py")),
    Mutant("concat-offset-property", "the same bug, to be found by the seeded property test alone",
           "egp_fx/passes/channel_walk.py",
           "                    before += shape_of(t)[axis]",
           "                    before += shape_of(t)[axis] - 1",
           ("tests/test_compress_property.py",)),
    Mutant("bench-not-interleaved", "the benchmark times each model in turn, not round-robin",
           "egp_fx/runtime/timing.py",
           "    for _ in range(repeats):\n        for name, run in runners.items():\n",
           "    for name, run in runners.items():\n        for _ in range(repeats):\n",
           ("tests/test_bench.py",)),
    Mutant("target-timer-ignored", "compress(cost=\"latency\") times every target with torch on "
           "the CPU, whatever timer its registry entry names",
           "egp_fx/pipeline/latency.py",
           "    return entry.timer\n",
           "    return torch_cpu_timer\n",
           ("tests/test_targets.py", "tests/test_extending.py")),
    Mutant("parity-no-noise-floor", "export parity refuses float32 rounding of a deep network",
           "egp_fx/deploy/parity.py",
           "                    bound = max(tolerance, NOISE_FACTOR * noise[k])",
           "                    bound = tolerance",
           ("tests/test_export.py",)),
    Mutant("parity-floor-unbounded", "export parity accepts anything once the noise is measured",
           "egp_fx/deploy/parity.py",
           "NOISE_FACTOR = 10.0",
           "NOISE_FACTOR = 1e9",
           ("tests/test_export.py",)),
    Mutant("pickle-keeps-original", "torch.save of a compressed module stores the original too",
           "egp_fx/pipeline/report.py",
           "        return (Transient, ())",
           "        return (Transient, (self.value,))",
           ("tests/test_saving.py",)),
    Mutant("reload-plain-outputs", "a reloaded Hugging Face module returns a dict, not its "
           "ModelOutput",
           "egp_fx/ir/pickling.py",
           "        _restore_pytree(graph, vars(root))\n",
           "        pass\n",
           ("tests/test_saving.py",)),
    Mutant("bench-bn-not-folded", "the benchmark's baseline keeps its BatchNorm while saying it "
           "is folded",
           "egp_fx/bench/deploy.py",
           "    return fused, FOLDED",
           "    return module, FOLDED",
           ("tests/test_bench.py",)),
    Mutant("prune-easier-entropy", "the prune loop allocates with the EASIER entropy",
           "egp_fx/pruning/record.py",
           "stats[a].egp_entropy for a in lay.activations",
           "stats[a].easier_entropy for a in lay.activations",
           ("tests/test_prune.py", "tests/test_prune_options.py")),
    Mutant("allocation-keeps-first-relevance", "overflow renormalises the first round's shares "
           "instead of recomputing R over the waiting layers (the old allocation)",
           "egp_fx/pruning/allocation.py",
           "rel, shares = relevance_shares({n: irr[n] for n in waiting})",
           "rel, shares = relevance_shares({n: irr[n] for n in pool})",
           ("tests/test_prune.py", "tests/test_prune_allocation.py")),
    Mutant("fold-bn-no-eps", "BatchNorm folded without its eps",
           "egp_fx/passes/fold_bn.py",
           'norm.eps, t["weight"]',
           '0.0, t["weight"]',
           ("tests/test_passes.py", "tests/test_compress.py")),
    Mutant("entropy-natural-log", "unit entropy in nats instead of bits",
           "egp_fx/calibrate/stats.py",
           "    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))",
           "    return -(p * torch.log(p) + (1 - p) * torch.log(1 - p))",
           ("tests/test_calibrate.py",)),
    Mutant("linear-channels-first", "a Linear's output channels taken on dim 1",
           "egp_fx/ir/channels.py",
           '        return -1 if op.kind == "linear" else 1',
           "        return 1",
           ("tests/test_calibrate.py", "tests/test_compress.py")),
    Mutant("gated-mlp-up-kept", "a gated MLP's up projection keeps the units removed from gate",
           "egp_fx/passes/dead_channels.py",
           "    for layer in (prod, *walk.gates):",
           "    for layer in (prod,):",
           ("tests/test_transformers.py",)),
    Mutant("rounding-zero-loose", "a constant far above its rounding bound counted as zero",
           "egp_fx/passes/constants.py",
           "bool((c.value.abs() <= c.bound).all())",
           "bool((c.value.abs() <= 1e9 * c.bound).all())",
           ("tests/test_passes.py", "tests/test_dead_branches.py")),
    Mutant("capture-unchecked", "a capture whose output differs from the model's is used",
           "egp_fx/capture/__init__.py",
           "    if err > CHECK_TOLERANCE:\n        return None, f\"the fx graph's",
           "    if False:\n        return None, f\"the fx graph's",
           ("tests/test_capture.py",)),
    Mutant("conv1d-weight-not-transposed", "GPT-2's Conv1D weight [in, out] read as [out, in]",
           "egp_fx/capture/canonical.py",
           "        set_attr(gm, w.target, attr(gm, w.target).t())",
           "        set_attr(gm, w.target, attr(gm, w.target))",
           ("tests/test_transformers.py",)),
    Mutant("shapes-not-updated", "a narrowing leaves the old widths in the shapes it changed",
           "egp_fx/passes/dead_channels.py",
           "    for node, axis, span in [(prod.node, prod.out_axis, 1), (act, prod.out_axis, 1), *walk.passed]:",
           "    for node, axis, span in []:",
           ("tests/test_passes.py",)),
    Mutant("parity-unchecked", "the ONNX parity check accepts any difference",
           "egp_fx/deploy/parity.py",
           "            if not (rel <= bound) or not math.isfinite(rel):",
           "            if False:",
           ("tests/test_export.py",)),
    Mutant("shared-tensor-changed", "a rewrite changes a tensor the original graph still holds",
           "egp_fx/ir/layer.py",
           "        set_attr(self.gm, self.weight_node.target, weight)",
           "        set_attr(self.gm, self.weight_node.target, attr(self.gm, self.weight_node.target).set_(weight))",
           ("tests/test_compress.py", "tests/test_transformers.py")),
    Mutant("capture-device-pinned", "masks and positions stay on the capture's device after .to()",
           "egp_fx/capture/canonical.py",
           "    _devices_follow_inputs(gm)\n",
           "",
           ("tests/test_transformers.py",)),
    Mutant("capture-view-kept", "a view valid only for one attention kernel's strides is kept",
           "egp_fx/capture/canonical.py",
           "(aten._unsafe_view.default, aten.view.default)",
           "(aten._unsafe_view.default,)",
           ("tests/test_transformers.py",)),
    Mutant("dist-min-not-negated", "the reduction takes the largest minimum across ranks",
           "egp_fx/calibrate/ranks.py",
           "            bounds[c_all + offset:c_all + offset + c] = -acc.zmin.to(device, torch.float64)",
           "            bounds[c_all + offset:c_all + offset + c] = acc.zmin.to(device, torch.float64)",
           ("tests/test_distributed.py",)),
    Mutant("dist-borrowed-batch-counted", "a rank without data counts the batch it borrowed",
           "egp_fx/calibrate/ranks.py",
           "    return (mine, True) if mine is not None else (shared.to(device), False)",
           "    return (mine, True) if mine is not None else (shared.to(device), True)",
           ("tests/test_distributed.py",)),
    Mutant("dist-errors-not-combined", "each rank verifies on its own numbers",
           "egp_fx/pipeline/ranks.py",
           "    return example, take, combine",
           "    return example, take, None",
           ("tests/test_distributed.py",)),
    Mutant("dist-failure-not-shared", "a rank's failure is not passed on to the others",
           "egp_fx/distributed/comm.py",
           "    failed = [(r, s) for r, (s, _) in enumerate(got) if s is not None]",
           "    failed = []",
           ("tests/test_distributed.py",)),
    Mutant("ddp-bypassed", "fine-tuning steps without the averaged gradients",
           "egp_fx/pruning/train.py",
           "output, n = _forward(net, batch, goal, config, i, device, \"training\")",
           "output, n = _forward(model, batch, goal, config, i, device, \"training\")",
           ("tests/test_distributed_prune.py",)),
    Mutant("mask-not-held", "the mask is applied when a round prunes but not in the forward "
           "pass: an optimizer's momentum or weight decay brings pruned weights back",
           "egp_fx/pruning/masks.py",
           "        return weight * self.mask",
           "        return weight",
           ("tests/test_prune_loop.py",)),
    Mutant("pruner-state-masks-dropped", "load_state_dict restores the round but not the masks",
           "egp_fx/pruning/pruner.py",
           "        for name, mask in state[\"masks\"].items():\n            self.masks.set(name, mask)",
           "        for name, mask in state[\"masks\"].items():\n            pass",
           ("tests/test_prune_loop.py",)),
    Mutant("remove-not-baked", "remove() keeps W_orig as it is instead of W_orig * mask",
           "egp_fx/pruning/masks.py",
           "parametrize.remove_parametrizations(owner, tensor, leave_parametrized=True)",
           "parametrize.remove_parametrizations(owner, tensor, leave_parametrized=False)",
           ("tests/test_prune_loop.py",)),
    Mutant("shortcut-pruned", "the shortcut conv of a residual block is taken as prunable",
           "egp_fx/pruning/layers.py",
           "        for prod in _drop_shortcuts(_producers(main_input(node), ops)):",
           "        for prod in _producers(main_input(node), ops):",
           ("tests/test_prune.py",)),
    Mutant("checkpoint-parametrized", "a round's checkpoint holds the parametrized state dict, "
           "which resume cannot read back as plain weights",
           "egp_fx/pruning/egp.py",
           "save_checkpoint(pruner.plain_view(), checkpoint_path(out, i))",
           "save_checkpoint(pruner.model, checkpoint_path(out, i))",
           ("tests/test_prune.py",)),
    Mutant("ddp-buffers-unsynced", "ranks end fine-tuning with their own BatchNorm statistics",
           "egp_fx/pruning/train.py",
           "    if spread:\n        across.sync_state(model, f\"{desc}: end\")",
           "    if False:\n        across.sync_state(model, f\"{desc}: end\")",
           ("tests/test_distributed_prune.py",)),
    Mutant("malloc-not-trimmed", "freed heap pages stay resident between compress's phases",
           "egp_fx/pipeline/memory.py",
           "    libc.malloc_trim(0)",
           "    pass",
           ("tests/test_memory.py",)),
    Mutant("every-rank-writes", "ranks other than 0 write the run folder too",
           "egp_fx/distributed/comm.py",
           "    if is_writer():\n        try:\n            value = fn()",
           "    if True:\n        try:\n            value = fn()",
           ("tests/test_distributed_prune.py",)),
    Mutant("prelu-slope-channel-0", "every PReLU unit takes channel 0's slope",
           "egp_fx/ir/activations.py",
           '    return {"slopes": tuple(flat.tolist()), "tensor": path}',
           '    return {"slopes": tuple([float(flat[0])] * flat.numel()), "tensor": path}',
           ("tests/test_kinds.py",)),
    Mutant("contiguous-before-view-dropped", "cleanup drops a contiguous() that a view needs",
           "egp_fx/ir/ops.py",
           '        if _is_view(user) or user.op == "output":',
           '        if user.op == "output":',
           ("tests/test_as_written.py",)),
    Mutant("trial-traceback-printed", "a failing trial prints torch.fx's traceback",
           "egp_fx/ir/shapes.py",
           "    return batch(module.forward if isinstance(module, fx.GraphModule) else module)",
           "    return batch(module)",
           ("tests/test_as_written.py",)),
    Mutant("flags-not-fixed", "forward's defaulted flags are traced as inputs",
           "egp_fx/capture/defaults.py",
           "    supplied = {p.name for p in positional[:len(example.args)]} | set(example.kwargs)",
           "    supplied = {p.name for p in params}",
           ("tests/test_as_written.py",)),
    Mutant("no-op-drops-verified", "a group of no-op drops is verified before the final check",
           "egp_fx/pipeline/rollback.py",
           "        if done is not None and self.trust_no_ops and only_no_ops(rewrites):",
           "        if False:",
           ("tests/test_as_written.py",)),
    Mutant("export-keeps-slowest", "export_onnx keeps the exporter measured slowest",
           "egp_fx/deploy/onnx.py",
           "    return min(order, key=lambda e: (round(score(e), 12), order.index(e)))",
           "    return max(order, key=lambda e: (round(score(e), 12), order.index(e)))",
           ("tests/test_export_choice.py",)),
    Mutant("sizes-baked", "a torch.export capture's sizes reach the TorchScript exporter as "
           "ints: the example's batch size is baked into the file",
           "egp_fx/deploy/traced_sizes.py",
           '            node.op, node.target = "call_method", "size"',
           "            pass",
           ("tests/test_export_choice.py",)),
    Mutant("reshape-no-minus-one", "a reshape with one symbolic entry keeps a traced size "
           "instead of -1 (a Shape/Gather chain instead of a constant shape)",
           "egp_fx/deploy/traced_sizes.py",
           "        shape[symbolic[0]] = -1",
           "        pass",
           ("tests/test_export_choice.py",)),
    Mutant("deliverable-never-slower-unchecked", "the compressed file is written even when "
           "measured slower", "egp_fx/deploy/deliverable.py",
           "    verdict.slower = verdict.mean_speed < SLOWER",
           "    verdict.slower = False",
           ("tests/test_export_choice.py",)),
    Mutant("default-form-on-torch-backends", "the torch.onnx.export default-form file is handed "
           "to the torch backends too (a skipped row each)", "egp_fx/bench/run.py",
           '            space = ws if name.startswith("ort-") or not onnx_only else \\',
           "            space = ws if True else \\",
           ("tests/test_export_choice.py",)),
)


def _files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [f for f in listed.splitlines() if (ROOT / f).is_file()]


def _scratch() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="egp_mutants_"))
    for f in _files():
        dest = folder / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest)
    return folder


def _run(scratch: Path, mutant: Mutant) -> tuple[str, float, str]:
    target = scratch / mutant.path
    source = target.read_text()
    count = source.count(mutant.find)
    if count != 1:
        return "stale", 0.0, f"the text to mutate occurs {count} times in {mutant.path}"
    target.write_text(source.replace(mutant.find, mutant.replace))
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1",
           "EGP_FX_MUTANTS": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *mutant.tests], cwd=scratch, env=env, capture_output=True, text=True)
    finally:
        target.write_text(source)
    seconds = time.perf_counter() - start
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    if proc.returncode == 1:
        return "killed", seconds, ", ".join(failed[:2])
    if proc.returncode == 0:
        return "survived", seconds, "all tests passed"
    return "error", seconds, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="names of the mutants to run")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    scratch = _scratch()
    rows = []
    try:
        for m in chosen:
            status, seconds, detail = _run(scratch, m)
            rows.append((m, status, seconds, detail))
            print(f"{status:9} {m.name:28} {seconds:6.1f}s  {detail}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    killed = sum(status == "killed" for _, status, _, _ in rows)
    summary = f"{killed} of {len(rows)} mutants killed"
    print(summary)
    if args.out:
        lines = ["# Mutation check of the default test run", "",
                 f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
                 f"Run: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
                 f", {os.cpu_count()} logical CPUs", "", f"**{summary}.**", "",
                 "| mutant | the bug | file | status | seconds | killed by |",
                 "| --- | --- | --- | --- | ---: | --- |"]
        lines += [f"| {m.name} | {m.why} | {m.path} | {status} | {seconds:.1f} | {detail} |"
                  for m, status, seconds, detail in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
