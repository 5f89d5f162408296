"""Real pretrained networks (weights from inside their wheels) through compress and the
deliverable export: exact on held-out inputs, and never handed back slower than the original in
its fastest form. Slow, and skipped where the packages or espeak-ng/sox are missing (make
real-models installs them); benchmarks/bench_real_models.py is the full measurement."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import egp_fx
from egp_fx.deploy.deliverable import export_deliverable
from egp_fx.deploy.onnx import Choice, export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _real_models_data import MODELS, available  # noqa: E402

pytestmark = pytest.mark.slow
SIZES = {"crepe-full": 16}


@pytest.mark.parametrize("key", sorted(MODELS))
def test_real_model_is_exact_and_its_deliverable_never_slower(key, tmp_path):
    why = available(key)
    if why:
        pytest.skip(why)
    torch.set_num_threads(1)
    spec = MODELS[key]
    model, _ = spec.build()
    n = SIZES.get(key, 64)
    calib, hold = spec.data("calib", n), spec.data("holdout", n)
    small = egp_fx.compress(model, [calib], holdout_loader=[hold], progress=False)
    report = egp_fx.report_of(small)
    assert report.holdout_error <= report.tolerance
    with torch.no_grad():
        agreement = spec.agree(model(hold), small(hold))
    assert agreement["argmax_agreement"] == 1.0, agreement

    delivered = export_deliverable(model, small, tmp_path / "m.onnx", hold[:2], report=report,
                                   latency_batches=(1, 8))
    # the file written is the faster of the two as measured; both forms were tried for each
    assert delivered.written == ("original" if delivered.verdict.slower else "compressed")
    for result in (delivered.original, delivered.compressed):
        assert result.choice is Choice.FASTEST, result.describe_choice()
    if key.startswith("crepe"):
        # a torch.export capture: the TorchScript form works at other batch sizes, and on
        # onnxruntime it is ~2x faster than the dynamo form, for the original and compressed
        assert report.capture.mode == "export"
        assert delivered.original.exporter == delivered.compressed.exporter == "torchscript"
        assert delivered.verdict.mean_speed > 0.9
        forced = export_onnx(small, tmp_path / "ts.onnx", hold[:2], exporters=("torchscript",))
        assert forced.max_rel_err <= 1e-4
