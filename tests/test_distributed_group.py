"""egp_fx.distributed in this process: a one-rank gloo group, backends against devices, opting in
and out. (The multi-process tests are in test_distributed.py.)"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from dist_cases import UNEVEN, union

import egp_fx
import egp_fx.distributed as ranks
from egp_fx.distributed import comm
from egp_fx.testing.planted import planted_net
from egp_fx.testing.ranks import kinds_net, stats_of


@pytest.fixture
def group(tmp_path, monkeypatch):
    """A one-rank gloo group on the loopback interface, destroyed afterwards."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setattr(ranks, "COLLECTIVE_TIMEOUT", datetime.timedelta(seconds=10))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=10))
    yield
    dist.destroy_process_group()


def test_without_a_group_distributed_true_is_an_error_and_the_default_is_local():
    assert not dist.is_initialized()
    with pytest.raises(egp_fx.DistributedError, match="no torch.distributed process group"):
        egp_fx.calibrate(kinds_net(), union(UNEVEN), progress=False, distributed=True)
    assert ranks.enabled(None) is False and ranks.is_writer() and ranks.world_size() == 1


def test_the_default_follows_the_group(group, monkeypatch):
    calls = []
    real = comm.exchange
    monkeypatch.setattr(comm, "exchange", lambda obj, step: calls.append(step) or real(obj, step))
    from egp_fx.calibrate import ranks as calibration
    monkeypatch.setattr(calibration, "exchange", comm.exchange)
    data = union(UNEVEN)
    reduced = stats_of(egp_fx.calibrate(kinds_net(), data, progress=False))
    assert "calibration: activation calls" in calls
    calls.clear()
    local = stats_of(egp_fx.calibrate(kinds_net(), data, progress=False, distributed=False))
    assert calls == []
    for name in local:                        # one rank: the reduction changes nothing
        for key in ("on", "low", "high", "zmin", "zmax"):
            assert torch.equal(reduced[name][key], local[name][key])
        assert reduced[name]["egp"] == local[name]["egp"]


@pytest.mark.parametrize("backend, data, want", [
    ("gloo", "cpu", "cpu"), ("gloo", "cuda", "cpu"), ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("nccl", "cpu", "NCCL, which reduces CUDA tensors only"),
    ("cpu:gloo,cuda:nccl", "meta", "has backends for \\['cpu', 'cuda'\\]"),
])
def test_backend_device(group, monkeypatch, backend, data, want):
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    if want in ("cpu", "cuda"):
        assert ranks.backend_device(data) == torch.device(want)
    else:
        with pytest.raises(egp_fx.DistributedError, match=want):
            ranks.backend_device(data)


def test_nccl_group_with_data_on_the_cpu_is_a_clear_error(group, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    with pytest.raises(egp_fx.DistributedError, match="NCCL.*on cpu.*--device cuda.*gloo"):
        egp_fx.calibrate(kinds_net(), union(UNEVEN), progress=False, device="cpu")


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(ranks.TIMEOUT_ENV, "12.5")
    assert ranks._timeout_from_env() == datetime.timedelta(seconds=12.5)
    monkeypatch.setenv(ranks.TIMEOUT_ENV, "soon")
    assert ranks._timeout_from_env() == ranks.DEFAULT_TIMEOUT == datetime.timedelta(minutes=30)


def test_inspection_writes_files_on_rank_0_only(tmp_path, monkeypatch):
    small = egp_fx.compress(planted_net(), union(UNEVEN), progress=False, distributed=False)
    ins = egp_fx.inspect(small)
    monkeypatch.setattr(ranks, "is_writer", lambda: False)
    assert ins.write_html(tmp_path / "a" / "r.html") == tmp_path / "a" / "r.html"
    assert ins.write_pictures(tmp_path / "b") == [] and ins.save_graph(tmp_path / "g.json")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "g.json").exists()
    monkeypatch.setattr(ranks, "is_writer", lambda: True)
    assert ins.write_html(tmp_path / "a" / "r.html").stat().st_size > 1000
