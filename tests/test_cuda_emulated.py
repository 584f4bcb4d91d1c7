"""The CUDA kernels' device code (csrc/cuda/*_kernel.cuh), run on the CPU under the emulator in
tests/cuda_emu/, launched by the launchers' own plans (csrc/cuda/*_launch.cuh: kernel choice, grid,
arguments), so that index math, bounds, tails, dtype conversions, the warp-shuffle protocol, the
error flags and the launches themselves are checked on every CI run although no GPU is attached. What it cannot check (timing, coalescing, the memory model) is left to
benchmarks/gpu_check.sh on a GPU.

The emulator needs a C++20 compiler and the CUDA headers (cuda_fp16.h, cuda_bf16.h); the test
skips, saying so, where either is missing.
"""
from __future__ import annotations

import ctypes
import glob
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import pysparse
from pysparse import CSR
from conftest import assert_close, gen, randn, random_sparse

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
# cpu::DType and cpu::IType (csrc/include/kernels.h), which name CsrSpmmArgs' element types
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INDEX_KINDS = {0: (torch.int32, torch.int32), 1: (torch.int64, torch.int64), 2: (torch.int32, torch.int16)}

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


class CsrSpmmArgs(ctypes.Structure):
    """csrc/cuda/csr_spmm_launch.cuh's CsrSpmmArgs: every argument of a batch of products."""
    _fields_ = [("crow", _P), ("col", _P), ("val", _P), ("perm", _P), ("B", _P), ("bias", _P), ("out", _P),
                ("bad", _P), ("M", _I64), ("K", _I64), ("nnz", _I64), ("n", _I64), ("batch", _I64),
                ("ldb", _I64), ("ldbc", _I64), ("sbb", _I64), ("ldo", _I64), ("ldoc", _I64), ("sbo", _I64),
                ("dtype", _I32), ("itype", _I32)]


class CsrSpmmOverrides(ctypes.Structure):
    """The plan's choices a test may force: vec (-1: the plan's), max_cols and max_batch (0: none)."""
    _fields_ = [("vec", _I32), ("max_cols", _I64), ("max_batch", _I64)]


class NmCompressArgs(ctypes.Structure):
    """csrc/cuda/nm_compress_launch.cuh's NmCompressArgs."""
    _fields_ = [("dense", _P), ("values", _P), ("mask", _P), ("first_bad", _P), ("R", _I64), ("K", _I64),
                ("n", _I32), ("m", _I32), ("elem_size", _I32)]


class NmDecompressArgs(ctypes.Structure):
    """csrc/cuda/nm_compress_launch.cuh's NmDecompressArgs."""
    _fields_ = [("values", _P), ("mask", _P), ("dense", _P), ("R", _I64), ("K", _I64), ("n", _I32), ("m", _I32),
                ("elem_size", _I32)]


def _check_layout(L, struct):
    """Every field of the ctypes mirror `struct` where the C compiler put it, and no field missing
    (the sizes agree): a mismatch would hand a kernel the wrong argument, not fail."""
    name, off, size = struct.__name__.encode(), ctypes.c_int64(), ctypes.c_int64()
    assert L.emu_layout(name, b"", ctypes.byref(off), ctypes.byref(size)), f"kernels.cpp does not list {name}"
    assert size.value == ctypes.sizeof(struct), f"{struct.__name__}: C has {size.value} bytes"
    for field, _ in struct._fields_:
        assert L.emu_layout(name, field.encode(), ctypes.byref(off), ctypes.byref(size)), f"no C field {field}"
        mirror = getattr(struct, field)
        assert (off.value, size.value) == (mirror.offset, mirror.size), f"{struct.__name__}.{field}"


