"""egp-fx: the command line of egp_fx.

    egp-fx compress MODEL --data DATA [--checkpoint W] [--out DIR]
    egp-fx inspect  MODEL --data DATA [--html report.html] [--pictures DIR] [--graph g.graphml]
    egp-fx export   MODEL --data DATA --out model.onnx [--original]
    egp-fx bench    MODEL --data DATA [--batch-sizes 1,8] [--backends ort-cpu] [--repeats 20]
    egp-fx prune    MODEL --data DATA --method egp|imp [--iterations 5] [--loss cross-entropy|bce|mse|lm] [--out DIR]
                    [--imp-scope all|prunable] [--augment none|crop-flip|shift] [--reinit-ablation]
    egp-fx demo     [ARGS...]

MODEL is a torchvision or timm model name, or package.module:factory (cli_models.py); DATA is a
folder of images, a .npy/.npz/.pt file, `digits` or `random` (cli_data.py). Every command runs
compress in-process from the model, checkpoint and data, so no pickled module is ever stored.
Under `torchrun --nproc_per_node N egp-fx ...` the same commands run on N processes: each takes
its share of the data, rank 0 alone prints and writes files (egp_fx/distributed/launch.py).
--json prints one JSON object on stdout (also on failure); progress bars and warnings go to stderr.

Exit codes:
    0  success
    1  internal error (a bug: rerun with -v for the traceback and report it)
    2  usage or bad input (arguments, data, a feature missing from this install)
    3  the model could not be loaded (unknown name, factory, checkpoint mismatch)
    4  calibration, compression or pruning failed
    5  ONNX export failed
    6  benchmark failed
    130 interrupted
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from egp_fx.bench import BACKENDS, DEFAULT_TORCH_VARIANTS, TORCH_VARIANTS
from egp_fx.errors import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    CompressError,
    exit_code,
)
from egp_fx.passes import option_fields, pipeline_of
from egp_fx.pipeline.targets import TARGETS


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as CLIError (so --json still gets a JSON answer)."""

    def error(self, message):
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)", EXIT_USAGE)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", help="torchvision/timm model name, or package.module:factory")
    g.add_argument("--checkpoint", help="weights: .safetensors, or a torch state-dict file")
    g.add_argument("--source", choices=("auto", "torchvision", "timm"), default="auto",
                   help="where to look the model name up (default: torchvision, then timm)")
    g.add_argument("--num-classes", type=int, help="passed to the model constructor")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--data", required=True,
                   help="image folder, .npy/.npz/.pt file, 'digits', or 'random' (noise)")
    g.add_argument("--input-size", help="H, HxW or CxHxW (default: what the model declares)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--num-batches", type=int,
                   help="batches to use (default: 4 to calibrate; all of them to prune)")
    g.add_argument("--data-key", help="array name in a .npz/.pt file holding the inputs")
    g.add_argument("--seed", type=int, default=0, help="seed of --data random (and, under "
                   "torchrun, of the model's initialisation, the same on every process)")


def _pipeline(text: str) -> tuple[str, ...]:
    """--passes: comma-separated names, checked as compress checks them."""
    try:
        return pipeline_of(p.strip() for p in text.split(",") if p.strip())
    except CompressError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _pass_option_args(g) -> None:
    """One flag per option of the passes (egp_fx.passes.option_fields): a field `channel_multiple`
    of a pass's options dataclass is --channel-multiple. Unset flags stay None: compress then
    uses the pass's default (or the target's)."""
    for opt in option_fields():
        flag, help_ = "--" + opt.name.replace("_", "-"), f"{opt.help} [{opt.owner}]"
        if opt.type is bool:
            action = "store_true" if opt.default is False else argparse.BooleanOptionalAction
            g.add_argument(flag, action=action, default=None, help=help_)
        else:
            g.add_argument(flag, type=opt.type, choices=opt.choices, help=help_)


def _compress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--tolerance", type=float, help="relative output error allowed (default 1e-5)")
    _pass_option_args(g)
    g.add_argument("--passes", type=_pipeline,
                   help="comma-separated pass names (default: egp_fx.passes.DEFAULT_PIPELINE)")
    g.add_argument("--verify-samples", type=int, help="calibration samples used to verify (default 8)")
    g.add_argument("--target", choices=tuple(TARGETS), default="ort-cpu",
                   help="hardware the model will run on; sets the width multiple of narrowed "
                   "layers (default " + "; ".join(f"{t.name}: {t.channel_multiple}"
                                                  for t in TARGETS.values()) + ")")
    g.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="how the model is captured: torch.fx, torch.export, or fx then export "
                   "(default auto)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: where the model is)")


def _output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="errors only on stderr")


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())


