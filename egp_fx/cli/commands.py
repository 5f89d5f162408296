"""The egp-fx subcommands. Each `run_<name>(args)` returns (result dict for --json, text to print).

Every command rebuilds its inputs in-process -- model (+ checkpoint), calibration data, and for
all but prune/demo the compressed module -- so nothing unsafe to load is ever written to disk.
Errors are raised (cli.py maps them to exit codes); warnings go to stderr.
"""
from __future__ import annotations

import inspect as pyinspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from egp_fx.distributed import enabled, is_writer, launch, world_size
from egp_fx.errors import EXIT_BENCH, EXIT_EXPORT, EXIT_USAGE, CLIError
from egp_fx.pipeline.report import original_of, report_of

from .data import CalibrationData, DataError, calibration_data, parse_input_size
from .models import default_input_size, load_model

log = logging.getLogger(__name__)
DEFAULT_CALIB_BATCHES = 4


@dataclass
class _Inputs:
    model: nn.Module
    data: CalibrationData


def _warn(args, message: str) -> None:
    if not args.quiet and is_writer():
        print(f"egp-fx: warning: {message}", file=sys.stderr)


def _inputs(args, *, num_batches: int | None = DEFAULT_CALIB_BATCHES,
            shard: str = "batches") -> _Inputs:
    """Model and data; across ranks, this rank's share of the data (`shard`: launch.py), and a
    model initialised from the same seed on every rank when no checkpoint gives its weights."""
    if enabled(None):
        import torch
        torch.manual_seed(args.seed)
    model = load_model(args.model, checkpoint=args.checkpoint, source=args.source,
                       num_classes=args.num_classes)
    size = parse_input_size(args.input_size) or default_input_size(model)
    data = calibration_data(args.data, input_size=size, batch_size=args.batch_size,
                            num_batches=args.num_batches if args.num_batches is not None else num_batches,
                            data_key=args.data_key, seed=args.seed,
                            shard=shard if enabled(None) else None)
    for w in data.warnings:
        _warn(args, w)
    return _Inputs(model, data)


def _compress_options(args) -> dict:
    opts: dict = {"progress": not args.no_progress and is_writer(), "target": args.target,
                  "capture": args.capture}
    if args.tolerance is not None:
        opts["tolerance"] = args.tolerance
    if args.allow_approximate:
        opts["allow_approximate"] = True
    if args.verify_samples is not None:
        opts["verify_samples"] = args.verify_samples
    if args.channel_multiple is not None:
        opts["channel_multiple"] = args.channel_multiple
    if args.device:
        opts["device"] = launch.rank_device(args.device)
    if args.passes:
        from egp_fx.passes import PASSES
        names = tuple(p.strip() for p in args.passes.split(",") if p.strip())
        unknown = [p for p in names if p not in PASSES]
        if unknown:
            raise CLIError(f"--passes: unknown pass(es) {unknown}; available: {sorted(PASSES)}",
                           EXIT_USAGE)
        opts["passes"] = names
    return opts


def _compressed(args, inputs: _Inputs):
    from egp_fx.pipeline.compress import compress
    return compress(inputs.model, inputs.data.loader, **_compress_options(args))


def _inspection(args, inputs: _Inputs, gm, bench=None):
    from egp_fx.inspect import inspect
    return inspect(gm, example_input=inputs.data.example, bench=bench, title=args.model)


def _base(args, inputs: _Inputs) -> dict:
    return {"model": args.model, "checkpoint": args.checkpoint, "data": inputs.data.description,
            "warnings": inputs.data.warnings}


def _decision_counts(gm) -> dict[str, int]:
    """Activation calls per decision category (all calls of the original, as the table has them)."""
    from egp_fx.inspect.table import DecisionTable
    table = DecisionTable.build(original_of(gm), gm, report_of(gm), {})
    return {k: v for k, v in table.counts().items() if v}


def _export(module, path: Path, example, opset: int | None = None):
    from egp_fx.deploy.onnx import export_onnx
    return export_onnx(module, path, example[:1], opset=opset)


