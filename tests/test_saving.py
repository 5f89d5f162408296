"""save/load (a torch.export program with the report inside) and torch.save/torch.load of what
compress returns: exact round trips, dynamic batch (and sequence for token inputs), files the
size of the compressed tensors (the original model is not in them), refusals that leave no file."""
from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx.deploy.saving import INFO_FILE, REPORT_FILE, Saved
from egp_fx.errors import SaveError
from egp_fx.ir.copying import tensor_bytes
from egp_fx.pipeline.report import original_of
from egp_fx.testing.planting import plant_dead


def planted() -> nn.Module:
    """3/4 of the channels after bn2 are dead: conv2 and conv3 lose them (3 MB -> 0.8 MB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
                          nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(256, 10)).eval()
    plant_dead(model[4], range(192))
    return model


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    model = planted()
    gm = egp_fx.compress(model, calib, progress=False)
    assert gm.get_submodule("6").in_channels == 64
    return model, gm


def _inputs(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _close_to_tensor_bytes(size: int, module: nn.Module) -> None:
    """The file holds the module's tensors plus code and report: at most 5% + 64 KiB more."""
    tensors = tensor_bytes(module)
    assert tensors <= size <= 1.05 * tensors + 64 * 1024, (size, tensors)


def test_save_load_round_trip_is_exact_with_a_dynamic_batch(small, tmp_path):
    model, gm = small
    saved = egp_fx.save(gm, tmp_path / "model.pt2")
    assert isinstance(saved, Saved) and saved.path.is_file() and saved.max_rel_err == 0.0
    assert saved.dynamic == {"args[0]": {0: "batch"}}
    module, report = egp_fx.load(saved.path)
    with torch.no_grad():
        for batch in (1, 5):                          # saved from a batch-1 example
            x = _inputs(batch)
            assert torch.equal(module(x), gm(x))
    assert report == json.loads(egp_fx.report_of(gm).to_json())
    assert module.meta["egp_saved"]["dynamic"] == {"args[0]": {"0": "batch"}}
    names = zipfile.ZipFile(saved.path).namelist()
    assert any(n.endswith(REPORT_FILE) for n in names) and any(n.endswith(INFO_FILE) for n in names)


def test_saved_file_is_the_size_of_the_compressed_tensors(small, tmp_path):
    model, gm = small
    assert tensor_bytes(model) > 3 * tensor_bytes(gm)        # the original would show
    saved = egp_fx.save(gm, tmp_path / "model.pt2")
    _close_to_tensor_bytes(saved.bytes, gm)
    assert saved.tensor_bytes == tensor_bytes(gm)


def test_torch_save_round_trip_keeps_the_report_not_the_original(small):
    model, gm = small
    assert original_of(gm) is not None
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    _close_to_tensor_bytes(buffer.tell(), gm)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for batch in (1, 3):
            x = _inputs(batch)
            assert torch.equal(back(x), gm(x))
    assert egp_fx.report_of(back).to_dict() == egp_fx.report_of(gm).to_dict()
    assert original_of(back) is None
    assert all(p.data_ptr() != q.data_ptr() for p in back.parameters() for q in gm.parameters())


def test_a_loaded_module_saves_again_and_compiles(small, tmp_path):
    _, gm = small
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)           # meta is gone; the example is kept
    module, report = egp_fx.load(egp_fx.save(back, tmp_path / "again.pt2").path)
    assert report["after"] == egp_fx.report_of(gm).after.to_dict()
    compiled = torch.compile(module)
    x = _inputs(2)
    with torch.no_grad():
        want = gm(x)
        torch.testing.assert_close(compiled(x), want, rtol=1e-5,
                                   atol=1e-6 * float(want.abs().max()))


class Exporting(nn.Module):
    """Computes something else while torch.export traces it."""

    def forward(self, x):
        return x + 1.0 if torch.compiler.is_exporting() else x * 1.0


class DataDependent(nn.Module):
    def forward(self, x):
        return x if float(x.sum()) > 0 else -x


def test_refusals_leave_no_file(tmp_path):
    path = tmp_path / "m.pt2"
    with pytest.raises(SaveError, match="differs from the module: relative output error 1"):
        egp_fx.save(Exporting(), path, torch.ones(1, 4))
    assert not path.exists()
    with pytest.raises(SaveError, match="torch.export cannot capture the module"):
        egp_fx.save(DataDependent(), path, torch.randn(1, 4))
    assert not path.exists()
    with pytest.raises(SaveError, match="save needs example inputs"):
        egp_fx.save(nn.Linear(4, 4), path)
    with pytest.raises(SaveError, match="no such file"):
        egp_fx.load(path)
    path.write_bytes(b"not a program")
    with pytest.raises(SaveError, match="is not a torch.export program"):
        egp_fx.load(path)


def test_static_batch_when_asked(tmp_path):
    saved = egp_fx.save(nn.Linear(4, 2), tmp_path / "s.pt2", torch.randn(3, 4),
                        dynamic_batch=False)
    assert saved.dynamic == {}
    module, report = egp_fx.load(saved.path)
    assert report is None
    with pytest.raises((AssertionError, RuntimeError), match=r"\b3\b"):   # the saved size
        module(torch.randn(2, 4))


# ----------------------------------------------------------------------------- token inputs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def opt_small():
    from test_transformers import batches, opt

    torch.manual_seed(0)
    model, _ = opt()
    model.eval()
    return egp_fx.compress(model, batches(), progress=False), batches


def test_hugging_face_model_round_trips_with_dict_inputs(opt_small, tmp_path):
    gm, batches = opt_small
    saved = egp_fx.save(gm, tmp_path / "opt.pt2")
    assert saved.inputs == ["input_ids", "attention_mask"]
    assert saved.dynamic == {k: {0: "batch", 1: "sequence"} for k in saved.inputs}
    module, report = egp_fx.load(saved.path)
    assert report == json.loads(egp_fx.report_of(gm).to_json())
    other = batches(1, size=3, length=11, seed=5)[0]          # another batch and sequence
    with torch.no_grad():
        want, got = gm(**other), module(**other)
    assert type(got) is type(want) and list(got) == list(want) == ["logits"]
    assert torch.equal(got.logits, want.logits)


def test_hugging_face_model_survives_torch_save(opt_small):
    gm, batches = opt_small
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    other = batches(1, size=3, length=11, seed=5)[0]
    with torch.no_grad():
        want, got = gm(**other), back(**other)
    assert type(got) is type(want)              # the model's ModelOutput, not a plain dict
    assert torch.equal(got.logits, want.logits)
    assert egp_fx.report_of(back).to_dict() == egp_fx.report_of(gm).to_dict()


def clamp_by_sign(x: torch.Tensor) -> torch.Tensor:
    """Python control flow on a tensor value: fx can only keep it whole (a wrapped function)."""
    return x if float(x.mean()) >= 0 else x.clamp(min=0)


class CallsWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(clamp_by_sign(self.a(x))))


@pytest.fixture
def wrapped_function():
    from egp_fx.capture.fx_trace import WRAPPED_FUNCTIONS

    egp_fx.register_wrapped_function(clamp_by_sign, "branches on a tensor value")
    yield clamp_by_sign
    del WRAPPED_FUNCTIONS[clamp_by_sign]


def test_torch_save_keeps_wrapped_functions_whole(wrapped_function):
    calib = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = egp_fx.compress(CallsWrapped(), calib, progress=False)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(clamp_by_sign) == 1
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    assert [n.target for n in back.graph.nodes if n.op == "call_function"].count(
        clamp_by_sign) == 1
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(back(x), gm(x)) and torch.equal(back(-x), gm(-x))