def _command(sub, name: str, help_: str, *, model=True, data=True, compress=True):
    p = sub.add_parser(name, help=help_, description=help_, epilog=_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        _model_args(p)
    if data:
        _data_args(p)
    if compress:
        _compress_args(p)
    _output_args(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="egp-fx", description="Compress PyTorch models by deleting dead units "
                     "and folding linear ones (egp_fx). Every command takes --json.",
                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = _command(sub, "compress", "calibrate and compress a model; print what changed")
    p.add_argument("--out", help="folder for report.json, report.html, model.onnx and model.pt2 "
                   "(a torch.export program: egp_fx.load)")
    p.add_argument("--no-onnx", action="store_true", help="with --out: skip the ONNX file")
    p = _command(sub, "inspect", "compress, then show per-layer decisions and the graph diff")
    p.add_argument("--html", help="write the self-contained HTML report here")
    p.add_argument("--pictures", help="write before/after and entropy pictures (SVG, PNG) here")
    p.add_argument("--graph", help="save the annotated graph (.graphml or .json)")
    p.add_argument("--bench", help="benchmark JSON/markdown (from egp-fx bench) for the HTML report")
    p = _command(sub, "export", "compress, then export the compressed model to ONNX")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--original", action="store_true", help="export the uncompressed model")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the newest all tools support)")
    p = _command(sub, "bench", "compress, then time original and compressed side by side")
    p.add_argument("--batch-sizes", default="1", help="comma-separated (default 1)")
    p.add_argument("--backends", default="ort-cpu",
                   help=f"comma-separated: {', '.join(BACKENDS)} (default ort-cpu; each "
                   "--target's own: " + ", ".join(f"{t.name}: {t.backend}"
                                                  for t in TARGETS.values()) + ")")
    p.add_argument("--torch-variants", default=",".join(DEFAULT_TORCH_VARIANTS),
                   help=f"comma-separated, for the torch backends: {', '.join(TORCH_VARIANTS)} "
                   "(default %(default)s; every model runs with its BatchNorm folded)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--out-json", help="write the BenchResult JSON here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--plot", help="write a latency plot (PNG) here")
    p.add_argument("--html", help="write the HTML report, benchmark included, here")
    p = _command(sub, "prune", "prune with EGP or IMP, fine-tuning between rounds (needs labels, "
                 "except with --loss lm)", compress=False)
    p.add_argument("--method", choices=("egp", "imp"), default="egp")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.5, help="share of weights pruned per round")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per round")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--loss", choices=("cross-entropy", "bce", "mse", "lm"), default="cross-entropy",
                   help="fine-tuning loss: cross-entropy on class labels, bce (logits vs 0/1 "
                        "targets), mse (prediction vs targets), or lm: a language model's own "
                        "loss on token ids (the data's inputs, as input_ids and labels)")
    p.add_argument("--out", help="folder for pruned.safetensors and the run log")
    p.add_argument("--imp-scope", choices=("all", "prunable"), default="all",
                   help="IMP's layers: all conv/linear (the reference) or the ones EGP prunes")
    p.add_argument("--augment", choices=("none", "crop-flip", "shift"), default="none",
                   help="augment training and entropy batches: random crop (pad 4) + flip, or "
                        "shifts of up to 2 pixels (digits)")
    p.add_argument("--reinit-ablation", action="store_true",
                   help="then re-initialise the surviving layers and train them from scratch")
    p.add_argument("--reinit-epochs", type=int,
                   help="epochs of the ablation (default: iterations x epochs)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu; under torchrun, cuda "
                   "is each process's own GPU)")
    p = _command(sub, "demo", "run the egp_fx demonstration", model=False, data=False,
                 compress=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the demo")
    return parser


def _setup_logging(args) -> None:
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(args.verbose, 2)]
    from egp_fx.distributed import launch
    who = f"egp-fx[rank {os.environ['RANK']}]" if launch.launched() else "egp-fx"
    logging.basicConfig(level=level, format=who + ": %(levelname)s: %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _fail(err: BaseException, code: int, args, as_json: bool) -> int:
    message = str(err) if code != EXIT_INTERNAL else (
        f"internal error: {type(err).__name__}: {str(err).rstrip('.')}. Rerun with -v for the "
        "traceback, and please report it.")
    from egp_fx.distributed import is_writer, launch
    if as_json and is_writer():
        print(json.dumps({"ok": False, "exit_code": code, "error": message,
                          "error_kind": EXIT_CODES.get(code, "error")}))
    who = f"egp-fx[rank {os.environ['RANK']}]" if launch.launched() else "egp-fx"
    print(f"{who}: error: {message}", file=sys.stderr)
    if args is not None and getattr(args, "verbose", 0) and code != EXIT_USAGE:
        traceback.print_exception(err, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"] and not {"-h", "--help"} & set(argv[1:2]):
        try:  # the demo parses its own options (egp-fx demo --help)
            from .demo import main as demo_main
        except ImportError:
            pass  # run_demo below reports it with exit code 2
        else:
            return demo_main(argv[1:])
    as_json, args, created = "--json" in argv, None, False
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args)
        from egp_fx.distributed import is_writer, launch

        from . import commands as cli_commands
        created = launch.setup(getattr(args, "device", None))   # under torchrun
        result, text = getattr(cli_commands, f"run_{args.command}")(args)
        if args.json and is_writer():
            print(json.dumps({"ok": "error" not in result, "command": args.command, **result},
                             default=str))
        elif text and is_writer():
            print(text)
        return result.get("exit_code", EXIT_OK)
    except SystemExit as err:  # --help, --version
        return err.code if isinstance(err.code, int) else EXIT_OK
    except KeyboardInterrupt as err:
        return _fail(err, EXIT_INTERRUPTED, args, as_json)
    except Exception as err:  # every failure becomes a message and a documented exit code
        return _fail(err, exit_code(err), args, as_json)
    finally:
        if created:
            from egp_fx.distributed import launch
            launch.teardown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