def run_compress(args) -> tuple[dict, str]:
    inputs = _inputs(args)
    gm = _compressed(args, inputs)
    report = gm.meta["egp_report"]
    result = {**_base(args, inputs), "report": report.to_dict(),
              "decisions": _decision_counts(gm), "files": {}}
    if args.out and is_writer():
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ins = _inspection(args, inputs, gm)
        (out / "report.json").write_text(ins.to_json(indent=1), encoding="utf-8")
        result["files"]["report.json"] = str(out / "report.json")
        result["files"]["report.html"] = str(ins.write_html(out / "report.html"))
        if not args.no_onnx:
            try:
                result["files"]["model.onnx"] = str(_export(gm, out / "model.onnx", inputs.data.example).path)
            except Exception as err:  # the report is written; say that the export failed
                result.update(exit_code=EXIT_EXPORT, error=f"ONNX export failed: {err}")
                print(f"egp-fx: error: ONNX export failed: {err}", file=sys.stderr)
        try:   # the torch.export program, report inside (egp_fx.load reads it)
            from egp_fx.deploy.saving import save
            result["files"]["model.pt2"] = str(save(gm, out / "model.pt2").path)
        except Exception as err:
            result.update(exit_code=EXIT_EXPORT, error=f"saving model.pt2 failed: {err}")
            print(f"egp-fx: error: saving model.pt2 failed: {err}", file=sys.stderr)
    counts = ", ".join(f"{k} {v}" for k, v in result["decisions"].items()) or "none"
    lines = [report.summary(), f"activation decisions: {counts}"]
    lines += [f"wrote {p}" for p in result["files"].values()]
    return result, "\n".join(lines)


def run_inspect(args) -> tuple[dict, str]:
    inputs = _inputs(args)
    bench = None
    if args.bench:
        path = Path(args.bench)
        if not path.is_file():
            raise DataError(f"--bench {args.bench}: no such file (write one with egp-fx bench --out-json)")
        bench = path.read_text(encoding="utf-8")
    ins = _inspection(args, inputs, _compressed(args, inputs), bench)
    files = {}
    if not is_writer():
        return {}, ""
    if args.html:
        files["html"] = str(ins.write_html(args.html))
    if args.pictures:
        files["pictures"] = [str(p) for p in ins.write_pictures(args.pictures)]
    if args.graph:
        if Path(args.graph).suffix not in (".graphml", ".json"):
            raise CLIError(f"--graph {args.graph}: use a .graphml or .json file name", EXIT_USAGE)
        files["graph"] = str(ins.save_graph(args.graph))
    result = {**_base(args, inputs), **ins.to_dict(), "files": files}
    text = str(ins) + "".join(f"\nwrote {p}" for p in _flat(files.values()))
    return result, text


def _flat(values) -> list[str]:
    return [x for v in values for x in (v if isinstance(v, list) else [v])]


def run_export(args) -> tuple[dict, str]:
    inputs = _inputs(args)
    module = inputs.model if args.original else _compressed(args, inputs)
    if not is_writer():
        return {}, ""
    res = _export(module, Path(args.out), inputs.data.example, args.opset)
    result = {**_base(args, inputs), "path": str(res.path), "opset": res.opset,
              "exporter": res.exporter, "max_abs_err": res.max_abs_err,
              "max_rel_err": res.max_rel_err, "compressed": not args.original}
    what = "original" if args.original else "compressed"
    return result, (f"wrote {res.path} ({what} model, opset {res.opset}, {res.exporter}; "
                    f"max relative error vs torch {res.max_rel_err})")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise CLIError(f"{flag} {text!r}: give positive integers separated by commas", EXIT_USAGE)
    return values


def run_bench(args) -> tuple[dict, str]:
    from egp_fx.bench import benchmark
    sizes = _int_list(args.batch_sizes, "--batch-sizes")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    variants = [v.strip() for v in args.torch_variants.split(",") if v.strip()]
    inputs = _inputs(args)
    gm = _compressed(args, inputs)
    if not is_writer():                # one process times the models: the others would compete
        return {}, ""
    try:
        bench = benchmark({"original": inputs.model, "compressed": gm}, inputs.data.example[:1],
                          batch_sizes=sizes, backends=backends, repeats=args.repeats,
                          warmup=args.warmup, threads=args.threads, torch_variants=variants)
    except ValueError as err:          # rejected settings
        raise CLIError(f"bench: {err}", EXIT_USAGE) from err
    except Exception as err:  # export or runtime failure inside the benchmark
        raise CLIError(f"benchmark failed: {type(err).__name__}: {err}", EXIT_BENCH) from err
    files = {}
    if args.out_json:
        files["json"] = str(bench.to_json(args.out_json))
    if args.markdown:
        Path(args.markdown).write_text(bench.to_markdown(), encoding="utf-8")
        files["markdown"] = args.markdown
    if args.plot:
        files["plot"] = str(bench.plot(args.plot))
    if args.html:
        files["html"] = str(_inspection(args, inputs, gm, bench).write_html(args.html))
    result = {**_base(args, inputs), **bench.to_dict(), "files": files}
    return result, bench.to_markdown() + "".join(f"\nwrote {p}" for p in files.values())


