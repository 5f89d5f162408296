"""`make demo` / `egp-fx demo`: an EGP-pruned ResNet-18 made shallower and faster, end to end.

The checkpoint shipped in egp_fx/data/ is a ResNet-18 (CIFAR stem) trained on the digits data
that ships beside it and pruned with EGP by benchmarks/make_demo_checkpoint.py. The demo
1. loads it and the fixed validation split (360 real handwritten digits),
2. calibrates and compresses it on training images (egp_fx.compress),
3. checks top-1 accuracy on the held-out split before and after (they must agree),
4. exports both to ONNX, each in its fastest form (with an onnxruntime parity check; a warning
   if the compressed one is slower), and benchmarks original against compressed on onnxruntime
   CPU, interleaved in one process, the original also as torch.onnx.export writes it by
   default,
5. prints the tables and writes a self-contained HTML report.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from egp_fx.bench import benchmark
from egp_fx.deploy.deliverable import compare
from egp_fx.deploy.onnx import export_onnx
from egp_fx.errors import EXIT_COMPRESS, EXIT_OK, EXIT_USAGE
from egp_fx.inspect import inspect
from egp_fx.pipeline.compress import compress
from egp_fx.pipeline.report import report_of
from egp_fx.pruning.datasets import load_digits_data
from egp_fx.pruning.models import DEMO_CHECKPOINT, load_demo_model

from .verdict import verdict_lines

log = logging.getLogger(__name__)


def _args(argv):
    ap = argparse.ArgumentParser(prog="egp-fx demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="folder for the ONNX files and report.html")
    ap.add_argument("--calib-images", type=int, default=512, help="training images to calibrate on")
    ap.add_argument("--batch-sizes", default="1,32", help="benchmark batch sizes")
    ap.add_argument("--repeats", type=int, default=100, help="timed runs per model and batch size")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--quick", action="store_true", help="reduced setting (CI): fewer images/runs")
    return ap.parse_args(argv)


@torch.no_grad()
def _predict(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.calib_images, args.repeats, args.batch_sizes = 128, 3, "1"
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not DEMO_CHECKPOINT.exists():
        print(f"the demo checkpoint {DEMO_CHECKPOINT} is missing: reinstall egp_fx, or make it "
              "with benchmarks/make_demo_checkpoint.py", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_demo_model()
    data = load_digits_data()
    calib = DataLoader(Subset(data.train, range(min(args.calib_images, len(data.train)))),
                       batch_size=64)
    val = DataLoader(data.val, batch_size=120)
    print(f"model: ResNet-18 (CIFAR stem, width x{meta.get('width_mult', 1.0)}), EGP-pruned; "
          f"{len(data.val)} held-out digits, calibration on {len(calib.dataset)} training digits")

    gm = compress(model, calib, progress=True)
    report = report_of(gm)
    (before, labels), (after, _) = _predict(model, val), _predict(gm, val)
    acc_before = float((before == labels).float().mean())
    acc_after = float((after == labels).float().mean())
    changed = int((before != after).sum())
    print(f"\n{report.summary()}\n")
    print(f"held-out accuracy: original {acc_before:.2%}, compressed {acc_after:.2%} "
          f"({changed} of {len(labels)} predictions differ)")

    example = data.val.tensors[0][:1]
    exported = {}
    for name, module in (("original", model), ("compressed", gm)):
        res = exported[name] = export_onnx(module, out / f"{name}.onnx", example)
        print(f"exported {res.path} (opset {res.opset}, {res.exporter}): onnxruntime vs torch "
              f"max abs err {res.max_abs_err:.2e}")
    verdict = compare(exported["original"], exported["compressed"], example, report=report)
    if verdict.slower:
        print(f"warning: {verdict.message()}", file=sys.stderr)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    bench = benchmark({"original": model, "compressed": gm}, example, batch_sizes=sizes,
                      backends=("ort-cpu",), repeats=args.repeats, threads=args.threads,
                      default_form_of=("original",))
    print("\n" + bench.to_markdown())
    for line in verdict_lines(bench, report):
        print(line.text)
    bench.to_json(out / "bench.json")
    inspection = inspect(gm, example_input=example, bench=bench, title="egp_fx demo")
    print("\n" + str(inspection.table))
    html = inspection.write_html(out / "report.html")
    print(f"\nwrote {html}")
    if changed:
        print(f"error: {changed} held-out predictions changed", file=sys.stderr)
        return EXIT_COMPRESS
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
