"""The CSR plans (csrc/cpu/csr_plan.cpp): the slice plan (csr_impl.h: csr_plan_kernel) and, at
the end of this file, the column bitmap of one token and of a few (csr_bitmap_rows); the
properties every remembered plan shares run for the JIT code too (kind "jit").

The AVX-512 CSR products at n > 32, K in [256, 8192] and 6.25-41.7% density follow a plan made
once per pattern. These tests put shapes on that path (rows not a multiple of the 64-row chunks,
tokens not a multiple of the 64-token panels, segments longer than the unrolled lengths, empty
rows and slices) and check it against the fp64 reference, against the row-axpy kernel (the same
call on a non-contiguous copy of the indices, which never takes a plan), across thread counts,
and after the pattern changes: in place (a new plan) and behind the version counter's back (a
stale plan may give stale numbers, never an out-of-bounds read).
"""
from __future__ import annotations

import pytest
import torch

import pysparse
from conftest import DTYPES, assert_close, gen, num_threads, random_sparse

from references import reference_linear, reference_spmm

ops = torch.ops.pysparse

pytestmark = pytest.mark.skipif("avx512" not in pysparse._C.cpu_isa_supported(),
                                reason="the slice plan is an AVX-512 kernel")

# (M, K, density; every 5th row is empty): chunks cut by M, slices cut by K, segments of 38 and
# 51 nonzeros on average (0.3 and 0.4 x 128 columns), the density window's edges (12.5% to 5/12,
# and from 6.25% at K >= 2048). Segments past the 64 unrolled: test_plan_segments_past_the_unrolled.
SHAPES = [(200, 300, 0.2), (64, 256, 0.2), (130, 1000, 0.3), (777, 768, 0.2), (96, 8192, 0.1), (150, 640, 0.4)]


def _pattern(M, K, density, dtype, idx, seed):
    W = random_sparse(M, K, density, dtype, gen(seed))
    A = W.to_sparse_csr()
    crow = A.crow_indices().to(torch.int32)
    col = A.col_indices().to(idx)
    return W, crow, col, A.values().to(dtype)


@pytest.fixture(autouse=True)
def _jit_only_for_its_kind(request):
    """The JIT code would take some of the slice plan's products: off but for kind "jit"."""
    callspec = getattr(request.node, "callspec", None)
    old = pysparse._C.set_csr_jit(callspec is not None and callspec.params.get("kind") == "jit")
    yield
    pysparse._C.set_csr_jit(old)


def _noncontig(t):
    return torch.stack([t, t], 1)[:, 0]


def _plans():
    return pysparse._C.csr_plans_made()