def _cuda_include():
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    roots += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*"))
    for r in roots:
        if r and os.path.exists(os.path.join(r, "include", "cuda_bf16.h")):
            return os.path.join(r, "include")
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    inc, cxx = _cuda_include(), shutil.which("g++")  # g++ -O1: see the call-site check in emu.h
    if inc is None or cxx is None:
        pytest.skip("CUDA emulation needs the CUDA headers (CUDA_HOME or /usr/local/cuda) and g++")
    lib = tmp_path_factory.mktemp("cuda_emu") / "libpysparse_cuda_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           f"-I{inc}", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{ROOT / 'csrc' / 'include'}", str(EMU / "kernels.cpp"),
           "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    L = ctypes.CDLL(str(lib))
    p, i64, i32, u32, ptr = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint, ctypes.POINTER
    L.emu_layout.restype = i32
    L.emu_layout.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ptr(i64), ptr(i64)]
    for struct in (CsrSpmmArgs, CsrSpmmOverrides, NmCompressArgs, NmDecompressArgs):
        _check_layout(L, struct)
    L.emu_csr_spmm.restype = ctypes.c_char_p
    L.emu_csr_spmm.argtypes = [ptr(CsrSpmmArgs), ptr(CsrSpmmOverrides)]
    L.emu_csr_spmm_aligned.restype = i32
    L.emu_csr_spmm_aligned.argtypes = [p, i64, i64, i32, i32]
    L.emu_csr_spmm_vec.restype = i32
    L.emu_csr_spmm_vec.argtypes = [i64, i32]
    L.emu_nm_compress.restype = ctypes.c_char_p
    L.emu_nm_compress.argtypes = [ptr(NmCompressArgs), u32]
    L.emu_nm_decompress.restype = ctypes.c_char_p
    L.emu_nm_decompress.argtypes = [ptr(NmDecompressArgs), u32]
    L.emu_selftest.restype = ctypes.c_char_p
    L.emu_selftest.argtypes = [i32, p]
    return L


def _ptr(t):
    return None if t is None else t.data_ptr()


def _launcher_perm(crow):
    """The CUDA launcher's row order: a stable descending sort of the row lengths."""
    return torch.sort((crow[1:] - crow[:-1]).long(), stable=True, descending=True).indices.contiguous()


def run_csr(emu, crow, col, val, K, B, *, bias=None, out=None, vec=-1, max_cols=0, max_batch=0, perm=None,
            flag=True):
    """Runs the emulated kernel for A (CSR tensors) @ B (K, n) (+ bias), the one the launcher picks
    unless `vec` forces one (0: the narrow kernel, 1, 4 or 8 columns per lane). B may have a row
    stride above n, or be a batch (batch, K, n) with any batch stride (one launch per max_batch
    matrices when > 0); `out` (M, n) or (batch, M, n) may be a column slice of a wider tensor. For
    the narrow kernel B and out may have any column stride (the linear layout's x^T and y^T).
    flag=False passes a null flag, as the launcher does for indices it checked before. Returns
    (out, bad flag or None)."""
    M, n = crow.numel() - 1, B.shape[-1]
    B3 = B if B.dim() == 3 else B[None]
    if out is None:
        out = torch.empty(*B.shape[:-2], M, n, dtype=val.dtype)
    out3 = out if out.dim() == 3 else out[None]
    perm = _launcher_perm(crow) if perm is None else perm
    bad = torch.zeros(1, dtype=torch.int32) if flag else None
    itype = {dtypes: code for code, dtypes in INDEX_KINDS.items()}[(crow.dtype, col.dtype)]
    args = CsrSpmmArgs(crow=_ptr(crow), col=_ptr(col), val=_ptr(val), perm=_ptr(perm), B=_ptr(B3), bias=_ptr(bias),
                       out=_ptr(out3), bad=_ptr(bad), M=M, K=K, nnz=val.numel(), n=n, batch=B3.shape[0],
                       ldb=B3.stride(1), ldbc=B3.stride(2), sbb=B3.stride(0), ldo=out3.stride(1),
                       ldoc=out3.stride(2), sbo=out3.stride(0), dtype=DTYPE_CODE[val.dtype], itype=itype)
    force = CsrSpmmOverrides(vec=vec, max_cols=max_cols, max_batch=max_batch)
    err = emu.emu_csr_spmm(ctypes.byref(args), ctypes.byref(force))
    assert err is None, err.decode()
    return out, int(bad.item()) if flag else None


def _matrix(M, K, dtype, seed, *, long_row=None):
    """Random sparse (M, K): every 5th row empty, and row `long_row` with most of its K columns
    (several 32-nonzero chunks of the warp's loop)."""
    W = random_sparse(M, K, 0.15, dtype, gen(seed))
    if long_row is not None:
        W[long_row] = randn(K, dtype=dtype, g=gen(seed + 1)) * (torch.rand(K, generator=gen(seed + 2)) < 0.8)
    return W


