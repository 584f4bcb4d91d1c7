"""pysparse::bsr_spmm (A @ X) and pysparse::bsr_linear (x @ A.T + bias) on CPU.

reference, sample inputs, correctness for every dtype x ISA, ISA agreement, opcheck,
torch.compile, bad input (Python API and raw torch.ops).
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pysparse
from pysparse import BSR
from conftest import (DTYPES, INDEX_DTYPES, LAYOUTS, SUPPORTED_ISAS, WIDTHS, Sample,
                      SparseLinearModule, assert_close, check_against_reference, check_isas_agree,
                      check_threads_agree, dense_operand, gen, randn, random_block_sparse, save_load)

from references import reference_linear, reference_spmm

ops = torch.ops.pysparse


REFS = (reference_spmm, reference_linear)
BSR_INDEX_DTYPES = (None,) + INDEX_DTYPES

# Block sizes: scalar-like (1, 1), narrow and wide, square (16, 16) / (32, 32), odd (3, 5) and
# (5, 3) (remainders of the 4- and 8-row register micro-kernels), and 80 rows (more than the
# 64-row output tile, so the store is split).
BLOCKSIZES = ((1, 1), (4, 8), (8, 4), (16, 16), (32, 32), (3, 5), (5, 3), (2, 16), (80, 2))


def _bs(b):
    return f"{b[0]}x{b[1]}"


def _idt_name(idt):
    return "default idx" if idt is None else str(idt).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def _bert_ffn_blocks(M, K, blocksize):
    """A BERT-base FFN weight with 90% of its blocks pruned (by L2 norm), fp32."""
    return pysparse.prune.blocks(randn(M, K, g=gen(M + K)), 0.9, blocksize)


_SAMPLES = {}


def sample_inputs(device, dtype):
    """Samples for both ops: every block size with odd block counts, empty block rows, explicit
    zeros inside blocks, nnz = 0, zero-size dims, every width class, non-contiguous operands,
    int32 / int64 indices, 1-/2-/3-/4-D linear inputs with and without bias, and BERT-base FFN
    shapes at 90% block sparsity. Built once per (device, dtype); tests never modify them."""
    key = (str(device), dtype)
    if key not in _SAMPLES:
        _SAMPLES[key] = _make_samples(device, dtype)
    return _SAMPLES[key]


def _make_samples(device, dtype):
    g = gen(10)
    S = []
    idts = itertools.cycle(BSR_INDEX_DTYPES)

    def r(*shape):
        return randn(*shape, dtype=dtype, g=g, device=device)

    def add(op, name, W, bs, dense, bias=None, idt="next"):
        idt = next(idts) if idt == "next" else idt
        S.append(Sample(op, f"{name} {_bs(bs)} {_idt_name(idt)}", W, dense, bias,
                        fmt_kwargs=dict(blocksize=bs, index_dtype=idt)))

    def W_for(Mb, Kb, bs, density=0.4):
        return random_block_sparse(Mb * bs[0], Kb * bs[1], bs, density, dtype, g, device=device)

    # every width class with the (4, 8) blocks and every index dtype choice
    bs = (4, 8)
    W = W_for(7, 5, bs)
    for n in WIDTHS:
        X = dense_operand(40, n, dtype, g, device=device)
        for idt in BSR_INDEX_DTYPES:
            add("spmm", f"28x40 n={n}", W, bs, X, idt=idt)
    # every block size, odd block counts
    for bs in BLOCKSIZES:
        Mb, Kb = (33, 127) if bs == (1, 1) else (2, 3) if bs[0] * bs[1] >= 160 else (7, 5)
        W = W_for(Mb, Kb, bs)
        next(idts)  # rotate, so each block size meets other index dtypes at each width
        M, K = W.shape
        for n in (1, 5, 8, 16, 33, 65):
            add("spmm", f"blocks {M}x{K} n={n}", W, bs, dense_operand(K, n, dtype, g, device=device))
    # fully dense (every block kept) and a single block
    for bs, (Mb, Kb) in (((4, 8), (3, 3)), ((3, 5), (1, 1))):
        W = random_block_sparse(Mb * bs[0], Kb * bs[1], bs, 1.0, dtype, g, empty_rows=False, device=device)
        for n in (1, 9):
            add("spmm", f"dense {W.shape[0]}x{W.shape[1]} n={n}", W, bs, dense_operand(W.shape[1], n, dtype, g, device=device))
    # non-contiguous dense operands
    bs = (4, 8)
    W = W_for(7, 5, bs)
    for layout in LAYOUTS[1:]:
        for n in (1, 3, 8, 16, 33, 65):
            add("spmm", f"28x40 n={n} {layout}", W, bs, dense_operand(40, n, dtype, g, layout, device=device))
    # a long block row (96 blocks of 4 x 32) and a short, wide product
    bs = (4, 32)
    W = random_block_sparse(8, 3072, bs, 1.0, dtype, g, empty_rows=False, device=device)
    for n in (1, 9, 40):
        add("spmm", f"8x3072 n={n}", W, bs, dense_operand(3072, n, dtype, g, device=device))
    # nnz = 0 and zero-size dimensions
    for bs in ((4, 8), (1, 1)):
        Z = torch.zeros(3 * bs[0], 5 * bs[1], dtype=dtype, device=device)
        for n in (1, 8, 65):
            add("spmm", f"all-zero n={n}", Z, bs, dense_operand(5 * bs[1], n, dtype, g, device=device))
    for M, K, n in ((0, 40, 5), (28, 0, 5), (28, 40, 0), (0, 0, 0)):
        add("spmm", f"empty {M}x{K} n={n}", torch.zeros(M, K, dtype=dtype, device=device), (4, 8),
            dense_operand(K, n, dtype, g, device=device))
    # real model shapes: BERT-base FFN at 90% block sparsity
    for M, K, bs, ns in ((768, 3072, (32, 32), (1, 65)), (3072, 768, (16, 16), (16,))):
        W = _bert_ffn_blocks(M, K, bs).to(dtype=dtype, device=device)
        for n in ns:
            add("spmm", f"{M}x{K} 90% n={n}", W, bs, dense_operand(K, n, dtype, g, device=device))

    # linear: the batch is the panel axis, so it covers the same width classes
    bs = (4, 8)
    W = W_for(7, 5, bs)
    b = r(28)
    for n in WIDTHS:
        x = r(n, 40)
        add("linear", f"28x40 x=({n},40) bias", W, bs, x, b)
        add("linear", f"28x40 x=({n},40) no bias", W, bs, x, None)
    for shape in ((40,), (2, 5, 40), (3, 1, 4, 40)):
        x = r(*shape)
        add("linear", f"28x40 x={shape} bias", W, bs, x, b)
        add("linear", f"28x40 x={shape} no bias", W, bs, x, None)
    for bs in BLOCKSIZES:
        Wb = W_for(3, 3, bs)
        M, K = Wb.shape
        for n in (1, 7, 20):
            add("linear", f"{M}x{K} x=({n},{K}) bias", Wb, bs, r(n, K), r(M))
    xs = {
        "x.T": r(40, 9).t(),
        "x[:, ::2]": r(17, 80)[:, ::2],
        "x[::2]": r(18, 40)[::2],
        "3-D permuted": r(40, 4, 3).permute(2, 1, 0),
        "3-D sliced": r(2, 6, 40)[:, ::3],
        "expanded": r(1, 40).expand(5, 40),
    }
    for name, x in xs.items():
        add("linear", f"28x40 {name} bias", W, (4, 8), x, b)
    add("linear", "28x40 strided bias", W, (4, 8), r(4, 40), r(56)[::2])
    # one output feature, nnz = 0, empty batch, zero features
    W1 = random_block_sparse(1, 33, (1, 3), 0.6, dtype, g, empty_rows=False, device=device)
    for n in (1, 8, 20):
        add("linear", f"1x33 x=({n},33)", W1, (1, 3), r(n, 33), r(1))
    Z = torch.zeros(28, 40, dtype=dtype, device=device)
    add("linear", "all-zero bias", Z, (4, 8), r(5, 40), r(28))
    add("linear", "all-zero no bias", Z, (4, 8), r(2, 3, 40), None)
    add("linear", "empty batch", W, (4, 8), r(0, 40), b)
    add("linear", "empty 3-D batch", W, (4, 8), r(2, 0, 40), None)
    add("linear", "0 out features", torch.zeros(0, 40, dtype=dtype, device=device), (4, 8), r(4, 40), r(0))
    add("linear", "0 in features 2-D", torch.zeros(28, 0, dtype=dtype, device=device), (4, 8), r(4, 0), r(28))
    # real model shapes
    for M, K, bs in ((3072, 768, (32, 32)), (768, 3072, (16, 16))):
        W = _bert_ffn_blocks(M, K, bs).to(dtype=dtype, device=device)
        add("linear", f"{M}x{K} 90% x=(1,{K})", W, bs, r(1, K), r(M))
        add("linear", f"{M}x{K} 90% x=(2,9,{K})", W, bs, r(2, 9, K), r(M))
    return S


def _raw_args(s: Sample):
    A = s.fmt(BSR)
    if s.op == "spmm":
        return ops.bsr_spmm.default, (A.crow_indices, A.col_indices, A.values, list(A.shape), s.dense)
    return ops.bsr_linear.default, (s.dense, A.crow_indices, A.col_indices, A.values, list(A.shape), s.bias)


# ---------------------------------------------------------------------------------------------
# Correctness


@pytest.mark.parametrize("op", ["spmm", "linear"])
def test_matches_fp64_reference(op, dtype, isa):
    check_against_reference(sample_inputs("cpu", dtype), BSR, op, dtype, REFS)


@pytest.mark.parametrize("op", ["spmm", "linear"])
def test_isa_paths_agree(op, dtype):
    check_isas_agree(sample_inputs("cpu", dtype), BSR, op, dtype, REFS)


@pytest.mark.parametrize("op", ["spmm", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_thread_count_does_not_change_results(op, dtype):
    check_threads_agree(sample_inputs("cpu", dtype), BSR, op, dtype, REFS)


@settings(max_examples=50, deadline=None)
@given(bh=st.integers(1, 9), bw=st.integers(1, 9), Mb=st.integers(0, 6), Kb=st.integers(0, 6),
       n=st.sampled_from((0,) + WIDTHS), density=st.floats(0.0, 1.0), dtype=st.sampled_from(DTYPES),
       isa=st.sampled_from(SUPPORTED_ISAS), layout=st.sampled_from(LAYOUTS), index_dtype=st.sampled_from(BSR_INDEX_DTYPES),
       op=st.sampled_from(["spmm", "linear"]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_products_match_reference(bh, bw, Mb, Kb, n, density, dtype, isa, layout, index_dtype, op, bias, seed):
    g = gen(seed)
    W = random_block_sparse(Mb * bh, Kb * bw, (bh, bw), density, dtype, g, empty_rows=bool(seed % 2))
    X = dense_operand(Kb * bw, n, dtype, g, layout)
    b = randn(Mb * bh, dtype=dtype, g=g) if bias and op == "linear" else None
    s = Sample(op, "random", W, X if op == "spmm" else X.t(), b, fmt_kwargs=dict(blocksize=(bh, bw), index_dtype=index_dtype))
    try:
        pysparse.set_cpu_isa(isa)
        out = s.run(BSR)
    finally:
        pysparse.set_cpu_isa("auto")
    assert_close(out, *s.reference(*REFS), dtype, what=f"{isa} {op}")


def test_bsr_equals_csr_of_the_same_matrix():
    """The same matrix as BSR and as CSR gives the same product (two independent kernels)."""
    g = gen(11)
    W = random_block_sparse(48, 64, (16, 16), 0.5, torch.float32, g)
    X = randn(64, 20, g=g)
    torch.testing.assert_close(pysparse.spmm(BSR.from_dense(W, (16, 16)), X),
                               pysparse.spmm(pysparse.CSR.from_dense(W), X), rtol=1e-5, atol=1e-5)


def test_inputs_untouched_and_result_fresh():
    g = gen(12)
    W = random_block_sparse(28, 40, (4, 8), 0.5, torch.float16, g)
    A = BSR.from_dense(W, (4, 8))
    X = dense_operand(40, 16, torch.float16, g)
    x, b = randn(4, 40, dtype=torch.float16, g=g), randn(28, dtype=torch.float16, g=g)
    inputs = (A.crow_indices, A.col_indices, A.values, X, x, b)
    saved = [t.clone() for t in inputs]
    y1, y2 = pysparse.spmm(A, X), pysparse.spmm(A, X)
    z = pysparse.linear(x, A, b)
    assert y1.data_ptr() != y2.data_ptr() and y1.is_contiguous() and z.is_contiguous()
    assert torch.equal(y1, y2)
    for before, after in zip(saved, inputs):
        assert torch.equal(before, after)


@pytest.mark.parametrize("xshape", [(2, 3, 0), (0,)], ids=["3-D", "1-D"])
def test_linear_zero_in_features_nd_input(xshape):
    """in_features = 0 is a valid (empty) product, as in torch.nn.functional.linear."""
    A = BSR.from_dense(torch.zeros(8, 0), (4, 4))
    bias = torch.arange(8.0)
    x = torch.zeros(xshape)
    torch.testing.assert_close(pysparse.linear(x, A, bias), torch.nn.functional.linear(x, torch.zeros(8, 0), bias))


def test_meta_tensors_give_shapes_only():
    A = BSR.from_dense(random_block_sparse(28, 40, (4, 8), 0.5, torch.float16, gen(13)), (4, 8)).to("meta")
    y = pysparse.spmm(A, torch.empty(40, 5, dtype=torch.float16, device="meta"))
    assert (y.device.type, y.shape, y.dtype) == ("meta", (28, 5), torch.float16)
    y = pysparse.linear(torch.empty(2, 4, 40, dtype=torch.float16, device="meta"), A)
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 4, 28), torch.float16)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_opcheck(dtype):
    samples = sample_inputs("cpu", dtype)
    picked = [next(s for s in samples if s.name.startswith(p)) for p in (
        "28x40 n=1 ", "28x40 n=17 4x8 int64", "28x40 n=65 ", "blocks 21x25 n=5 3x5", "blocks 160x6 n=33 80x2", "empty 28x0 n=5",
        "28x40 x=(9,40) bias", "28x40 x=(2, 5, 40) no bias", "28x40 x.T bias")]
    for s in picked:
        op, args = _raw_args(s)
        torch.library.opcheck(op, args)


def test_compile_spmm_fullgraph():
    torch._dynamo.reset()
    g = gen(14)
    A = BSR.from_dense(random_block_sparse(28, 40, (4, 8), 0.5, torch.float32, g), (4, 8))

    def f(X):
        return pysparse.spmm(A, X) - 1.0

    cf = torch.compile(f, fullgraph=True)
    for n in (5, 9, 40):
        X = randn(40, n, g=g)
        torch.testing.assert_close(cf(X), f(X), rtol=0, atol=0)


def test_compile_linear_fullgraph():
    torch._dynamo.reset()
    g = gen(15)
    A = BSR.from_dense(random_block_sparse(32, 48, (16, 16), 0.5, torch.bfloat16, g), (16, 16), index_dtype=torch.int64)
    b = randn(32, dtype=torch.bfloat16, g=g)

    def f(x):
        return pysparse.linear(x, A, b) * 2  # exact, so compiled and eager agree bit for bit

    cf = torch.compile(f, fullgraph=True)
    for shape in ((2, 3, 48), (4, 7, 48)):
        x = randn(*shape, dtype=torch.bfloat16, g=g)
        torch.testing.assert_close(cf(x), f(x), rtol=0, atol=0)


def test_module_state_dict_round_trip_and_compile():
    torch._dynamo.reset()
    g = gen(16)
    W = random_block_sparse(48, 40, (16, 8), 0.5, torch.float32, g)
    m = SparseLinearModule(BSR.from_dense(W, (16, 8)), randn(48, g=g))
    sd = save_load(m.state_dict())
    assert set(sd) == {"crow_indices", "col_indices", "values", "shape", "bias"}
    m2 = SparseLinearModule.from_state_dict(BSR, sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]) and v.dtype == m2.state_dict()[k].dtype, k
    m.load_state_dict(sd)
    x = randn(3, 5, 40, g=g)
    ref = reference_linear(x, W, m.bias)
    assert_close(m2(x), ref, reference_linear(x.abs(), W.abs(), m.bias.abs()), torch.float32, what="eager")
    cm = torch.compile(m2, fullgraph=True)
    torch.testing.assert_close(cm(x), m2(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: public API


def _A(dtype=torch.float32):
    return BSR.from_dense(random_block_sparse(28, 40, (4, 8), 0.5, dtype, gen(17)), (4, 8))


def test_api_rejects_bad_operands():
    A = _A()
    with pytest.raises(TypeError, match=r"pysparse\.spmm: X is torch\.float16 but A's values are torch\.float32"):
        pysparse.spmm(A, torch.ones(40, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"pysparse\.linear: x is torch\.int64 but A's values are torch\.float32"):
        pysparse.linear(torch.ones(2, 40, dtype=torch.int64), A)
    with pytest.raises(ValueError, match=r"pysparse\.spmm: A is 28x40, so X must be \(40, n\) or \(\.\.\., 40, n\), got \(28, 2\)"):
        pysparse.spmm(A, torch.ones(28, 2))
    with pytest.raises(ValueError, match=r"pysparse\.linear: A is 28x40, so x must end in 40 features, got shape \(2, 28\)"):
        pysparse.linear(torch.ones(2, 28), A)
    with pytest.raises(ValueError, match=r"pysparse\.linear: bias must have shape \(28,\), got \(40,\)"):
        pysparse.linear(torch.ones(2, 40), A, torch.ones(40))
    with pytest.raises(ValueError, match=r"pysparse\.spmm: X is on meta but A is on cpu"):
        pysparse.spmm(A, torch.ones(40, 2, device="meta"))


# ---------------------------------------------------------------------------------------------
# Bad input: raw torch.ops calls


@pytest.mark.parametrize("bad", ["Kb", "Kb+1", "max", "-1", "min"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=["int32", "int64"])
def test_raw_out_of_range_block_column_is_an_error(isa, bad, index_dtype):
    """A 12 x 64 matrix of (4, 4) blocks, 16 block columns; block row 1 holds 10 blocks, one of
    them with a bad block column: an error on the gemv and every panel path, never a read."""
    bs, Kb = (4, 4), 16
    info = torch.iinfo(index_dtype)
    crow = torch.tensor([0, 0, 10, 10], dtype=index_dtype)
    col = torch.arange(10, dtype=torch.int64)
    col[6] = {"Kb": Kb, "Kb+1": Kb + 1, "max": info.max, "-1": -1, "min": info.min}[bad]
    col = col.to(index_dtype)
    msg = r"pysparse: a column index is out of range for a matrix with 16 block columns"
    for dtype in (torch.float32, torch.bfloat16):
        vals = torch.ones(10, *bs, dtype=dtype)
        for n in (1, 3, 8, 16, 24, 40):
            X = torch.ones(64, n, dtype=dtype)
            with pytest.raises(RuntimeError, match=msg):
                ops.bsr_spmm(crow, col, vals, [12, 64], X)
            with pytest.raises(RuntimeError, match=msg):
                ops.bsr_linear(X.t(), crow, col, vals, [12, 64], None)
    A = _A()
    X = torch.randn(40, 5)
    torch.testing.assert_close(pysparse.spmm(A, X), A.to_dense() @ X, rtol=1e-5, atol=1e-5)


def _t(*v, dtype=torch.int32):
    return torch.tensor(v, dtype=dtype)


# An 8 x 16 matrix of (4, 4) blocks: block rows of 1 and 1 blocks.
GOOD = dict(crow=_t(0, 1, 2), col=_t(3, 0), values=torch.ones(2, 4, 4), shape=[8, 16], dense=torch.ones(16, 2))
RAW_BAD = {
    "values 2-D": (dict(values=torch.ones(2, 16)), RuntimeError,
                   r"pysparse: BSR values \(nnz_blocks, block_rows, block_cols\) must be 3-D, got shape \[2, 16\]"),
    "shape not divisible": (dict(shape=[6, 16], dense=torch.ones(16, 2)), RuntimeError,
                            r"pysparse: BSR shape \(6, 16\) is not divisible by the block size \(4, 4\)"),
    "zero block size": (dict(values=torch.ones(2, 0, 4)), RuntimeError,
        r"pysparse: BSR block size must be positive, got \(0, 4\)"),
    "crow too long": (dict(crow=_t(0, 1, 2, 2)), RuntimeError,
        r"pysparse: crow_indices must have block rows \+ 1 = 3 entries, got 4"),
    "crow[0] != 0": (dict(crow=_t(1, 1, 2)), RuntimeError, r"pysparse: row pointers must start at 0, got 1"),
    "crow[-1] != nnzb": (dict(crow=_t(0, 1, 1)), RuntimeError,
                         r"pysparse: the last row pointer \(1\) must equal the number of blocks \(2\)"),
    "decreasing crow": (dict(crow=_t(0, 3, 2)), RuntimeError, r"pysparse: row pointers must be non-decreasing"),
    "negative block column": (dict(col=_t(3, -1)), RuntimeError,
                              r"pysparse: a column index is out of range for a matrix with 4 block columns"),
    "values-col length mismatch": (dict(values=torch.ones(3, 4, 4)), RuntimeError,
                                   r"pysparse: values has 3 entries but col_indices has 2"),
    "int16 block columns": (dict(col=_t(3, 0, dtype=torch.int16)), TypeError,
                            r"pysparse: BSR column indices must be int32 or int64, got int16"),
    "mixed index dtypes": (dict(col=_t(3, 0, dtype=torch.int64)), TypeError,
        r"pysparse: index dtypes must be .*got Int and Long"),
    "float64 values": (dict(values=torch.ones(2, 4, 4, dtype=torch.float64), dense=torch.ones(16, 2, dtype=torch.float64)),
                       TypeError, r"pysparse: values must be float32, bfloat16 or float16, got Double"),
    "dense dtype differs": (dict(dense=torch.ones(16, 2, dtype=torch.float16)), TypeError,
                            r"pysparse: (dense|input) dtype Half differs from the sparse values' dtype Float"),
    "dense rows differ": (dict(dense=torch.ones(15, 2)), RuntimeError,
        r"pysparse: (dense has 15 rows but|input's last dimension \(15\) must equal)"),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
@pytest.mark.parametrize("op", ["bsr_spmm", "bsr_linear"])
def test_raw_op_rejects(op, case):
    over, exc, msg = RAW_BAD[case]
    a = dict(GOOD, **over)
    with pytest.raises(exc, match=msg):
        if op == "bsr_spmm":
            ops.bsr_spmm(a["crow"], a["col"], a["values"], a["shape"], a["dense"])
        else:
            ops.bsr_linear(a["dense"].t(), a["crow"], a["col"], a["values"], a["shape"], None)


def test_raw_good_operands_work():
    a = GOOD
    out = ops.bsr_spmm(a["crow"], a["col"], a["values"], a["shape"], a["dense"])
    torch.testing.assert_close(out, torch.full((8, 2), 4.0))
    with pytest.raises(RuntimeError, match=r"pysparse: bias must have shape \(8\), got \[16\]"):
        ops.bsr_linear(torch.ones(3, 16), a["crow"], a["col"], a["values"], a["shape"], torch.ones(16))
