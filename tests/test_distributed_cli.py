"""egp-fx under torchrun with 2 processes (gloo on 127.0.0.1, 1 thread each) against the same
command in one process: the same report, the same pruned weights, one output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from spawn_ranks import free_port

import egp_fx.distributed as ranks
from egp_fx import cli, errors
from egp_fx.cli import commands as cli_commands
from egp_fx.distributed import launch

ROOT = Path(__file__).resolve().parents[1]
COMPRESS = ["compress", "egp_fx.testing.planted:planted_net", "--data", "random",
            "--input-size", "3x16x16", "--num-batches", "3", "--batch-size", "8", "--no-onnx",
            "--json", "--no-progress"]
PRUNE = ["prune", "egp_fx.testing.ranks:tiny_net", "--data", "digits", "--input-size", "8",
         "--method", "imp", "--iterations", "1", "--epochs", "1", "--lr", "0.05", "--batch-size", "32",
         "--num-batches", "4", "--json", "--no-progress"]


def torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m egp_fx ARGS` on 127.0.0.1; every process it started is
    killed when it runs past `timeout`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "EGP_FX_COLLECTIVE_TIMEOUT": "60",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "egp_fx",
           *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _report(doc: dict) -> dict:
    rep = dict(doc["report"])
    rep.pop("seconds")
    rep["passes"] = [{k: v for k, v in p.items() if k != "seconds"} for p in rep["passes"]]
    return rep


def test_compress_under_torchrun_equals_one_process(capsys):
    two = torchrun(COMPRESS)
    assert two.returncode == 0, two.stderr
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 1, two.stdout                 # rank 0 alone prints
    assert cli.main(COMPRESS) == 0
    one = json.loads(capsys.readouterr().out)
    got = json.loads(lines[0])
    assert _report(got) == _report(one)
    assert got["decisions"] == one["decisions"] == {"narrowed": 1, "linearised": 1, "kept": 2}


@pytest.mark.slow
def test_prune_under_torchrun_trains_what_one_process_trains(capsys, tmp_path):
    two = torchrun([*PRUNE, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.strip().splitlines()) == 1
    assert cli.main([*PRUNE, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert json.loads(two.stdout)["final"]["sparsity"] == one["final"]["sparsity"]
    a = load_file(str(tmp_path / "one" / "pruned.safetensors"))
    b = load_file(str(tmp_path / "two" / "pruned.safetensors"))
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        assert torch.equal(a[k] == 0, b[k] == 0)          # the same masks


def test_prune_under_ranks_refuses_a_batch_it_cannot_split(capsys, monkeypatch):
    monkeypatch.setattr(cli_commands, "enabled", lambda flag: True)
    monkeypatch.setattr(cli_commands, "world_size", lambda: 2)
    code = cli.main([*PRUNE[:PRUNE.index("--batch-size")], "--batch-size", "33"])
    assert code == errors.EXIT_USAGE
    assert "--batch-size 33 must be a multiple of the number of processes (2)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("world", [2, 3])
def test_shards_put_together_are_the_single_process_batches(monkeypatch, world):
    """Whole batches dealt in turn (calibration), and each batch split over the ranks (training):
    the ranks' batches, put together, are the batches of one process."""
    data = torch.utils.data.TensorDataset(torch.arange(23))
    whole = [b[0].tolist() for b in torch.utils.data.DataLoader(data, batch_size=6)][:3]
    dealt, split = {}, []
    for r in range(world):
        monkeypatch.setattr(launch, "rank", lambda r=r: r)
        monkeypatch.setattr(launch, "world_size", lambda: world)
        mine = [b[0].tolist() for b in launch.shard_batches(data, 6, 3)]
        dealt.update({r + world * i: b for i, b in enumerate(mine)})
        split.append([b[0].tolist() for b in launch.shard_samples(data, 6 * world)])
    assert [dealt[i] for i in sorted(dealt)] == whole
    assert set(dealt[1]) != set(whole[0])                # the negative case: not the same batch
    padded = list(range(23)) + list(range(-(-23 // world) * world - 23))   # DistributedSampler
    big = 6 * world
    for i in range(-(-len(padded) // big)):               # every rank its part of batch i
        assert sorted(x for r in range(world) for x in split[r][i]) == \
            sorted(padded[i * big:(i + 1) * big])


def test_ranks_other_than_0_print_and_write_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_commands, "is_writer", lambda: False)
    monkeypatch.setattr(ranks, "is_writer", lambda: False)
    assert cli.main([*COMPRESS, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()