def _csr_tensors(W, kind):
    rdt, cdt = INDEX_KINDS[kind]
    A = CSR.from_dense(W, index_dtype=torch.int64 if rdt == torch.int64 else torch.int32)
    return A.crow_indices.to(rdt).contiguous(), A.col_indices.to(cdt).contiguous(), A.values.contiguous()


def _check(out, W, B, bias, dtype, what):
    ref = W.double() @ B.double()
    absref = W.double().abs() @ B.double().abs()
    if bias is not None:
        ref, absref = ref + bias.double()[:, None], absref + bias.double().abs()[:, None]
    assert_close(out, ref, absref, dtype, what=what)


# ---------------------------------------------------------------------------------------------
# csr_spmm_kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["i32", "i64", "i32-i16"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_csr_matches_reference(emu, dtype, kind, bias):
    """37 rows (a partial last block), 127 columns, empty rows and a row of ~100 nonzeros. n = 5
    runs the narrow kernel (lanes split the nonzeros); 20 one column per lane; 130 four per lane
    with scalar loads (rows of B not 4-aligned) and a ragged last lane; 132 four per lane with
    vector loads; 260 and 264 the same with eight per lane for fp16/bf16 (four for fp32)."""
    M, K = 37, 127
    W = _matrix(M, K, dtype, 1, long_row=6)
    crow, col, val = _csr_tensors(W, kind)
    b = randn(M, dtype=dtype, g=gen(3)) if bias else None
    for n in (5, 20, 130, 132, 260, 264):
        B = randn(K, n, dtype=dtype, g=gen(n))
        out, bad = run_csr(emu, crow, col, val, K, B, bias=b)
        assert bad == 0
        _check(out, W, B, b, dtype, f"n={n}")


_WIDTHS = (1, 2, 3, 7, 8, 9, 31, 32, 33, 127, 128, 129, 131, 255, 256, 300)
_KERNELS = {-1: "auto", 0: "narrow", 1: "vec1", 4: "vec4", 8: "vec8"}  # vec8: 2-byte elements only


@pytest.mark.parametrize("n,vec", [(n, v) for n in _WIDTHS for v in _KERNELS if v != 0 or n <= 8],
                         ids=lambda x: str(x))
def test_csr_every_width_and_kernel(emu, n, vec):
    """Widths around the narrow kernel's limit, one lane's and one warp's columns, for every kernel
    that can take them (the narrow one up to 8 columns; -1 is the launcher's choice)."""
    M, K, dtype = 9, 70, torch.bfloat16
    W = _matrix(M, K, dtype, n, long_row=2)
    crow, col, val = _csr_tensors(W, 0)
    B = randn(K, n, dtype=dtype, g=gen(7))
    out, bad = run_csr(emu, crow, col, val, K, B, vec=vec)
    assert bad == 0
    _check(out, W, B, None, dtype, f"n={n} vec={vec}")


def test_csr_takes_the_aligned_path_only_when_it_may(emu):
    B = torch.zeros(4, 256)
    assert emu.emu_csr_spmm_aligned(_ptr(B), 256, 1024, 4, 4)
    assert not emu.emu_csr_spmm_aligned(_ptr(B) + 4, 256, 1024, 4, 4)  # one float in
    assert not emu.emu_csr_spmm_aligned(_ptr(B), 254, 1024, 4, 4)  # rows not all aligned
    assert not emu.emu_csr_spmm_aligned(_ptr(B), 256, 1022, 4, 4)  # matrices of a batch not all aligned
    assert emu.emu_csr_spmm_aligned(_ptr(B) + 8, 256, 1024, 4, 2)  # 8-byte vectors of fp16
    assert emu.emu_csr_spmm_aligned(_ptr(B) + 16, 256, 1024, 8, 2)  # 16-byte vectors of fp16
    assert not emu.emu_csr_spmm_aligned(_ptr(B) + 8, 256, 1024, 8, 2)
    assert not emu.emu_csr_spmm_aligned(_ptr(B), 260, 1024, 8, 2)


