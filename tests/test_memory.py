"""compress refuses, before it starts, a model it has no memory for, with the numbers."""
from __future__ import annotations

import ctypes
import importlib
import os

import pytest
import torch
from torch import nn

import egp_fx
from egp_fx.ir.copying import tensor_bytes
from egp_fx.pipeline.memory import GB, MARGIN, estimate_extra, release_free_memory

memory = importlib.import_module("egp_fx.pipeline.memory")
compress_module = importlib.import_module("egp_fx.pipeline.compress")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()


def test_estimate_is_one_copy_of_the_weights_or_a_quarter_when_shared():
    model = _model()
    weights = tensor_bytes(model)
    assert weights == (64 * 256 + 256 + 256 * 8 + 8) * 4
    assert estimate_extra(model, share_weights=False) == weights + MARGIN
    assert estimate_extra(model, share_weights=True) == int(weights * 0.25) + MARGIN


def test_a_model_that_does_not_fit_is_refused_before_calibration(monkeypatch):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    free = estimate_extra(model, False) - 1
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)

    def never(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(compress_module, "calibrate", never)
    with pytest.raises(egp_fx.MemoryBudgetError) as err:
        egp_fx.compress(model, [torch.randn(4, 64)], progress=False)
    text = str(err.value)
    need = estimate_extra(model, False) / GB
    assert f"needs about {need:.2f} GB" in text and f"only {free / GB:.2f} GB are free" in text
    assert "share_weights=True" in text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_same_model_fits_with_one_byte_more(monkeypatch):
    model = _model()
    monkeypatch.setattr(memory, "available_bytes", lambda device: estimate_extra(model, False))
    gm = egp_fx.compress(model, [torch.randn(4, 64)], progress=False)
    assert egp_fx.report_of(gm).max_error <= 1e-5


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_release_free_memory_gives_freed_heap_pages_back_and_keeps_live_blocks():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc: release_free_memory does nothing here")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 * 1024, 512          # 32 MiB in blocks below glibc's mmap threshold
    blocks = [libc.malloc(block) for _ in range(count)]
    assert all(blocks)
    for p in blocks:
        ctypes.memset(p, 1, block)         # resident
    live = blocks.pop()                    # in use above the others: free() cannot trim them
    for p in blocks:
        libc.free(p)
    before = _resident_bytes()
    release_free_memory()
    given_back = before - _resident_bytes()
    assert given_back >= count * block // 2, f"only {given_back / 2**20:.1f} MiB given back"
    assert ctypes.string_at(live, block) == b"\x01" * block
    libc.free(live)
    release_free_memory()                  # nothing left to give back: still harmless
