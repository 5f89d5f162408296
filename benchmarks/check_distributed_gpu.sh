#!/usr/bin/env bash
# The GPU checks of egp_fx across processes (NCCL), in one short run from the repository root:
#
#     bash benchmarks/check_distributed_gpu.sh [OUT_DIR]   (PYTHON=... picks the interpreter)
#
# N = the number of GPUs (NCCL needs one per process). Each step is bounded in time, prints
# what it checks, and leaves its output in OUT_DIR:
#   1. benchmarks/check_distributed.py on N ranks with NCCL: statistics equal one process's on
#      the union, identical compressed graphs, identical weights and masks after a DDP round,
#      and the clear error for CPU data in an NCCL group; with one GPU, also 2 ranks sharing it
#      over gloo (statistics reduced on the CPU)
#   2. `egp-fx compress` and `egp-fx prune` under torchrun --device cuda against one process
#   3. benchmarks/bench_distributed.py --backend nccl: calibration throughput on 1..N processes
# DEVICE=cpu runs the same steps on the CPU with gloo and 2 processes (a dry run of the script).
set -u
PY=${PYTHON:-python3}
OUT=${1:-gpu_distributed_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 \
       GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo PYTHONUNBUFFERED=1
if [ "${DEVICE:-cuda}" = cpu ]; then
    N=2 DEV=cpu DEV0=cpu BACKEND=gloo
else
    N=$($PY -c "import torch; print(torch.cuda.device_count())") DEV=cuda DEV0=cuda:0 BACKEND=nccl
fi
FAIL=0
port() { $PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
TR=($PY -m torch.distributed.run --nnodes 1 --master_addr 127.0.0.1)
step() {   # step NAME SECONDS COMMAND...: run, keep stdout/stderr, report the exit code
    local name=$1 secs=$2; shift 2
    echo "== $name"
    timeout "$secs" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"; local rc=$?
    grep -E "^(PASS|FAIL)" "$OUT/$name.out"; echo "   exit code $rc"
    [ $rc -eq 0 ] || { FAIL=1; tail -5 "$OUT/$name.err"; }
}
{ nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, 'gpus',
  torch.cuda.device_count())"; } | tee "$OUT/machine.txt"

step check_$BACKEND 240 "${TR[@]}" --master_port "$(port)" --nproc_per_node "$N" \
    benchmarks/check_distributed.py --device $DEV --out "$OUT/check_$BACKEND.json"
if [ "$N" -eq 1 ] && [ $DEV = cuda ]; then
    step check_gloo_one_gpu 240 "${TR[@]}" --master_port "$(port)" --nproc_per_node 2 benchmarks/check_distributed.py --device cuda:0 \
        --backend gloo --out "$OUT/check_gloo_one_gpu.json"
fi

COMPRESS=(compress egp_fx.testing.planted:planted_net --data random --input-size 3x16x16
          --num-batches 3 --batch-size 8 --no-onnx --json --no-progress)
step cli_compress_ranks 180 "${TR[@]}" --master_port "$(port)" --nproc_per_node "$N" -m egp_fx "${COMPRESS[@]}" --device $DEV
step cli_compress_one 180 $PY -m egp_fx "${COMPRESS[@]}" --device $DEV0
PRUNE=(prune egp_fx.testing.ranks:tiny_net --data digits --input-size 8 --method imp --iterations 1
       --epochs 1 --lr 0.05 --batch-size 32 --num-batches 4 --json --no-progress)
step cli_prune_ranks 180 "${TR[@]}" --master_port "$(port)" --nproc_per_node "$N" -m egp_fx \
    "${PRUNE[@]}" --device $DEV --out "$OUT/prune_ranks"
step cli_prune_one 180 $PY -m egp_fx "${PRUNE[@]}" --device $DEV0 --out "$OUT/prune_one"
$PY - "$OUT" <<'PY' | tee "$OUT/cli_compare.txt"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
def report(name):
    doc = json.loads((out / f"{name}.out").read_text().strip().splitlines()[-1])["report"]
    doc.pop("seconds")
    doc["passes"] = [{k: v for k, v in p.items() if k != "seconds"} for p in doc["passes"]]
    return doc
same = report("cli_compress_ranks") == report("cli_compress_one")
print(f"{'PASS' if same else 'FAIL'} cli compress: the torchrun report equals one process's")
a = load_file(str(out / "prune_ranks" / "pruned.safetensors"))
b = load_file(str(out / "prune_one" / "pruned.safetensors"))
diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
masks = all(bool(((a[k] == 0) == (b[k] == 0)).all()) for k in a)
print(f"{'PASS' if masks else 'FAIL'} cli prune: same masks as one process: {masks}; largest "
      f"weight difference {diff:.2e} (TF32 convolutions on the GPU round differently)")
PY
grep -q FAIL "$OUT/cli_compare.txt" && FAIL=1

if [ $DEV = cuda ]; then
    step bench_nccl 300 $PY benchmarks/bench_distributed.py --backend nccl --device cuda \
        --model resnet18 --batch-size 64 --batches 32 --repeats 3 \
        --nprocs "$(seq -s, 1 $((N > 2 ? N : 2)))" --out-stem distributed_gpu
    cp benchmarks/results/distributed_gpu.md benchmarks/results/distributed_gpu.json "$OUT/"
    tail -6 "$OUT/bench_nccl.out"
fi
echo "== all checks: $([ $FAIL -eq 0 ] && echo passed || echo FAILED)"
exit $FAIL