def test_csr_lane_width_is_one_16_byte_load_once_n_fills_a_warp(emu):
    widths = {(n, e): emu.emu_csr_spmm_vec(n, e) for n in (9, 127, 128, 255, 256, 4096) for e in (4, 2)}
    assert widths == {(9, 4): 1, (127, 4): 1, (128, 4): 4, (255, 4): 4, (256, 4): 4, (4096, 4): 4,
                      (9, 2): 1, (127, 2): 1, (128, 2): 4, (255, 2): 4, (256, 2): 8, (4096, 2): 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("offset", [0, 1, 2, 4], ids=lambda o: f"off{o}")
@pytest.mark.parametrize("n", [200, 300])
def test_csr_strided_and_misaligned_operands_write_only_their_columns(emu, dtype, offset, n):
    """B a column slice of a wider matrix starting `offset` elements in (unaligned for vector
    loads unless 0, or 4 for 4-wide fp16 ones), out a slice of a NaN-filled wider buffer: every
    column outside stays NaN. fp16 at n = 300 takes 8 columns (16 bytes) per lane."""
    M, K = 13, 40
    W = _matrix(M, K, dtype, 11, long_row=4)
    crow, col, val = _csr_tensors(W, 0)
    wide = randn(K, n + 12, dtype=dtype, g=gen(12))
    B = wide[:, offset:offset + n]
    buf = torch.full((M, n + 9), float("nan"), dtype=dtype)
    out = buf[:, offset:offset + n]
    run_csr(emu, crow, col, val, K, B, out=out)
    _check(out, W, B, None, dtype, f"offset={offset}")
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[:, offset:offset + n] = False
    assert buf[outside].isnan().all(), "the kernel wrote outside its output columns"


@pytest.mark.parametrize("n", [3, 140])
def test_csr_result_does_not_depend_on_row_order(emu, n):
    M, K, dtype = 23, 50, torch.float32
    W = _matrix(M, K, dtype, 21, long_row=0)
    crow, col, val = _csr_tensors(W, 1)
    B = randn(K, n, dtype=dtype, g=gen(22))
    first, _ = run_csr(emu, crow, col, val, K, B)
    for perm in (torch.arange(M), torch.arange(M).flip(0), torch.randperm(M, generator=gen(23))):
        again, _ = run_csr(emu, crow, col, val, K, B, perm=perm)
        assert torch.equal(first, again), "a row's sum depends only on its own nonzeros' order"


@pytest.mark.parametrize("vec,max_cols", [(1, 32), (1, 64), (4, 128), (4, 256), (8, 256), (8, 512)])
def test_csr_column_chunks_cover_every_column(emu, vec, max_cols):
    """The launcher loops over launches of at most 65535 * 32 * VEC columns (gridDim.y's limit);
    here with small chunks: results equal one launch bit for bit."""
    M, K, n = 11, 30, 600
    dtype = torch.bfloat16 if vec == 8 else torch.float32
    W = _matrix(M, K, dtype, 31)
    crow, col, val = _csr_tensors(W, 0)
    B = randn(K, n, dtype=dtype, g=gen(32))
    whole, _ = run_csr(emu, crow, col, val, K, B, vec=vec)
    chunked, _ = run_csr(emu, crow, col, val, K, B, vec=vec, max_cols=max_cols)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["i32", "i64", "i32-i16"])
@pytest.mark.parametrize("bad_col", [-1, 40, 32767], ids=lambda c: f"col{c}")
@pytest.mark.parametrize("n", [8, 40])
@pytest.mark.parametrize("flag", [True, False], ids=["flag", "null-flag"])
def test_csr_out_of_range_column_is_flagged_and_not_followed(emu, kind, bad_col, n, flag):
    M, K, dtype = 6, 40, torch.float32
    W = _matrix(M, K, dtype, 41, long_row=3)
    crow, col, val = _csr_tensors(W, kind)
    col = col.clone()
    col[int(crow[3]) + 5] = bad_col
    B = randn(K, n, dtype=dtype, g=gen(42))
    out, bad = run_csr(emu, crow, col, val, K, B, flag=flag)
    assert bad == (1 if flag else None)
    others = [r for r in range(M) if r != 3]
    _check(out[others], W[others], B, None, dtype, "rows without the bad index")