def _check_classes(inputs: _Inputs, args) -> None:
    """Labels must index the model's outputs (a classifier with too few classes fails late)."""
    import torch
    _, labels = next(iter(inputs.data.loader))
    with torch.no_grad():
        out = inputs.model.eval()(inputs.data.example[:1])
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    top = int(labels.max())
    if classes is not None and top >= classes:
        raise DataError(f"--data {args.data}: labels go up to {top}, but {args.model} has "
                        f"{classes} outputs; pass --num-classes {top + 1}")


class _Tokens:
    """The data's inputs as token batches for --loss lm: {"input_ids": ids} (the CLI's data
    reader hands numbers over as float)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield {"input_ids": x.long()}


def run_prune(args) -> tuple[dict, str]:
    try:
        from egp_fx.pruning import FinetuneConfig, augment_preset, loss_by_name, prune
    except ImportError as err:
        raise CLIError(f"egp-fx prune needs egp_fx.prune, which is not available here ({err})",
                       EXIT_USAGE) from err
    if enabled(None) and args.batch_size % world_size():
        raise CLIError(f"--batch-size {args.batch_size} must be a multiple of the number of "
                       f"processes ({world_size()}): each takes an equal part of every batch",
                       EXIT_USAGE)
    inputs = _inputs(args, num_batches=None, shard="samples")
    loss = args.loss
    if loss != "lm" and not inputs.data.labelled:
        raise DataError(f"--data {args.data}: pruning fine-tunes the model and needs labels "
                        "(class sub-folders, a y/labels array, or 'digits'), except with --loss lm")
    if loss == "cross-entropy":
        _check_classes(inputs, args)
    loader = _Tokens(inputs.data.loader) if loss == "lm" else inputs.data.loader
    augment = augment_preset(args.augment)          # argparse has checked the name
    result = prune(inputs.model, loader, method=args.method, iterations=args.iterations,
                   ratio=args.ratio, finetune=FinetuneConfig(
                       epochs=args.epochs, lr=args.lr, device=launch.rank_device(args.device)),
                   imp_scope=args.imp_scope, augment=augment, reinit_ablation=args.reinit_ablation,
                   reinit_epochs=args.reinit_epochs, out_dir=args.out, progress=not args.no_progress,
                   loss_fn=None if loss == "cross-entropy" else loss_by_name(loss))
    files = {}
    if args.out and is_writer():
        from egp_fx.deploy.saving import save_weights
        files["weights"] = str(save_weights(result.model, Path(args.out) / "pruned.safetensors"))
    final = result.final
    keys = ("iteration", "method", "accuracy", "metric", "val_loss", "sparsity", "params",
            "nonzero_params", "zero_entropy_layers", "off_layers", "on_layers",
            "activation_layers", "compress")
    summary = {k: getattr(final, k) for k in keys if hasattr(final, k)}
    summary["loss"] = final.train[-1]["loss"] if final.train else None
    if result.reinit is not None:
        summary["reinit"] = {k: getattr(result.reinit, k) for k in (*keys, "frozen")}
    text = (f"pruned {args.model} with {args.method} for {args.iterations} iteration(s) "
            f"({loss} loss): sparsity {summary.get('sparsity')}, training loss "
            f"{summary['loss']}, activation calls with zero entropy "
            f"{summary.get('zero_entropy_layers')}"
            + (f"\nre-initialised and trained from scratch: {len(result.reinit.frozen)} frozen "
               "(emptied) layer(s)" if result.reinit else "")
            + "".join(f"\nwrote {p}" for p in files.values()))
    return {**_base(args, inputs), "final": summary, "files": files}, text


def run_demo(args) -> tuple[dict, str]:
    try:
        from .demo import main as demo_main
    except ImportError as err:
        raise CLIError(f"the demo is not available in this install (egp_fx.cli.demo: {err})",
                       EXIT_USAGE) from err
    takes_args = bool(pyinspect.signature(demo_main).parameters)
    code = demo_main(list(args.args)) if takes_args else demo_main()
    return {"exit_code": int(code or 0)}, ""
