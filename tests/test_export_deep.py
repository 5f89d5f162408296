"""export_onnx on deep random networks: never refused at float32 rounding, a wrong file still is.

torchvision ResNet-50 (96 px), DenseNet-121 (64 px) and Inception-v3 (75 px, the smallest input
it takes), with non-trivial BatchNorm statistics fitted to the data (so activations keep their
scale through the depth), exported as they are and after compress removed planted dead units.
Onnxruntime and torch differ there by up to about 1e-4 of the output scale (Inception-v3's
outputs, of magnitude ~3,000, come out of large cancelling sums), which the scale-relative rule
with its float32 noise floor must accept; one corrupted weight must still be refused. One seed
per network in the default run, more under -m slow.
"""
from __future__ import annotations

import onnx
import pytest
import torch
import torchvision

import egp_fx
import egp_fx.deploy.onnx as export_mod
from egp_fx.deploy.onnx import ExportError, export_onnx
from egp_fx.deploy.parity import NOISE_FACTOR
from egp_fx.testing.planting import (
    fit_bn_statistics,
    plant_constant,
    plant_dead,
    realistic_bn,
)


def resnet50() -> torch.nn.Module:
    model = torchvision.models.resnet50(num_classes=10)
    block = model.layer2[1]
    plant_dead(block.bn1, range(block.bn1.num_features))           # a whole bottleneck dead ...
    plant_constant(block.bn3, range(block.bn3.num_features), 0.0)  # ... adding exactly 0
    plant_dead(model.layer3[0].bn2, range(0, 32, 2))                # 16 dead channels
    return model


def densenet121() -> torch.nn.Module:
    model = torchvision.models.densenet121(num_classes=10)
    plant_dead(model.features.denseblock2.denselayer3.norm2, range(0, 128, 2))
    return model


def inception_v3() -> torch.nn.Module:
    model = torchvision.models.inception_v3(num_classes=10, aux_logits=False, init_weights=True)
    plant_dead(model.Mixed_5b.branch3x3dbl_2.bn, range(0, 96, 2))
    return model


NETWORKS = {"resnet50": (resnet50, 96), "densenet121": (densenet121, 64),
            "inception_v3": (inception_v3, 75)}


def planted(name: str, seed: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The network with its plants, BatchNorm fitted to two batches of noise (seeded)."""
    build, size = NETWORKS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    calib = [torch.randn(2, 3, size, size, generator=gen) for _ in range(2)]
    model = realistic_bn(build(), seed)
    return fit_bn_statistics(model, calib).eval(), calib


def _assert_exported(result, path) -> None:
    """Exported, with parity figures, within the rule: the tolerance or the noise floor."""
    assert result.path == path and path.is_file()
    assert result.max_rel_err is not None and result.max_elementwise_rel_err is not None
    assert result.max_abs_err > 0                     # a real comparison took place
    floor = NOISE_FACTOR * result.float32_noise if result.float32_noise is not None else 0.0
    assert result.max_rel_err <= max(result.tolerance, floor)


def _check(name: str, seed: int, tmp_path, choose: str) -> None:
    """choose="first": the first exporter that passes (quick); "latency": every exporter must
    pass, since the file kept is the one measured fastest."""
    model, calib = planted(name, seed)
    result = export_onnx(model, tmp_path / f"{name}.onnx", calib[0], choose=choose)
    _assert_exported(result, tmp_path / f"{name}.onnx")
    assert all(t.passed for t in result.trials), result.trials
    small = egp_fx.compress(model, calib, progress=False)
    report = egp_fx.report_of(small)
    assert report.after.params < report.before.params and not report.rolled_back
    result = export_onnx(small, tmp_path / f"{name}-compressed.onnx", calib[0], choose=choose)
    _assert_exported(result, tmp_path / f"{name}-compressed.onnx")
    assert all(t.passed for t in result.trials), result.trials


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_deep_random_networks_export_uncompressed_and_compressed(name, tmp_path):
    _check(name, 0, tmp_path, "first")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_seed_sweep_with_every_exporter(name, seed, tmp_path):
    _check(name, seed, tmp_path, "latency")


def test_a_corrupted_weight_is_refused_in_a_deep_network(tmp_path, monkeypatch):
    """Where the noise floor is highest (Inception-v3), a wrong layer is still caught: its
    weights 1% off move the outputs by about 1e-2 of their scale, 200x the rounding difference
    (a single wrong weight may not show at all in a random network: its unit may be dead, or,
    at 75 px, a 3x3 kernel's corner may only ever meet padding)."""
    real = export_mod._export

    def corrupting(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)
        proto = onnx.load(str(path))
        init = max(proto.graph.initializer, key=lambda t: int(torch.tensor(t.dims).prod()))
        values = onnx.numpy_helper.to_array(init).copy()
        values *= 1.01
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        onnx.save(proto, str(path))

    monkeypatch.setattr(export_mod, "_export", corrupting)
    model, calib = planted("inception_v3", 0)
    path = tmp_path / "corrupt.onnx"
    with pytest.raises(ExportError, match="parity check failed") as info:
        export_onnx(model, path, calib[0], exporters=("torchscript",))
    assert "differs from torch" in str(info.value)
    assert not path.exists()