@pytest.mark.parametrize("tamper", ["decreasing", "past_nnz", "negative"])
@pytest.mark.parametrize("n", [8, 40])
@pytest.mark.parametrize("flag", [True, False], ids=["flag", "null-flag"])
def test_csr_inconsistent_row_pointers_are_flagged(emu, tamper, n, flag):
    M, K, dtype = 6, 40, torch.float32
    W = _matrix(M, K, dtype, 51, long_row=1)
    crow, col, val = _csr_tensors(W, 0)
    crow = crow.clone()
    if tamper == "decreasing":
        crow[2] = crow[1] - 1
    elif tamper == "past_nnz":
        crow[M] = val.numel() + 7
    else:
        crow[1] = -3
    B = randn(K, n, dtype=dtype, g=gen(52))
    _, bad = run_csr(emu, crow, col, val, K, B, flag=flag)
    assert bad == (1 if flag else None)


@pytest.mark.parametrize("n,vec", [(5, -1), (40, 1), (132, -1), (130, 4), (300, -1), (264, 8)], ids=lambda x: str(x))
@pytest.mark.parametrize("max_batch", [0, 2], ids=["one-launch", "chunks-of-2"])
def test_csr_batch_is_one_launch_per_chunk(emu, n, vec, max_batch):
    """A batch (5, K, n) with a padded batch stride and bias, in one launch (grid.z) or in chunks
    (the launcher's loop past gridDim.z's limit): each matrix equals its own product, bit for bit,
    and nothing outside the output matrices is written."""
    M, K, batch, dtype = 19, 45, 5, torch.float16
    W = _matrix(M, K, dtype, 61, long_row=3)
    crow, col, val = _csr_tensors(W, 0)
    b = randn(M, dtype=dtype, g=gen(62))
    big = randn(batch, K + 3, n, dtype=dtype, g=gen(63))
    B = big[:, :K]                                          # batch stride (K + 3) * n
    buf = torch.full((batch, M + 2, n), float("nan"), dtype=dtype)
    out = buf[:, 1:M + 1]
    _, bad = run_csr(emu, crow, col, val, K, B, bias=b, out=out, vec=vec, max_batch=max_batch)
    assert bad == 0
    for z in range(batch):
        one, _ = run_csr(emu, crow, col, val, K, B[z].contiguous(), bias=b, vec=vec)
        assert torch.equal(out[z], one), f"matrix {z}"
    assert buf[:, 0].isnan().all() and buf[:, M + 1].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_csr_narrow_linear_layout_needs_no_copies(emu, dtype, T):
    """The launcher's csr_linear at decode: B = x^T (column stride K) and out = y^T (column stride
    M) go to the narrow kernel as they are; y (T, M) comes out as x @ A^T + bias."""
    M, K = 29, 61
    W = _matrix(M, K, dtype, 71, long_row=2)
    crow, col, val = _csr_tensors(W, 0)
    x, b = randn(T, K, dtype=dtype, g=gen(72)), randn(M, dtype=dtype, g=gen(73))
    y = torch.full((T, M), float("nan"), dtype=dtype)
    _, bad = run_csr(emu, crow, col, val, K, x.t(), bias=b, out=y.t())
    assert bad == 0
    _check(y.t(), W, x.t(), b, dtype, f"T={T}")


def test_csr_wide_kernel_refuses_strided_columns(emu):
    W = _matrix(5, 9, torch.float32, 74)
    crow, col, val = _csr_tensors(W, 0)
    with pytest.raises(AssertionError, match="unit column strides"):
        run_csr(emu, crow, col, val, 9, randn(40, 9, g=gen(75)).t())


# ---------------------------------------------------------------------------------------------
# nm_compress_kernel / nm_decompress_kernel, bit for bit against the CPU op

NM_PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (8, 16), (5, 16)]