def _right_without_a_plan(x, crow, col, val, W):
    """x @ W^T through csr_linear, with no plan made (the kernels without one serve it)."""
    made = _plans()
    y = ops.csr_linear(x, crow, col, val, list(W.shape), None)
    assert _plans() == made
    torch.testing.assert_close(y.double(), x.double() @ W.double().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", [torch.int16, torch.int32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [33, 64, 130])
def test_plan_matches_reference_and_row_axpy(dtype, idx, shape, n):
    M, K, d = shape
    W, crow, col, val = _pattern(M, K, d, dtype, idx, seed=M + K + n)
    x = torch.randn(n, K, generator=gen(n)).to(dtype)
    bias = torch.randn(M, generator=gen(1)).to(dtype)
    B = torch.randn(K, n, generator=gen(2)).to(dtype)
    pysparse.set_cpu_isa("avx512")
    try:
        made = _plans()
        y = ops.csr_linear(x, crow, col, val, [M, K], bias)
        assert _plans() == made + 1, "the product did not take the slice plan"
        ref = reference_linear(x, W, bias)
        absref = reference_linear(x.abs(), W.abs(), bias.abs())
        assert_close(y, ref, absref, dtype, what="linear")
        y = ops.csr_spmm(crow, col, val, [M, K], B)
        absref = reference_spmm(W.abs(), B.abs())
        assert_close(y, reference_spmm(W, B), absref, dtype, what="spmm")
        axpy = ops.csr_spmm(_noncontig(crow), _noncontig(col), val, [M, K], B)
        assert _plans() == made + 1, "spmm made a second plan, or the copy took one"
        assert_close(y, axpy.double(), absref, dtype, factor=2.0, what="plan vs row-axpy")
    finally:
        pysparse.set_cpu_isa("auto")


def test_plan_segments_past_the_unrolled():
    """Rows that hold a whole 128-column slice (a dense row among sparse ones) run the looping
    segment code, the rest the unrolled one; above 5/12 density no plan is made."""
    M, K, n = 210, 640, 70
    W, _, _, _ = _pattern(M, K, 0.15, torch.float32, torch.int16, seed=21)
    W[::7] = torch.randn(M // 7, K, generator=gen(22))  # 128 nonzeros in every slice of these rows
    A = W.to_sparse_csr()
    crow, col, val = A.crow_indices().to(torch.int32), A.col_indices().to(torch.int16), A.values()
    assert 0.2 < val.numel() / (M * K) < 0.4
    x = torch.randn(n, K, generator=gen(23))
    made = _plans()
    y = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert _plans() == made + 1, "the product did not take the slice plan"
    assert_close(y, reference_linear(x, W), reference_linear(x.abs(), W.abs()), torch.float32, what="long segments")
    W2, crow2, col2, val2 = _pattern(M, K, 0.6, torch.float32, torch.int16, seed=24)
    assert val2.numel() > M * K * 0.4  # every 5th row is empty: ~48%
    _right_without_a_plan(x, crow2, col2, val2, W2)


# The plans, each on its path: (tokens, density). The JIT code (csr_jit.cpp, tests/test_csr_jit.py)
# is remembered like the plans and shares their properties.
KINDS = {"slice plan": (300, 0.2), "bitmap": (1, 0.4), "jit": (1024, 0.1)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_plan_thread_counts(kind, threads):
    """Row parts are aligned to the slice plan's chunks; any thread count gives the 1-thread
    result, and that is the product."""
    (n, density), M, K = KINDS[kind], 1000, 768
    W, crow, col, val = _pattern(M, K, density, torch.float32, torch.int16, seed=3)
    x = torch.randn(n, K, generator=gen(4))
    with num_threads(1):
        one = ops.csr_linear(x, crow, col, val, [M, K], None)
    with num_threads(threads):
        many = ops.csr_linear(x, crow, col, val, [M, K], None)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.double(), x.double() @ W.double().t(), rtol=1e-4, atol=1e-4)


def test_batched_operand_takes_the_plan():
    M, K = 300, 512
    W, crow, col, val = _pattern(M, K, 0.2, torch.float32, torch.int32, seed=5)
    B = torch.randn(3, K, 96, generator=gen(6))
    y = ops.csr_spmm(crow, col, val, [M, K], B)
    ref = torch.stack([W.double() @ b.double() for b in B])
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_unsorted_columns_fall_back():
    """A row whose columns are not sorted cannot have a plan; the row-axpy kernel serves it."""
    M, K = 128, 512
    W, crow, col, val = _pattern(M, K, 0.2, torch.float32, torch.int32, seed=7)
    r0, r1 = int(crow[1]), int(crow[2])
    col, val = col.clone(), val.clone()
    col[r0:r1] = col[r0:r1].flip(0)
    val[r0:r1] = val[r0:r1].flip(0)
    _right_without_a_plan(torch.randn(64, K, generator=gen(8)), crow, col, val, W)


@pytest.mark.parametrize("kind", KINDS)
def test_values_trained_in_place_keep_the_plan_correct(kind):
    """A plan holds the pattern only: values updated in place (an optimizer step) are read."""
    (n, density), M, K = KINDS[kind], 256, 512
    W, crow, col, val = _pattern(M, K, density, torch.float32, torch.int16, seed=9)
    x = torch.randn(n, K, generator=gen(10))
    ops.csr_linear(x, crow, col, val, [M, K], None)
    val.mul_(-2.0).add_(0.5)
    dense = torch.sparse_csr_tensor(crow.long(), col.long(), val, (M, K)).to_dense()
    y = ops.csr_linear(x, crow, col, val, [M, K], None)
    torch.testing.assert_close(y.double(), x.double() @ dense.double().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_pattern_written_in_place_gets_a_new_plan(kind):
    (n, density), M, K = KINDS[kind], 256, 512
    W, crow, col, val = _pattern(M, K, density, torch.float32, torch.int32, seed=11)
    x = torch.randn(n, K, generator=gen(12))
    made = _plans()
    ops.csr_linear(x, crow, col, val, [M, K], None)
    # Move every column by one slice-sized step, kept sorted and in range: a different matrix.
    col.copy_((col + 128) % K)
    rows = torch.repeat_interleave(torch.arange(M), (crow[1:] - crow[:-1]).long())
    order = torch.argsort(rows * K + col.long())
    col.copy_(col[order])
    val.copy_(val[order])
    dense = torch.sparse_csr_tensor(crow.long(), col.long(), val, (M, K)).to_dense()
    y = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert _plans() == made + 2
    torch.testing.assert_close(y.double(), x.double() @ dense.double().t(), rtol=1e-4, atol=1e-4)


def test_pattern_written_behind_the_version_counter_never_reads_out_of_bounds():
    """A write through .data is not seen: the stale plan keeps its own validated columns, so the
    product stays in bounds (it may use the old pattern); a new call with fresh tensors is right."""
    M, K = 256, 512
    W, crow, col, val = _pattern(M, K, 0.2, torch.float32, torch.int32, seed=13)
    x = torch.randn(128, K, generator=gen(14))
    before = ops.csr_linear(x, crow, col, val, [M, K], None)
    col.data.fill_(10**6)  # out of range, not seen by the version counter
    again = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert again.shape == before.shape and torch.isfinite(again).all()
    with pytest.raises(RuntimeError, match="out of range"):
        ops.csr_linear(x, crow.clone(), col.clone(), val, [M, K], None)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_tensors_take_the_kernel_without_a_plan(kind):
    (n, density), M, K = KINDS[kind], 256, 512
    with torch.inference_mode():
        W, crow, col, val = _pattern(M, K, density, torch.float32, torch.int16, seed=15)
        _right_without_a_plan(torch.randn(n, K, generator=gen(16)), crow, col, val, W)


# ---------------------------------------------------------------------------------------------
# The column bitmap (csr_plan.cpp: csr_bitmap, csr_impl.h: csr_bitmap_rows): CSR at one
# token, density >= 2/9, K <= 65536. (M, K): K below one 16-column step, K not a multiple of 16,
# rows not a multiple of the 4-step unroll's 64 columns, the last rows (whose 16-value loads would
# pass the end of the values: they take the masked loads).
GEMV_SHAPES = [(200, 300), (64, 16), (33, 17), (130, 1000), (12, 4097), (300, 5), (3, 64)]


def _pattern64(M, K, density, dtype, seed):
    W, crow, col, val = _pattern(M, K, density, dtype, torch.int32, seed)
    return W, crow.long(), col.long(), val


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", [torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=str)
def test_bitmap_gemv_matches_reference_and_gather(dtype, idx, shape):
    M, K = shape
    if idx == torch.int64:
        W, crow, col, val = _pattern64(M, K, 0.6, dtype, seed=M + K)
    else:
        W, crow, col, val = _pattern(M, K, 0.6, dtype, idx, seed=M + K)
    x = torch.randn(1, K, generator=gen(K)).to(dtype)
    bias = torch.randn(M, generator=gen(1)).to(dtype)
    pysparse.set_cpu_isa("avx512")
    try:
        made = _plans()
        y = ops.csr_linear(x, crow, col, val, [M, K], bias)
        assert _plans() == made + 1, "the gemv did not take the column bitmap"
        assert_close(y, reference_linear(x, W, bias), reference_linear(x.abs(), W.abs(), bias.abs()), dtype,
                     what="bitmap gemv")
        B = x.t().contiguous()
        absref = reference_spmm(W.abs(), B.abs())
        y = ops.csr_spmm(crow, col, val, [M, K], B)
        gather = ops.csr_spmm(_noncontig(crow), _noncontig(col), val, [M, K], B)
        assert _plans() == made + 1, "spmm made a second bitmap, or the copy took one"
        assert_close(y, reference_spmm(W, B), absref, dtype, what="bitmap spmm")
        assert_close(y, gather.double(), absref, dtype, factor=2.0, what="bitmap vs gather")
    finally:
        pysparse.set_cpu_isa("auto")


def test_bitmap_gemv_skips_pruned_columns_of_x():
    """An inf or nan in x where a row holds no value stays out of that row's sum, as in the
    gather (a dense 0 * inf would be nan)."""
    M, K = 96, 200
    W, crow, col, val = _pattern(M, K, 0.5, torch.float32, torch.int32, seed=17)
    x = torch.randn(1, K, generator=gen(18))
    holds = W != 0
    kinf, knan = 3, 7
    x[0, kinf], x[0, knan] = float("inf"), float("nan")
    made = _plans()
    y = ops.csr_linear(x, crow, col, val, [M, K], None)
    assert _plans() == made + 1
    gather = ops.csr_linear(x, _noncontig(crow), _noncontig(col), val, [M, K], None)
    clean = ~(holds[:, kinf] | holds[:, knan])
    assert clean.any() and (~clean).any()
    assert torch.isfinite(y[0, clean]).all()
    torch.testing.assert_close(y[0, clean], gather[0, clean], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(gather))


@pytest.mark.parametrize("case", ["density below 2/9", "tokens past L1"])
def test_no_bitmap_where_it_would_lose(case):
    """Below 2/9 density the gathering gemv runs (it is faster there); tokens whose rows would not
    fit in L1 (n K > 8192) take the row-axpy kernel. No bitmap is made, the product is right."""
    (M, K, d, n) = (256, 512, 0.1, 1) if case == "density below 2/9" else (64, 4097, 0.6, 2)
    W, crow, col, val = _pattern(M, K, d, torch.float32, torch.int32, seed=21)
    _right_without_a_plan(torch.randn(n, K, generator=gen(22)), crow, col, val, W)


@pytest.mark.parametrize("fault", ["unsorted", "duplicate"])
def test_bitmap_gemv_unsorted_or_duplicate_columns_fall_back(fault):
    """A bitmap cannot say which of two values a column holds, nor keep a row's order: the
    gathering gemv serves such a pattern (and sums a duplicate's values, as torch does)."""
    M, K = 128, 512
    W, crow, col, val = _pattern(M, K, 0.5, torch.float32, torch.int32, seed=23)
    r0, r1 = int(crow[1]), int(crow[2])
    col, val = col.clone(), val.clone()
    if fault == "unsorted":
        col[r0:r1] = col[r0:r1].flip(0)
        val[r0:r1] = val[r0:r1].flip(0)
    else:
        col[r0 + 1] = col[r0]
    dense = torch.sparse_csr_tensor(crow.long(), col.long(), val.double(), (M, K)).to_dense()
    _right_without_a_plan(torch.randn(1, K, generator=gen(24)), crow, col, val, dense)


def test_bitmap_with_row_pointers_written_behind_the_version_counter_stays_in_bounds():
    """New row bounds written through .data are not seen: the bitmap keeps the row starts it was
    made with, so the product reads inside the values (old numbers, never out of bounds)."""
    M, K = 256, 512
    W, crow, col, val = _pattern(M, K, 0.4, torch.float32, torch.int32, seed=29)
    x = torch.randn(1, K, generator=gen(30))
    before = ops.csr_linear(x, crow, col, val, [M, K], None)
    nnz = int(crow[-1])
    crow.data[1:-1] = nnz  # all values in row 0 now, as far as the row pointers say
    again = ops.csr_linear(x, crow, col, val, [M, K], None)
    torch.testing.assert_close(again, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(200, 300), (33, 17), (130, 1000), (64, 16)], ids=str)
def test_bitmap_takes_a_few_tokens_as_rows(dtype, n, shape):
    """Up to 8 tokens whose rows fit in L1 (n K <= 8192) go through the bitmap too, each step's
    values expanded once for all of them: linear (the input rows as they are) and spmm (B^T)."""
    M, K = shape
    if n * K > 8192:
        pytest.skip("the tokens' rows would not fit in L1: the row-axpy kernel serves them")
    W, crow, col, val = _pattern(M, K, 0.6, dtype, torch.int16, seed=M + n)
    x = torch.randn(n, K, generator=gen(n)).to(dtype)
    bias = torch.randn(M, generator=gen(2)).to(dtype)
    made = _plans()
    y = ops.csr_linear(x, crow, col, val, [M, K], bias)
    assert _plans() == made + 1, "the tokens did not take the column bitmap"
    assert_close(y, reference_linear(x, W, bias), reference_linear(x.abs(), W.abs(), bias.abs()), dtype,
                 what="bitmap tokens")
    B = x.t()  # (K, n), not contiguous along K
    absref = reference_spmm(W.abs(), B.abs())
    y = ops.csr_spmm(crow, col, val, [M, K], B)
    assert_close(y, reference_spmm(W, B), absref, dtype, what="bitmap tokens spmm")
    axpy = ops.csr_spmm(_noncontig(crow), _noncontig(col), val, [M, K], B)
    assert_close(y, axpy.double(), absref, dtype, factor=2.0, what="bitmap vs row-axpy")
