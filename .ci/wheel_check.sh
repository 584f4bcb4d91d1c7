#!/usr/bin/env bash
# make wheel-check (CI): the wheels from `make wheels` install and work where they should, and fail
# in one sentence where they should not. No GPU needed:
#   1. the +cpu wheel in a fresh virtualenv with torch 2.13.0 passes the smoke test;
#   2. the +cu130 wheel (sm_80/sm_90 code, compiled and linked) imports next to torch 2.14.1 and
#      registers its CUDA kernels;
#   3. the +cpu wheel next to torch 2.14.1 raises the one-sentence version error.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIST=${WHEEL_DIR:-$ROOT/dist}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cpu_whl=$(ls "$DIST"/pysparse_kernels-*+cpu-*.whl | tail -1)
cu_whl=$(ls "$DIST"/pysparse_kernels-*+cu*-*.whl | tail -1)

echo "== 0. the wheels install one top-level import name, pysparse"
for whl in "$cpu_whl" "$cu_whl"; do
  python3 - "$whl" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
tops = {t[:-3] if t.endswith(".py") else t.split(".")[0] for t in tops}
assert tops == {"pysparse"}, f"{sys.argv[1]}: top-level names {sorted(tops)}, expected only pysparse"
top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
if top_level:
    listed = set(zipfile.ZipFile(sys.argv[1]).read(top_level[0]).decode().split())
    assert listed == {"pysparse"}, f"top_level.txt lists {sorted(listed)}"
assert any(n.startswith("pysparse/_triton/kernels/") for n in names), "the Triton kernels are missing"
print("ok:", sys.argv[1].rsplit("/", 1)[-1], "installs only pysparse")
PY
done

echo "== 1. $(basename "$cpu_whl") in a fresh virtualenv"
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 numpy
"$tmp/venv/bin/pip" install -q --disable-pip-version-check --no-deps "$cpu_whl"
(cd "$tmp" && "$tmp/venv/bin/python" "$ROOT/.ci/smoke.py")

echo "== 2. $(basename "$cu_whl") next to torch 2.14.1 (CUDA)"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check --no-deps --target "$tmp/cu" "$cu_whl"
(cd "$tmp" && PYTHONPATH="$tmp/cu" "$ROOT/.venv-cu/bin/python" -c "
import pysparse
i = pysparse.info()
assert i['cuda_built'] and i['cuda_version_built'] == '13.0', i
assert {'nm_compress', 'nm_decompress', 'csr_spmm', 'csr_linear'} <= set(i['cuda_kernels']), i['cuda_kernels']
print('cuda wheel imports; CUDA kernels:', i['cuda_kernels'], 'archs', i['cuda_arch_list'])
")

echo "== 3. the +cpu wheel next to torch 2.14.1"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check --no-deps --target "$tmp/cpu" "$cpu_whl"
msg=$(cd "$tmp" && PYTHONPATH="$tmp/cpu" "$ROOT/.venv-cu/bin/python" -c "import pysparse" 2>&1 | tail -1 || true)
echo "$msg"
case "$msg" in
  "ImportError: pysparse 0.1.0 was built for torch 2.13.0"*"but torch 2.14.1"*"install the pysparse-kernels wheel built for torch 2.14.1 (+cu130)"*) echo "ok: one-sentence error";;
  *) echo "expected the version-mismatch ImportError"; exit 1;;
esac
