"""The CSR JIT (csrc/cpu/csr_jit.cpp): AVX-512 code compiled per pattern for fp32 CSR products
at >= 1024 tokens and 87.5-93.75% sparsity.

The encoder is checked byte for byte against GNU as on random instructions; the products against
the fp64 reference and against the kernels the code replaces (the same call with the JIT off), on
shapes that cut its 28-row chunks, 16-token panels, 4-panel blocks and 768-column slices; in both
layouts, with bias, strided inputs; across thread counts (the summation order
is fixed by the code: bit-identical); and after the pattern or the values change.
The generic plan properties (values trained in place, a pattern written in place or behind the
version counter, inference tensors) run for the JIT in tests/test_csr_plan.py (kind "jit").
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest
import torch

import pysparse
from conftest import assert_close, gen, num_threads, random_sparse
from references import reference_linear, reference_spmm

ops = torch.ops.pysparse
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

avx512 = pytest.mark.skipif("avx512" not in pysparse._C.cpu_isa_supported(),
                            reason="the JIT code is AVX-512")


def _made():
    return pysparse._C.csr_plans_made()


def _pattern(M, K, density, idx=torch.int16, seed=0, empty_rows=True):
    W = random_sparse(M, K, density, torch.float32, gen(seed))
    if empty_rows:
        W[::7] = 0
    A = W.to_sparse_csr()
    crow = A.crow_indices().to(torch.int64 if idx == torch.int64 else torch.int32)
    return W, crow, A.col_indices().to(idx), A.values()


def _kernels(fn):
    """fn() with the JIT off: the kernels it replaces."""
    old = pysparse._C.set_csr_jit(False)
    try:
        return fn()
    finally:
        pysparse._C.set_csr_jit(old)


# ---------------------------------------------------------------------------------------------
# The encoder against GNU as.
GPRS = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
BASES = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15]


# Each form: (encoder line, GNU as line) from random operands: zmm d and a, GPRs g and s, a base b
# (not rsp / r12: the encoder needs no SIB), a displacement o and an immediate i.
FORMS = [
    lambda d, a, g, s, b, o, i: (f"vzero {d}", f"vpxord zmm{d}, zmm{d}, zmm{d}"),
    lambda d, a, g, s, b, o, i: (f"vload {d} {b} {o}", f"vmovups zmm{d}, ZMMWORD PTR [{GPRS[b]} + {o}]"),
    lambda d, a, g, s, b, o, i: (f"vstore {b} {o} {d}", f"vmovups ZMMWORD PTR [{GPRS[b]} + {o}], zmm{d}"),
    lambda d, a, g, s, b, o, i: (f"vfmadd {d} {a} {b} {o}",
                                 f"vfmadd231ps zmm{d}, zmm{a}, DWORD PTR [{GPRS[b]} + {o}]{{1to16}}"),
    lambda d, a, g, s, b, o, i: (f"mov {g} {s}", f"mov {GPRS[g]}, {GPRS[s]}"),
    lambda d, a, g, s, b, o, i: (f"lea {g} {b} {o}", f"lea {GPRS[g]}, [{GPRS[b]} + {o}]"),
    lambda d, a, g, s, b, o, i: (f"add {g} {i}", f"add {GPRS[g]}, {i}"),
    lambda d, a, g, s, b, o, i: (f"xor {g} {s}", f"xor {GPRS[g]}, {GPRS[s]}"),
    lambda d, a, g, s, b, o, i: (f"cmp {g} {s}", f"cmp {GPRS[g]}, {GPRS[s]}"),
    lambda d, a, g, s, b, o, i: ("vzeroupper", "vzeroupper"),
    lambda d, a, g, s, b, o, i: ("jb 0", "jb L0"),  # short, then long backward jumps as the program grows
]


def _random_program(rng, count):
    """(encoder lines, GNU as lines) of count random instructions of every form the JIT emits."""
    disps = [0, 4, -4, 64, -64, 508, 512, -512, 8128, 8192, -8192, 123456, -7, 3, 2**31 - 4, -2**31]
    imms = [1, -1, 127, 128, -128, -129, 4096, 2**31 - 1, -2**31]
    enc, gas = ["label"], [".intel_syntax noprefix", ".text", "L0:"]
    for _ in range(count):
        o = rng.choice(disps + [rng.randint(-2**20, 2**20)])
        i = rng.choice(imms + [rng.randint(-2**31, 2**31 - 1)])
        e, g = rng.choice(FORMS)(rng.randrange(32), rng.randrange(32), rng.randrange(16), rng.randrange(16),
                                 rng.choice(BASES), o, i)
        enc.append(e), gas.append(g)
    enc.append("ret"), gas.append("ret")
    return enc, gas


@pytest.mark.skipif(not all(shutil.which(t) for t in ("g++", "as", "objcopy")),
                    reason="needs g++, GNU as and objcopy")
def test_encoder_matches_gnu_as(tmp_path):
    exe = tmp_path / "enc"
    subprocess.run(["g++", "-O1", "-std=c++17", "-I", os.path.join(ROOT, "csrc", "cpu"),
                    os.path.join(ROOT, "tests", "jit_encodings.cpp"), "-o", str(exe)], check=True)
    enc, gas = _random_program(random.Random(1), 4000)
    got = subprocess.run([str(exe)], input="\n".join(enc) + "\n", capture_output=True, text=True,
                         check=True).stdout.strip()
    (tmp_path / "t.s").write_text("\n".join(gas) + "\n")
    subprocess.run(["as", "-o", str(tmp_path / "t.o"), str(tmp_path / "t.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "t.o"), str(tmp_path / "t.bin")],
                   check=True)
    want = (tmp_path / "t.bin").read_bytes().hex()
    if got != want:
        i = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
        pytest.fail(f"encoder differs from GNU as at byte {i // 2}: {got[i - 20:i + 30]} vs {want[i - 20:i + 30]}")


# ---------------------------------------------------------------------------------------------
# Products.
# (M, K, density): rows not a multiple of the 28-row chunks (and fewer than 28), K not a multiple
# of a slice, 2 and 3 slices with chunks empty in some (densities before the empty rows: about
# 2/3 of them is what the window 1/16-1/8 sees).
SHAPES = [(200, 300, 0.17), (5, 700, 0.2), (777, 768, 0.12), (130, 1600, 0.12), (40, 2000, 0.11)]


@avx512
@pytest.mark.parametrize("idx", [torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1024, 1030, 1100])
def test_jit_matches_reference_and_kernels(idx, shape, n):
    M, K, d = shape
    W, crow, col, val = _pattern(M, K, d, idx, seed=M + K + n)
    x = torch.randn(n, K, generator=gen(n))
    bias = torch.randn(M, generator=gen(1))
    B = torch.randn(K, n, generator=gen(2))
    pysparse.set_cpu_isa("avx512")
    try:
        made = _made()
        y = ops.csr_linear(x, crow, col, val, [M, K], bias)
        assert _made() == made + 1, "the product did not take the JIT code"
        absref = reference_linear(x.abs(), W.abs(), bias.abs())
        assert_close(y, reference_linear(x, W, bias), absref, torch.float32, what="linear")
        ys = ops.csr_spmm(crow, col, val, [M, K], B)
        assert _made() == made + 1, "spmm made the code again"
        assert_close(ys, reference_spmm(W, B), reference_spmm(W.abs(), B.abs()), torch.float32, what="spmm")
        kern = _kernels(lambda: ops.csr_linear(x, crow, col, val, [M, K], bias))
        assert_close(y, kern.double(), absref, torch.float32, factor=2.0, what="jit vs kernels")
    finally:
        pysparse.set_cpu_isa("auto")


@avx512
def test_jit_strided_input():
    """A strided input (a transposed view) is packed from its strides."""
    M, K, n = 300, 768, 1040
    W, crow, col, val = _pattern(M, K, 0.1, seed=3)
    x = torch.randn(K, n, generator=gen(4)).t()  # (n, K), not contiguous
    bias = torch.randn(M, generator=gen(5))
    made = _made()
    y = ops.csr_linear(x, crow, col, val, [M, K], bias)
    assert _made() == made + 1
    assert_close(y, reference_linear(x, W, bias), reference_linear(x.abs(), W.abs(), bias.abs()), torch.float32,
                 what="strided")


@avx512
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_jit_thread_counts_give_identical_results(threads):
    """Threads take whole panels; each output's summation order is in the code: bit-identical."""
    M, K, n = 500, 1000, 1100
    W, crow, col, val = _pattern(M, K, 0.1, seed=6)
    x = torch.randn(n, K, generator=gen(7))
    with num_threads(1):
        one = ops.csr_linear(x, crow, col, val, [M, K], None)
    with num_threads(threads):
        many = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert torch.equal(many, one)


