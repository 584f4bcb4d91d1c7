#!/usr/bin/env bash
# make wheels: one wheel per torch build, each compiled in a fresh copy of the source tree (so the
# in-place development build and the two wheels never share objects):
#   pysparse_kernels-<v>+cpu    against torch 2.13.0 (CPU) in .venv
#   pysparse_kernels-<v>+cu130  against torch 2.14.1 (CUDA 13.0) in .venv-cu, for $CUDA_ARCH_LIST
# Adding a CUDA version: a venv with that CUDA torch and a matching nvcc, then one more `build`
# line below (the local version label +cuXY comes from torch.version.cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${WHEEL_DIR:-$ROOT/dist}
mkdir -p "$OUT"

build() {  # build <python> [VAR=value ...]
  local py=$1; shift
  local tree
  tree=$(mktemp -d)
  git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$tree"
  echo "== building with $("$py" -c 'import torch; print("torch", torch.__version__)') $*"
  if ! (cd "$tree" && env "$@" "$py" setup.py -q bdist_wheel -d "$OUT" > build.log 2>&1); then
    tail -40 "$tree/build.log"; exit 1
  fi
  rm -rf "$tree"
}

build "$ROOT/.venv/bin/python" PYSPARSE_NO_CUDA=1 MAX_JOBS=2
build "$ROOT/.venv-cu/bin/python" PYSPARSE_FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH" \
  TORCH_CUDA_ARCH_LIST="${CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS=2
ls -1 "$OUT"
