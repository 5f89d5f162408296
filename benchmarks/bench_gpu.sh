#!/usr/bin/env bash
# The GPU figures in one command, each step bounded so a slow one leaves the others their time:
#   bench_llm_gpu.py     OPT-125m architecture with planted dead FFN units: original,
#                        compressed for the cuda and ort-cpu targets, width picked by timing,
#                        oracles; fp16 eager and torch.compile; compress(device="cuda") peak
#                        memory
#   bench_vision_gpu.py  ResNet-18 with 4 dead blocks against its oracle (target cuda), fp16
#                        eager and CUDA graphs, batch 1, 8 and 32
#   a test subset on the machine's torch (capture, transformers, into_model)
# BENCH_SECONDS=0 leaves bench_vision_gpu.py out.
#
#     bash benchmarks/bench_gpu.sh OUT            # OUT: folder for results and logs
set -u
out=$(realpath "${1:?usage: bench_gpu.sh OUT}")
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root/benchmarks"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
timeout "${LLM_SECONDS:-330}" python bench_llm_gpu.py --out "$out/gpu_llm" --repeats 30 \
    --compile-models original graph-cuda model-cuda oracle-64 --time-budget "${LLM_BUDGET:-170}" \
    > "$out/gpu_llm.log" 2>&1
echo "gpu_llm rc=$?" >> "$out/rc.txt"
[ "${BENCH_SECONDS:-70}" -gt 0 ] && timeout "${BENCH_SECONDS:-70}" python bench_vision_gpu.py \
    "$out" --ks 4 --vit-variants linear \
    --batch-sizes 1 8 32 --variants fp16 fp16+cudagraph --time-budget 30 \
    > "$out/gpu_bench.log" 2>&1
echo "gpu_bench rc=$?" >> "$out/rc.txt"
cd "$root"
timeout "${TEST_SECONDS:-60}" python -m pytest -q -x -p no:cacheprovider \
    tests/test_capture.py tests/test_transformers.py tests/test_into_model.py > "$out/pytest.log" 2>&1
echo "pytest rc=$?" >> "$out/rc.txt"
cat "$out/rc.txt"
