"""Calibration throughput on 1 and 2 processes under torchrun, and the scaling efficiency.

    .venv/bin/python benchmarks/bench_distributed.py                      # CPU, gloo, 1 thread each
    .venv/bin/python benchmarks/bench_distributed.py --backend nccl --device cuda \
        --model resnet18 --batch-size 64 --batches 64 --nprocs 1,2 --out-stem distributed_gpu

For each process count N the script runs `torchrun --nproc_per_node N` on this script itself
(127.0.0.1 only; gloo pinned to the loopback interface). Every rank takes its share of the same
`--batches` batches (whole batches dealt in turn, as egp-fx does under torchrun), calibrates once
to warm up, then `--repeats` times: a barrier, egp_fx.calibrate on its shard (capture, the local
pass and the reduction over the ranks). A repeat's time is the slowest rank's; the launches of
the process counts are interleaved `--rounds` times, so that a change in the machine's load
falls on all of them;
throughput = samples / median time; scaling efficiency = throughput(N) / (N x throughput(1)).
The reduction alone (the four collectives after the local pass) is timed on rank 0.

CPU runs use one thread per process (OMP_NUM_THREADS=1), so N processes use N cores: on a
machine shared with other jobs the efficiency also measures the load, which is recorded (load
average at the start and the end). NCCL needs one GPU per process: process counts above the
number of GPUs are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from _common import add_results_arg, header, setup_logging, write

import egp_fx
from egp_fx.calibrate import ranks as across
from egp_fx.distributed import backend_device, launch
from egp_fx.pruning.models import resnet18_cifar

MODELS = {"digits": ((3, 32, 32), "ResNet-18, CIFAR stem, width x0.25 (egp_fx.pruning.models)"),
          "resnet18": ((3, 224, 224), "torchvision ResNet-18")}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "digits":
        return resnet18_cifar(width_mult=0.25).eval()
    return torchvision.models.resnet18().eval()


def _batches(args) -> list[torch.Tensor]:
    shape = MODELS[args.model][0]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(args.batch_size, *shape, generator=g) for _ in range(args.batches)]


# ----------------------------------------------------------------------------- worker (a rank)

def worker(args) -> None:
    torch.set_num_threads(args.threads)
    launch.setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = launch.rank_device(args.device) or "cpu"
    model = _model(args.model).to(device)
    mine = [b.to(device) for b in _batches(args)[rank::world]]
    real_reduce, reduce_s = across.reduce, []

    def timed_reduce(*a, **k):
        t0 = time.perf_counter()
        real_reduce(*a, **k)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        reduce_s.append(time.perf_counter() - t0)

    across.reduce = timed_reduce
    egp_fx.calibrate(model, mine[:1], progress=False)                # warm-up
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        egp_fx.calibrate(model, mine, progress=False)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        mine_s = time.perf_counter() - t0
        wire = backend_device(device)
        all_s = [torch.zeros(1, dtype=torch.float64, device=wire) for _ in range(world)]
        dist.all_gather(all_s, torch.tensor([mine_s], dtype=torch.float64, device=wire))
        times.append(max(float(x) for x in all_s))
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "nprocs": world, "backend": dist.get_backend(), "device": str(device),
            "batches_per_rank": [len(_batches(args)[r::world]) for r in range(world)],
            "seconds": times, "reduce_seconds": reduce_s[1:]}))
    launch.teardown()


# ----------------------------------------------------------------------------- parent

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args, folder: Path) -> dict:
    result = folder / f"n{n}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
           str(n), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(__file__).resolve()), "--worker", "--result", str(result),
           *sys.argv[1:]]
    subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="digits")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed calibrations per launch")
    ap.add_argument("--rounds", type=int, default=2,
                    help="launches of each process count, interleaved")
    ap.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--device", default=None, help="cuda for the GPU run (NCCL)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per process count")
    ap.add_argument("--out-stem", default="distributed_cpu")
    add_results_arg(ap)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend == "nccl" and not (args.device or "").startswith("cuda"):
        ap.error("--backend nccl runs on the GPU: pass --device cuda")
    if args.worker:
        worker(args)
        return
    setup_logging()
    title = f"Calibration across processes ({args.backend}, {args.device or 'cpu'})"
    head, meta = header(title, args.threads)
    load_start = os.getloadavg()
    notes = []
    gpus = torch.cuda.device_count() if args.backend == "nccl" else None
    counts = [int(x) for x in args.nprocs.split(",")]
    for n in [n for n in counts if gpus is not None and n > gpus]:
        notes.append(f"{n} processes skipped: NCCL needs one GPU per process, {gpus} here")
    counts = [n for n in counts if gpus is None or n <= gpus]
    by_n: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):          # interleaved: a change of load hits every count
            for n in counts:
                got = run(n, args, Path(tmp))
                if n in by_n:
                    by_n[n]["seconds"] += got["seconds"]
                    by_n[n]["reduce_seconds"] += got["reduce_seconds"]
                else:
                    by_n[n] = got
    rows = [by_n[n] for n in counts]
    samples = args.batches * args.batch_size
    base = next((r for r in rows if r["nprocs"] == 1), None)
    for r in rows:
        r["median_s"] = statistics.median(r["seconds"])
        r["samples_per_s"] = samples / r["median_s"]
        r["efficiency"] = (r["samples_per_s"] / (r["nprocs"] * base["samples_per_s"])
                           if base else None)
        r["reduce_median_ms"] = 1000 * statistics.median(r["reduce_seconds"]) \
            if r["reduce_seconds"] else None
    load_end = os.getloadavg()
    table = ["| processes | backend | device | batches per rank | median s | samples/s | "
             "scaling efficiency | reduction ms (rank 0) |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        red = f"{r['reduce_median_ms']:.1f}" if r["reduce_median_ms"] is not None else "-"
        table.append(f"| {r['nprocs']} | {r['backend']} | {r['device']} | "
                     f"{r['batches_per_rank']} | {r['median_s']:.3f} | {r['samples_per_s']:.1f} "
                     f"| {eff} | {red} |")
    text = "\n".join([
        head, f"Model: {MODELS[args.model][1]}, {args.batches} batches of {args.batch_size} "
        f"({samples} samples of {list(MODELS[args.model][0])}), {args.threads} thread(s) per "
        f"process, median of {args.rounds} x {args.repeats} repeats (each launch warmed up "
        "once, the launches of each process count interleaved); load average (1 min) "
        f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end.", "",
        *table, "", *notes, ""])
    write(args.out_stem, {**meta, "args": vars(args), "rows": rows, "notes": notes,
                          "load_average_start": load_start, "load_average_end": load_end}, text,
          args.results)
    print(text)


if __name__ == "__main__":
    main()