@avx512
@pytest.mark.parametrize("fault", ["unsorted", "duplicate"])
def test_jit_unsorted_and_duplicate_columns(fault):
    """The code takes a chunk's nonzeros by column whatever their order in a row; a duplicated
    column adds both values, as the dense reference of the stored entries does."""
    M, K, n = 64, 512, 1024
    W, crow, col, val = _pattern(M, K, 0.1, torch.int32, seed=8, empty_rows=False)
    r0, r1 = int(crow[3]), int(crow[4])
    col = col.clone()
    if fault == "unsorted":
        col[r0:r1] = col[r0:r1].flip(0)
    else:
        col[r0 + 1] = col[r0]
    dense = torch.zeros(M, K, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(M), (crow[1:] - crow[:-1]).long())
    dense.index_put_((rows, col.long()), val.double(), accumulate=True)
    x = torch.randn(n, K, generator=gen(9))
    made = _made()
    y = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert _made() == made + 1
    torch.testing.assert_close(y.double(), x.double() @ dense.t(), rtol=1e-4, atol=1e-4)


@avx512
@pytest.mark.parametrize("case", ["few tokens", "dense enough", "too sparse", "bf16", "batched spmm"])
def test_no_jit_where_it_would_lose_or_cannot_run(case):
    M, K = 256, 768
    n, d, dtype = {"few tokens": (512, 0.1, torch.float32), "dense enough": (1024, 0.2, torch.float32),
                   "too sparse": (1024, 0.03, torch.float32), "bf16": (1024, 0.1, torch.bfloat16),
                   "batched spmm": (1024, 0.1, torch.float32)}[case]
    W, crow, col, val = _pattern(M, K, d, seed=10)
    val = val.to(dtype)
    old = pysparse._C.set_csr_plan(False)  # the other plans count too: keep them out
    try:
        made = _made()
        if case == "batched spmm":
            B = torch.randn(2, K, n, generator=gen(11))
            y = ops.csr_spmm(crow, col, val, [M, K], B)
            ref = torch.stack([W.double() @ b.double() for b in B])
        else:
            x = torch.randn(n, K, generator=gen(11)).to(dtype)
            y = ops.csr_linear(x, crow, col, val, [M, K], None)
            ref = x.double() @ W.to(dtype).double().t()
        assert _made() == made
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * 10)
    finally:
        pysparse._C.set_csr_plan(old)


@avx512
def test_jit_with_row_pointers_written_behind_the_version_counter_stays_in_bounds():
    """New row bounds written through .data are not seen: the code keeps the offsets it was made
    with (inside the values), so the product repeats the old numbers."""
    M, K, n = 256, 768, 1024
    W, crow, col, val = _pattern(M, K, 0.1, torch.int32, seed=12)
    x = torch.randn(n, K, generator=gen(13))
    before = ops.csr_linear(x, crow, col, val, [M, K], None)
    crow.data[1:-1] = int(crow[-1])
    again = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert torch.equal(again, before)
