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
from egp_fx.passes import option_fields
from egp_fx.pipeline.report import original_of, report_of

from .data import CalibrationData, DataError, calibration_data, parse_input_size
from .models import default_input_size, load_model
from .verdict import verdict_lines

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
    """compress's keyword arguments from the flags (the passes' options by name; the parser
    checked --passes)."""
    opts: dict = {"progress": not args.no_progress and is_writer(), "target": args.target,
                  "capture": args.capture}
    if args.tolerance is not None:
        opts["tolerance"] = args.tolerance
    if args.verify_samples is not None:
        opts["verify_samples"] = args.verify_samples
    if args.device:
        opts["device"] = launch.rank_device(args.device)
    if args.passes:
        opts["passes"] = args.passes
    opts.update({o.name: getattr(args, o.name) for o in option_fields()
                 if getattr(args, o.name) is not None})
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


def _deliver(args, inputs: _Inputs, gm, path: Path, opset: int | None = None):
    """The faster of compressed and original as ONNX at `path` (egp_fx.deploy.deliverable);
    a warning says so, with the reason, when that is the original."""
    from egp_fx.deploy.deliverable import export_deliverable
    delivered = export_deliverable(inputs.model, gm, path, inputs.data.example[:1],
                                   report=report_of(gm), opset=opset)
    if delivered.message():
        _warn(args, delivered.message())
    return delivered


def _delivered(d) -> dict:
    """The JSON record of a Deliverable."""
    v = d.verdict
    return {"written": d.written, "target": v.target,
            "latency_ms": {str(b): t for b, t in v.latency_ms.items()},
            "speed": {str(b): s for b, s in v.speed.items()}, "slower": v.slower,
            "reason": v.reason.value if v.reason else None, "facts": v.facts,
            "message": d.message(), "exporters": {"original": d.original.exporter,
                                                  "compressed": d.compressed.exporter}}


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
            try:      # the faster of compressed and original (the warning says when original)
                delivered = _deliver(args, inputs, gm, out / "model.onnx")
                result["files"]["model.onnx"] = str(delivered.path)
                result["deliverable"] = _delivered(delivered)
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
    """The compressed model's ONNX file, or the original's when the compressed one runs slower
    on the target (the message says so and why); --original: the original's."""
    inputs = _inputs(args)
    module = inputs.model if args.original else _compressed(args, inputs)
    if not is_writer():
        return {}, ""
    delivered = None if args.original else _deliver(args, inputs, module, Path(args.out),
                                                    args.opset)
    res = delivered.original if delivered and delivered.written == "original" else \
        delivered.compressed if delivered else _export(module, Path(args.out),
                                                       inputs.data.example, args.opset)
    result = {**_base(args, inputs), "path": str(res.path), "opset": res.opset,
              "exporter": res.exporter, "max_abs_err": res.max_abs_err,
              "max_rel_err": res.max_rel_err, "compressed": not args.original,
              "written": delivered.written if delivered else "original",
              "exporter_choice": res.describe_choice()}
    text = (f"wrote {res.path} ({result['written']} model, opset {res.opset}, "
            f"{res.describe_choice()}; max relative error vs torch {res.max_rel_err})")
    if delivered:
        result["deliverable"] = _delivered(delivered)
        text += (f"\n{delivered.message()}" if delivered.message() else
                 f"\nspeed of the compressed model against the original on "
                 f"{delivered.verdict.target}: {delivered.verdict.speeds()}")
    return result, text


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
                          warmup=args.warmup, threads=args.threads, torch_variants=variants,
                          default_form_of=("original",))
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
    verdicts = verdict_lines(bench, report_of(gm))
    for v in verdicts:
        if v.slower:
            _warn(args, v.text)
    result = {**_base(args, inputs), **bench.to_dict(), "files": files,
              "verdicts": [v._asdict() for v in verdicts]}
    return result, (bench.to_markdown() + "".join(f"\n{v.text}" for v in verdicts)
                    + "".join(f"\nwrote {p}" for p in files.values()))


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
