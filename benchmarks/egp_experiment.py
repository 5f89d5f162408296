"""EGP vs IMP on a real (small, offline) dataset, and what egp_fx.compress makes of the result.

1. Train a dense ResNet-18 with the CIFAR stem (width multiplier --width-mult, default 0.25:
   stage widths 16/32/64/128, 0.70 M parameters) on scikit-learn's 8x8 digits upsampled to
   32x32 (1,437 train / 360 validation images, egp_fx/data/digits.npz).
2. From the same dense weights run EGP and IMP for --iterations rounds (50% of the remaining
   prunable weights per round), each round followed by --epochs-per-round epochs of SGD
   (lr 0.1, x0.1 at 50% and 75% of the round, momentum 0.9, wd 1e-4, batch 128).
3. After every round: validation accuracy, sparsity, activation layers with zero EGP entropy
   (of 17), and egp_fx.compress on the pruned model: conv/linear layers on the longest path,
   params, FLOPs before/after.
4. ONNX Runtime CPU latency of every compressed model (and of the dense original), measured
   side by side with egp_fx.bench.benchmark (round-robin, median of --repeats calls).

Writes benchmarks/results/egp_experiment.{json,md,png} and the demo checkpoint
egp_fx/data/demo_resnet18_digits.{safetensors,json} (the last EGP iteration). Working files
(checkpoints per iteration, logs) go to --workdir; --resume continues an interrupted run there.

    .venv/bin/python benchmarks/egp_experiment.py            # defaults: about 10-30 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from egp_fx.compress import compress  # noqa: E402
from egp_fx.prune import FinetuneConfig, digits_loaders, evaluate, finetune, prune  # noqa: E402
from egp_fx.prune.datasets import load_digits_data  # noqa: E402
from egp_fx.prune.models import (DEMO_CHECKPOINT, DEMO_CONFIG, ResNetConfig, build_model,  # noqa: E402
                                 save_model)
from egp_fx.prune.runlog import checkpoint_path, load_checkpoint, save_checkpoint  # noqa: E402

log = logging.getLogger("egp_experiment")
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("egp", "imp")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--dense-epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--epochs-per-round", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1, help="dense training and every retraining round")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=50, help="latency: timed calls per model")
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "egp_experiment")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="reuse the dense model and finished rounds")
    p.add_argument("--no-demo", action="store_true", help="do not write the demo checkpoint")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the .md and .png from an existing egp_experiment.json")
    return p.parse_args()


def environment() -> dict:
    from egp_fx.bench import environment as bench_env  # noqa: PLC0415
    return {**bench_env(), "torchvision": __import__("torchvision").__version__,
            "machine": platform.machine()}


def dense_model(args, config: ResNetConfig, train, val) -> tuple[torch.nn.Module, dict]:
    path = args.workdir / "dense.safetensors"
    torch.manual_seed(args.seed)
    model = build_model(config)
    if args.resume and path.exists():
        load_checkpoint(model, path)
        history = json.loads((args.workdir / "dense.json").read_text())
    else:
        t0 = time.perf_counter()
        hist = finetune(model, train, FinetuneConfig(epochs=args.dense_epochs, lr=args.lr),
                        desc="dense")
        history = {"train": hist, "seconds": round(time.perf_counter() - t0, 1)}
        save_checkpoint(model, path)
        (args.workdir / "dense.json").write_text(json.dumps(history))
    history["accuracy"] = evaluate(model, val)
    log.info("dense: validation accuracy %.4f", history["accuracy"])
    return model.eval(), history


def compressed_models(dense, config, runs, train) -> tuple[dict, dict]:
    """{name: module} for the benchmark (dense original first) and {name: compress totals}."""
    models, sizes = {"dense": dense}, {}
    work = [("dense", 0, dense)]
    for method, (result, out_dir) in runs.items():
        for rec in result.log[1:]:
            m = build_model(config)
            load_checkpoint(m, checkpoint_path(out_dir, rec.iteration))
            work.append((method, rec.iteration, m.eval()))
    for method, i, m in work:
        name = f"{method}-{i}+compress" if method != "dense" else "dense+compress"
        t0 = time.perf_counter()
        gm = compress(m, train, progress=False)
        report = gm.meta["egp_report"]
        models[name] = gm
        sizes[name] = {"before": report.before.to_dict(), "after": report.after.to_dict(),
                       "max_error": report.max_error, "seconds": round(time.perf_counter() - t0, 1)}
    return models, sizes


def latency(models: dict, args) -> dict:
    from egp_fx.bench import benchmark  # noqa: PLC0415
    result = benchmark(models, torch.randn(1, 3, 32, 32), batch_sizes=tuple(args.latency_batches),
                       backends=("ort-cpu",), repeats=args.repeats, warmup=10)
    return result.to_dict()


def _lat(bench: dict, name: str, batch: int) -> dict | None:
    for row in bench["rows"]:
        if row["model"] == name and row["batch_size"] == batch:
            return row
    return None


def markdown(doc: dict) -> str:
    env, s = doc["environment"], doc["settings"]
    b1 = min(s["latency_batches"])
    bmax = max(s["latency_batches"])
    lines = [
        "# EGP vs IMP on the digits data, and what egp_fx.compress removes", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {env['cpu_model']}, {env['logical_cpus']} logical CPUs; python {env['python']}, "
        f"torch {env['torch']}, torchvision {env['torchvision']}, onnxruntime {env['onnxruntime']}; "
        f"{env['date']}  ",
        f"Wall time: {doc['seconds']['total'] / 60:.1f} min (dense {doc['seconds']['dense']:.0f} s, "
        f"EGP {doc['seconds']['egp']:.0f} s, IMP {doc['seconds']['imp']:.0f} s, compress+latency "
        f"{doc['seconds']['latency']:.0f} s); 1-min load average at start / end: "
        f"{doc['load_average']['start']:.1f} / {doc['load_average']['end']:.1f} (2 cores: above 2, "
        "other jobs competed for the CPU and the times are longer).", "",
        "Setup: ResNet-18 with the CIFAR stem (3x3 conv stride 1, no max-pool, torchvision "
        f"BasicBlocks, 17 ReLU calls) at width multiplier {s['width_mult']} (stage widths "
        f"{', '.join(str(round(64 * s['width_mult']) * k) for k in (1, 2, 4, 8))}; "
        f"{doc['dense']['params']:,} parameters), reduced from 64/128/256/512 to fit the CPU budget. "
        "Data: scikit-learn's 8x8 handwritten digits (1,797 real images) upsampled to 32x32, 3 "
        "channels, fixed stratified split 1,437 train / 360 validation. Dense training "
        f"{s['dense_epochs']} epochs; then {s['iterations']} rounds of EGP and of IMP from the same "
        f"dense weights, each pruning 50% of the remaining prunable weights (the 17 convs feeding a "
        f"ReLU; shortcut convs and the classifier are not pruned, for IMP too) and retraining "
        f"{s['epochs_per_round']} epochs (SGD lr {s['lr']}, x0.1 at 50%/75%, momentum 0.9, wd 1e-4, "
        f"batch {s['batch_size']}). The reference retrains 160 epochs per round on CIFAR-10.",
        "",
        f"Dense: validation accuracy {doc['dense']['accuracy']:.4f}. Latency: ONNX Runtime CPU, "
        f"median of {s['repeats']} calls, all models interleaved (egp_fx.bench.benchmark); speedup "
        "is against the dense original (not compressed).", "",
        "Columns: zero-H = ReLU calls with EGP entropy 0 (of 17); OFF / ON = of those, the calls "
        "with all channels always off / all channels always on (a ReLU fed by an emptied conv sees "
        "a per-channel constant: each channel is always OFF or always ON, so it has zero entropy "
        "but counts as neither); emptied = prunable convs with all weights zero; depth = "
        "conv/linear layers on the longest path after compress (dense original: "
        f"{doc['dense_depth']}); removed = depth before - after compress; params, MFLOPs (batch 1) "
        "and latency are those of the compressed model (the dense row: the dense model after "
        "compress, e.g. BatchNorm folded). Validation accuracy is over 360 images: one image is "
        "0.0028.", "",
        f"| method | iter | sparsity | val acc | zero-H (OFF/ON) | emptied | depth | removed | "
        f"params | MFLOPs | ms b{b1} | speedup b{b1} | ms b{bmax} | speedup b{bmax} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in doc["table"]:
        def cell(key, fmt):
            v = row.get(key)
            return "-" if v is None else format(v, fmt)
        lines.append(
            f"| {row['method']} | {row['iteration']} | {cell('sparsity', '.4f')} | "
            f"{cell('accuracy', '.4f')} | {row['zero_entropy']} ({row['off']}/{row['on']}) | "
            f"{row['emptied']} | {cell('depth_after', 'd')} | {cell('removed', 'd')} | "
            f"{cell('params_after', ',')} | {cell('mflops_after', '.2f')} | {cell('ms_b1', '.3f')} | "
            f"{cell('speedup_b1', '.2f')} | {cell('ms_bmax', '.3f')} | {cell('speedup_bmax', '.2f')} |")
    lines += ["", "Observations (from the numbers above, this run):", ""]
    lines += [f"- {o}" for o in doc["observations"]]
    return "\n".join(lines) + "\n"


def table(runs: dict, sizes: dict, bench: dict, batches: list[int]) -> list[dict]:
    b1, bmax = min(batches), max(batches)
    rows = []
    dense_rec = runs["egp"][0].log[0]
    entries = [("dense", dense_rec, "dense+compress")]
    for method, (result, _) in runs.items():
        entries += [(method, r, f"{method}-{r.iteration}+compress") for r in result.log[1:]]
    for method, rec, name in entries:
        size = sizes.get(name, {})
        before, after = size.get("before", {}), size.get("after", {})
        l1, lm = _lat(bench, name, b1), _lat(bench, name, bmax)
        d1, dm = _lat(bench, "dense", b1), _lat(bench, "dense", bmax)
        rows.append({
            "method": method, "iteration": rec.iteration, "sparsity": rec.sparsity,
            "accuracy": rec.accuracy, "zero_entropy": rec.zero_entropy_layers, "off": rec.off_layers,
            "on": rec.on_layers, "emptied": sum(lay["nonzero"] == 0 for lay in rec.layers),
            "depth_after": after.get("weighted_depth"),
            "removed": (before["weighted_depth"] - after["weighted_depth"]) if after else None,
            "params_after": after.get("params"),
            "mflops_after": after["flops"] / 1e6 if after else None,
            "ms_b1": l1["median_ms"] if l1 else None,
            "speedup_b1": d1["median_ms"] / l1["median_ms"] if l1 and d1 else None,
            "ms_bmax": lm["median_ms"] if lm else None,
            "speedup_bmax": dm["median_ms"] / lm["median_ms"] if lm and dm else None})
    return rows


def observations(rows: list[dict]) -> list[str]:
    out = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        last = mine[-1]
        speed = f"{last['speedup_b1']:.2f}x" if last["speedup_b1"] else "n/a"
        out.append(f"{method.upper()} after {last['iteration']} rounds: sparsity {last['sparsity']:.4f}, "
                   f"val acc {last['accuracy']:.4f}, {last['zero_entropy']} zero-entropy activation "
                   f"calls, {last['emptied']} emptied convs, compress removes {last['removed']} "
                   f"conv/linear layers from the longest path; ORT batch-1 speedup {speed}")
        first_zero = next((r["iteration"] for r in mine if r["zero_entropy"] > 0), None)
        out.append(f"{method.upper()}: first round with a zero-entropy layer: "
                   f"{first_zero if first_zero is not None else 'none'}")
    return out


def plot(doc: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    rows = doc["table"]
    fig = Figure(figsize=(11, 11), layout="constrained")
    axes = fig.subplots(3, 2).flatten()
    panels = [("accuracy", "validation accuracy"), ("zero_entropy", "zero-entropy ReLU calls (of 17)"),
              ("removed", "conv/linear layers removed by compress"), ("ms_b1", "ORT CPU ms, batch 1")]
    dense = next(r for r in rows if r["method"] == "dense")
    for ax, (key, title) in zip(axes, panels):
        for method, marker in (("egp", "o-"), ("imp", "s--")):
            mine = [dense] + [r for r in rows if r["method"] == method]
            pts = [(r["iteration"], r[key]) for r in mine if r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=method.upper())
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("pruning round (sparsity 1 - 0.5^round)")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, method in zip(axes[4:], METHODS):
        recs = doc["runs"][method]
        grid = [[a["egp_entropy"] for a in rec["activations"]] for rec in recs]
        im = ax.imshow(list(zip(*grid)), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{method.upper()}: EGP entropy per ReLU call")
        ax.set_xlabel("pruning round")
        ax.set_ylabel("ReLU call (stem at top)")
        ax.set_xticks(range(len(recs)), [str(rec["iteration"]) for rec in recs])
        fig.colorbar(im, ax=ax, label="bits")
    fig.suptitle("EGP vs IMP, ResNet-18 (CIFAR stem) on 8x8 digits -> 32x32")
    fig.savefig(path, dpi=110)


def write_report(doc: dict, results: Path) -> None:
    (results / "egp_experiment.md").write_text(markdown(doc))
    plot(doc, results / "egp_experiment.png")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report_only:
        doc = json.loads((args.results / "egp_experiment.json").read_text())
        write_report(doc, args.results)
        return
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    seconds = {}
    config = ResNetConfig(num_classes=10, width_mult=args.width_mult)
    train, val = digits_loaders(args.batch_size, seed=args.seed)
    t0 = time.perf_counter()
    dense, dense_hist = dense_model(args, config, train, val)
    seconds["dense"] = time.perf_counter() - t0
    runs = {}
    for method in METHODS:
        out_dir = args.workdir / method
        if not args.resume and out_dir.exists():
            shutil.rmtree(out_dir)
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        result = prune(dense, train, method=method, iterations=args.iterations,
                       finetune=FinetuneConfig(epochs=args.epochs_per_round, lr=args.lr),
                       val_loader=val, out_dir=out_dir, resume=args.resume)
        seconds[method] = time.perf_counter() - t0
        runs[method] = (result, out_dir)
    t0 = time.perf_counter()
    models, sizes = compressed_models(dense, config, runs, train)
    bench = latency(models, args)
    seconds["latency"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    doc = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "environment": environment(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dense": {"accuracy": dense_hist["accuracy"], "train": dense_hist["train"],
                  "params": sum(p.numel() for p in dense.parameters())},
        "dense_depth": sizes["dense+compress"]["before"]["weighted_depth"],
        "runs": {m: [asdict(r) for r in res.log] for m, (res, _) in runs.items()},
        "compress": sizes, "latency": bench,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
    }
    doc["table"] = table(runs, sizes, bench, args.latency_batches)
    doc["observations"] = observations(doc["table"])
    (args.results / "egp_experiment.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(doc, args.results)
    if not args.no_demo:
        final = runs["egp"][0]
        data = load_digits_data()
        rec = final.final
        save_model(final.model, config, DEMO_CHECKPOINT, DEMO_CONFIG, extra={
            "dataset": "scikit-learn 8x8 digits, bilinear to 32x32, 3 channels, (x/16 - mean) / std",
            "mean": data.mean, "std": data.std, "input_shape": [1, 3, 32, 32],
            "method": "egp", "iteration": rec.iteration, "sparsity": rec.sparsity,
            "val_accuracy": rec.accuracy, "made_by": "benchmarks/egp_experiment.py"})
        log.info("wrote %s (%d bytes)", DEMO_CHECKPOINT, DEMO_CHECKPOINT.stat().st_size)
    log.info("done in %.1f min; results in %s", seconds["total"] / 60, args.results)


if __name__ == "__main__":
    main()