def _elem(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def _nm_compress_args(W, n, m, vals, mask, first_bad):
    return NmCompressArgs(dense=_ptr(W), values=_ptr(vals), mask=_ptr(mask), first_bad=_ptr(first_bad),
                          R=W.shape[0], K=W.shape[1], n=n, m=m, elem_size=_elem(W.dtype))


def _nm_dense(R, K, n, m, dtype, seed):
    W = pysparse.prune.nm(randn(R, K, g=gen(seed)), n, m)
    W = W * (torch.rand(R, K, generator=gen(seed + 1)) >= 0.3)  # groups with fewer than n
    return (W * 20).to(torch.int8) if dtype == torch.int8 else W.to(dtype)


@pytest.mark.parametrize("n,m", NM_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("blocks", [0, 1], ids=["grid", "1block"])
def test_nm_compress_and_decompress_match_the_cpu_op(emu, n, m, dtype, blocks):
    """K = 3m + an odd multiple of m (mask bytes shared by groups when m = 4, a last partial byte
    when K % 8 != 0); one block makes every thread stride over several units."""
    R, K = 70, 5 * m
    W = _nm_dense(R, K, n, m, dtype, seed=n * m)
    want_v, want_mask = torch.ops.pysparse.nm_compress(W, n, m)
    vals = torch.full_like(want_v, 99)
    mask = torch.full_like(want_mask, 0xAA)
    first_bad = torch.tensor([R], dtype=torch.int64)
    err = emu.emu_nm_compress(ctypes.byref(_nm_compress_args(W, n, m, vals, mask, first_bad)), blocks)
    assert err is None, err.decode()
    assert int(first_bad) == R
    assert torch.equal(vals, want_v) and torch.equal(mask, want_mask)
    back = torch.full_like(W, 77)
    args = NmDecompressArgs(values=_ptr(vals), mask=_ptr(mask), dense=_ptr(back), R=R, K=K, n=n, m=m,
                            elem_size=_elem(dtype))
    err = emu.emu_nm_decompress(ctypes.byref(args), blocks)
    assert err is None, err.decode()
    assert torch.equal(back, W)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16)])
def test_nm_compress_names_the_first_row_with_too_many_nonzeros(emu, n, m):
    """Rows 17 and 29 each hold a group of n + 1 nonzeros: the kernel reports row 17."""
    R, K, dtype = 40, 4 * m, torch.float16
    W = _nm_dense(R, K, n, m, dtype, seed=5)
    W[29, m:2 * m] = 0.0
    W[29, m:m + n + 1] = 1.0  # one nonzero too many
    W[17, 4 * m - n - 1:4 * m] = 2.0  # the last group of row 17, likewise
    vals = torch.empty(R, K // m * n, dtype=dtype)
    mask = torch.empty(R, (K + 7) // 8, dtype=torch.uint8)
    first_bad = torch.tensor([R], dtype=torch.int64)
    err = emu.emu_nm_compress(ctypes.byref(_nm_compress_args(W, n, m, vals, mask, first_bad)), 0)
    assert err is None, err.decode()
    assert int(first_bad) == 17


def test_nm_launch_refuses_an_element_size_without_a_kernel(emu):
    """8-byte values (the CPU op takes them) have no CUDA instance: the launch plan says so rather
    than running the 1-byte kernel over them."""
    args = NmDecompressArgs(values=None, mask=None, dense=None, R=4, K=8, n=2, m=4, elem_size=8)
    err = emu.emu_nm_decompress(ctypes.byref(args), 0)
    assert err is not None and "4, 2 or 1 bytes" in err.decode()


# ---------------------------------------------------------------------------------------------
# The emulator itself: it must catch what it says it catches.

@pytest.mark.parametrize("case,want", [
    (0, None),
    (1, "__shfl_sync reached by 5 of 32 lanes"),
    (2, "__shfl_sync with a partial mask"),
    (3, "__shfl_sync reached by 16 of 32 lanes"),
    (4, "__shfl_sync called from different places"),
    (5, "misaligned 16-byte vector load"),
])
def test_emulator_checks_the_shuffle_protocol(emu, case, want):
    """0: every lane shuffles (lane l receives lane l+1's value, rotating); 1: lanes 5..31 return
    before the shuffle; 2: a partial mask; 3: a branch only half the lanes take; 4: the two halves
    of the warp shuffle in different branches; 5: a vector load 4 bytes off its alignment."""
    out = torch.full((64,), -1, dtype=torch.int32)
    err = emu.emu_selftest(case, _ptr(out))
    if want is None:
        assert err is None, err.decode()
        assert out.tolist() == [(t & ~31) + ((t + 1) & 31) * 10 for t in range(64)]
    else:
        assert err is not None and want in err.decode()
