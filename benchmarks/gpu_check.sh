#!/usr/bin/env bash
# One call on a GPU machine (torch with CUDA, triton, nvcc): build pysparse against the torch that
# is there, run the GPU-relevant tests on CUDA tensors, then time every GPU path against its
# peers, printing one table last. Budget: under 8 minutes on one H200. Shared by the GPU issues:
# each adds its tests and its rows to benchmarks/gpu_bench.py.
#   bash benchmarks/gpu_check.sh            (writes logs under $OUT when the device tool sets it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pysparse_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build ($(( $(date +%s) - start )) s)"
# Only the GPU at hand's architecture (9.0 on an H200): half the nvcc time of the wheels' 8.0;9.0.
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=16 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import pysparse, json; print(json.dumps(pysparse.info()))" | tee "$OUT/info.json"

echo "== tests ($(( $(date +%s) - start )) s)"
# No -x: one failure must not hide the others; -rf lists them at the end.
timeout 300 $PY -m pytest -q -rf -p no:cacheprovider tests/test_triton_nm_linear.py tests/test_nm_spmm.py tests/test_csr_spmm.py \
  tests/test_checked_indices.py tests/test_op_registry.py \
  tests/test_triton_masked_attention.py tests/test_triton_pruned_ffn.py tests/test_triton_bsr_spmm.py tests/test_triton_csr_sddmm.py \
  2>&1 | tee "$OUT/tests.log" | tail -25

echo "== timings ($(( $(date +%s) - start )) s)"
timeout 300 $PY benchmarks/gpu_bench.py 2>&1 | tee "$OUT/bench.log"
echo "== done in $(( $(date +%s) - start )) s"
