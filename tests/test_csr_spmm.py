"""pysparse::csr_spmm (A @ X) and pysparse::csr_linear (x @ A.T + bias) on CPU.

reference, sample inputs, correctness for every dtype x ISA, ISA agreement, opcheck,
torch.compile, bad input (Python API and raw torch.ops).
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pysparse
from pysparse import CSR
from conftest import (CSR_INDEX_DTYPES, DTYPES, LAYOUTS, SUPPORTED_ISAS, WIDTHS, Sample,
                      SparseLinearModule, assert_close, check_against_reference, check_close,
                      check_isas_agree, check_threads_agree, dense_operand, gen, randn, random_sparse,
                      save_load)

from references import reference_linear, reference_spmm

ops = torch.ops.pysparse


def _idt_name(idt):
    return "default idx" if idt is None else str(idt).replace("torch.", "")


def _raw_args(s: Sample):
    """The sample as a raw torch.ops call: (op overload, args)."""
    A = s.fmt(CSR)
    if s.op == "spmm":
        return ops.csr_spmm.default, (A.crow_indices, A.col_indices, A.values, list(A.shape), s.dense)
    return ops.csr_linear.default, (s.dense, A.crow_indices, A.col_indices, A.values, list(A.shape), s.bias)


@functools.lru_cache(maxsize=None)
def _bert_ffn(M, K):
    """A BERT-base FFN weight (768 <-> 3072) magnitude-pruned to 90%, fp32."""
    return pysparse.prune.magnitude(randn(M, K, g=gen(M + K)), 0.9)


_SAMPLES = {}


def sample_inputs(device, dtype):
    """Samples for both ops: odd sizes, empty rows, nnz = 0, zero-size dims, every width class of
    the dense operand, non-contiguous operands, every index dtype choice, 1-/2-/3-/4-D linear
    inputs with and without bias, and BERT-base FFN shapes at 90% sparsity.

    Built once per (device, dtype) and shared: the tests never modify them (the kernels do not write
    their inputs: test_inputs_untouched_and_result_fresh)."""
    key = (str(device), dtype)
    if key not in _SAMPLES:
        _SAMPLES[key] = _make_samples(device, dtype)
    return _SAMPLES[key]


def _make_samples(device, dtype):
    g = gen(0)
    S = []
    idts = itertools.cycle(CSR_INDEX_DTYPES)

    def r(*shape):
        return randn(*shape, dtype=dtype, g=g, device=device)

    def spmm(name, W, X, idt="next"):
        idt = next(idts) if idt == "next" else idt
        S.append(Sample("spmm", f"{name} {_idt_name(idt)}", W, X, fmt_kwargs=dict(index_dtype=idt)))

    def linear(name, W, x, bias, idt="next"):
        idt = next(idts) if idt == "next" else idt
        S.append(Sample("linear", f"{name} {_idt_name(idt)}", W, x, bias, fmt_kwargs=dict(index_dtype=idt)))

    # every width class with every index dtype choice
    W = random_sparse(33, 127, 0.3, dtype, g, device=device)
    for n in WIDTHS:
        X = dense_operand(127, n, dtype, g, device=device)
        for idt in CSR_INDEX_DTYPES:
            spmm(f"33x127 n={n}", W, X, idt)
    # odd shapes x densities: fully dense, a single entry, very sparse
    for M, K, d in ((7, 33, 0.5), (127, 7, 0.2), (1, 1, 1.0), (7, 7, 1.0), (127, 33, 0.02)):
        W = random_sparse(M, K, d, dtype, g, empty_rows=M > 1, device=device)
        for n in (1, 8, 17, 65):
            spmm(f"{M}x{K} d={d} n={n}", W, dense_operand(K, n, dtype, g, device=device))
    # non-contiguous dense operands
    W = random_sparse(33, 127, 0.3, dtype, g, device=device)
    for layout in LAYOUTS[1:]:
        for n in (1, 3, 8, 16, 33, 65):
            spmm(f"33x127 n={n} {layout}", W, dense_operand(127, n, dtype, g, layout, device=device))
    # long rows (3072 nonzeros: every accumulator set, the 16-bit value chunks and their tails),
    # and a short, wide product that splits over panel groups rather than rows
    W = random_sparse(3, 3072, 1.0, dtype, g, empty_rows=False, device=device)
    for n in (1, 9, 64):
        spmm(f"3x3072 dense rows n={n}", W, dense_operand(3072, n, dtype, g, device=device))
    W = random_sparse(7, 1024, 0.5, dtype, g, device=device)
    spmm("7x1024 n=130", W, dense_operand(1024, 130, dtype, g, device=device))
    # nnz = 0 and zero-size dimensions
    Z = torch.zeros(7, 33, dtype=dtype, device=device)
    for n in (1, 8, 65):
        spmm(f"all-zero 7x33 n={n}", Z, dense_operand(33, n, dtype, g, device=device))
    for M, K, n in ((0, 33, 5), (7, 0, 5), (7, 33, 0), (0, 0, 0)):
        spmm(f"empty {M}x{K} n={n}", torch.zeros(M, K, dtype=dtype, device=device),
             dense_operand(K, n, dtype, g, device=device))
    # real model shapes: BERT-base FFN at 90% sparsity
    for M, K, ns in ((768, 3072, (1, 65)), (3072, 768, (16,))):
        W = _bert_ffn(M, K).to(dtype=dtype, device=device)
        for n in ns:
            spmm(f"{M}x{K} 90% n={n}", W, dense_operand(K, n, dtype, g, device=device))

    # linear: the batch is the panel axis, so it covers the same width classes
    W = random_sparse(33, 127, 0.3, dtype, g, device=device)
    b = r(33)
    for n in WIDTHS:
        x = r(n, 127)
        linear(f"33x127 x=({n},127) bias", W, x, b)
        linear(f"33x127 x=({n},127) no bias", W, x, None)
    for shape in ((127,), (2, 5, 127), (3, 1, 4, 127)):
        x = r(*shape)
        linear(f"33x127 x={shape} bias", W, x, b)
        linear(f"33x127 x={shape} no bias", W, x, None)
    # non-contiguous inputs and bias
    xs = {
        "x.T": r(127, 9).t(),
        "x[:, ::2]": r(17, 254)[:, ::2],
        "x[::2]": r(18, 127)[::2],
        "3-D permuted": r(127, 4, 3).permute(2, 1, 0),
        "3-D sliced": r(2, 6, 127)[:, ::3],
        "expanded": r(1, 127).expand(5, 127),
    }
    for name, x in xs.items():
        linear(f"33x127 {name} bias", W, x, b)
    linear("33x127 strided bias", W, r(4, 127), r(66)[::2])
    # one output feature (the transposed store degenerates to a contiguous one), nnz = 0, empty
    W1 = random_sparse(1, 33, 0.5, dtype, g, empty_rows=False, device=device)
    for n in (1, 8, 20):
        linear(f"1x33 x=({n},33)", W1, r(n, 33), r(1))
    Z = torch.zeros(7, 33, dtype=dtype, device=device)
    linear("all-zero bias", Z, r(5, 33), r(7))
    linear("all-zero no bias", Z, r(2, 3, 33), None)
    linear("empty batch", W, r(0, 127), b)
    linear("empty 3-D batch", W, r(2, 0, 127), None)
    linear("0 out features", torch.zeros(0, 127, dtype=dtype, device=device), r(4, 127), r(0))
    linear("0 in features 2-D", torch.zeros(7, 0, dtype=dtype, device=device), r(4, 0), r(7))
    # real model shapes: fc1 / fc2 of BERT-base at 90% sparsity, batch x sequence inputs
    for M, K in ((3072, 768), (768, 3072)):
        W = _bert_ffn(M, K).to(dtype=dtype, device=device)
        linear(f"{M}x{K} 90% x=(1,{K})", W, r(1, K), r(M))
        linear(f"{M}x{K} 90% x=(2,9,{K})", W, r(2, 9, K), r(M))
    return S


# ---------------------------------------------------------------------------------------------
# Correctness


REFS = (reference_spmm, reference_linear)


@pytest.mark.parametrize("op", ["spmm", "linear"])
def test_matches_fp64_reference(op, dtype, isa):
    check_against_reference(sample_inputs("cpu", dtype), CSR, op, dtype, REFS)


@pytest.mark.parametrize("op", ["spmm", "linear"])
def test_isa_paths_agree(op, dtype):
    check_isas_agree(sample_inputs("cpu", dtype), CSR, op, dtype, REFS)


@pytest.mark.parametrize("op", ["spmm", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_thread_count_does_not_change_results(op, dtype):
    check_threads_agree(sample_inputs("cpu", dtype), CSR, op, dtype, REFS)


@settings(max_examples=50, deadline=None)
@given(M=st.integers(0, 40), K=st.integers(0, 70), n=st.sampled_from((0,) + WIDTHS), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from(DTYPES), isa=st.sampled_from(SUPPORTED_ISAS), layout=st.sampled_from(LAYOUTS),
       index_dtype=st.sampled_from(CSR_INDEX_DTYPES), op=st.sampled_from(["spmm", "linear"]), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_random_products_match_reference(M, K, n, density, dtype, isa, layout, index_dtype, op, bias, seed):
    g = gen(seed)
    W = random_sparse(M, K, density, dtype, g, empty_rows=bool(seed % 2))
    X = dense_operand(K, n, dtype, g, layout)
    b = randn(M, dtype=dtype, g=g) if bias and op == "linear" else None
    s = Sample(op, "random", W, X if op == "spmm" else X.t(), b, fmt_kwargs=dict(index_dtype=index_dtype))
    try:
        pysparse.set_cpu_isa(isa)
        out = s.run(CSR)
    finally:
        pysparse.set_cpu_isa("auto")
    assert_close(out, *s.reference(*REFS), dtype, what=f"{isa} {op}")


def test_tolerance_catches_a_dropped_nonzero(dtype):
    """TOL is tight enough to see one nonzero left out of a 3072-term row, and loose enough for
    torch's own fp32 product rounded to the dtype."""
    g = gen(8)
    W = random_sparse(4, 3072, 0.5, dtype, g, empty_rows=False)
    X = randn(3072, 3, dtype=dtype, g=g)
    ref, absref = reference_spmm(W, X), reference_spmm(W.abs(), X.abs())
    assert check_close((W.float() @ X.float()).to(dtype), ref, absref, dtype) is None
    j = int(W[2].nonzero()[7])
    W2 = W.clone()
    W2[2, j] = 0
    assert check_close((W2.float() @ X.float()).to(dtype), ref, absref, dtype) is not None


def test_inputs_untouched_and_result_fresh():
    g = gen(1)
    W = random_sparse(33, 127, 0.3, torch.bfloat16, g)
    A = CSR.from_dense(W)
    X = dense_operand(127, 16, torch.bfloat16, g)
    x, b = randn(4, 127, dtype=torch.bfloat16, g=g), randn(33, dtype=torch.bfloat16, g=g)
    inputs = (A.crow_indices, A.col_indices, A.values, X, x, b)
    saved = [t.clone() for t in inputs]
    y1, y2 = pysparse.spmm(A, X), pysparse.spmm(A, X)
    z = pysparse.linear(x, A, b)
    assert y1.data_ptr() != y2.data_ptr() and y1.is_contiguous() and z.is_contiguous()
    assert torch.equal(y1, y2)
    for before, after in zip(saved, inputs):
        assert torch.equal(before, after)


def test_linear_matches_torch_nn_functional_linear():
    g = gen(2)
    W = random_sparse(65, 127, 0.2, torch.float32, g)
    b = randn(65, g=g)
    x = randn(3, 9, 127, g=g)
    torch.testing.assert_close(pysparse.linear(x, CSR.from_dense(W), b),
                               torch.nn.functional.linear(x, W, b), rtol=1e-5, atol=1e-5)


def test_int16_columns_at_the_32768_boundary(isa):
    """Default CSR indices are int16 columns up to K = 32768: column 32767 must still be read as
    32767 (not a negative number) on every path, and K = 32769 falls back to int32 columns."""
    g = gen(3)
    for K, col_dtype in ((32768, torch.int16), (32769, torch.int32)):
        W = torch.zeros(5, K)
        W[1, [0, 1, K - 2, K - 1]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
        W[3, K - 1] = 5.0
        W[4, ::97] = randn(len(range(0, K, 97)), g=g)
        A = CSR.from_dense(W)
        assert (A.crow_indices.dtype, A.col_indices.dtype) == (torch.int32, col_dtype)
        for n in (1, 8, 33):
            X = randn(K, n, g=g)
            assert_close(pysparse.spmm(A, X), reference_spmm(W, X), reference_spmm(W.abs(), X.abs()),
                         torch.float32, what=f"K={K} n={n}")


@pytest.mark.parametrize("n", [1, 3, 8, 40])
def test_untouched_non_finite_inputs_do_not_leak(isa, dtype, n):
    """Only stored nonzeros multiply: inf/NaN in rows of X that a CSR row never touches must not
    reach that row's output (padded lanes of vector loads and gathers read nothing), while a
    touched inf gives inf or NaN as the dense product does."""
    torch.manual_seed(3)
    M, K = 21, 53  # row lengths leave a partial vector at every width
    W = torch.randn(M, K)
    W[:, :2] = 0  # no row touches columns 0 and 1 ...
    W[5, 1] = 1.0  # ... except row 5, which touches column 1
    A = CSR.from_dense(W.to(dtype))
    X = torch.randn(K, n).to(dtype)
    X[0] = float("inf")
    X[1] = float("nan")
    y = pysparse.spmm(A, X)
    finite_rows = [m for m in range(M) if m != 5]
    assert torch.isfinite(y[finite_rows]).all()
    assert torch.isnan(y[5]).all()
    ref = W.to(dtype).double()[:, 2:] @ X.double()[2:]
    torch.testing.assert_close(y[finite_rows].double(), ref[finite_rows], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("xshape", [(2, 3, 0), (0,)], ids=["3-D", "1-D"])
def test_linear_zero_in_features_nd_input(xshape):
    """in_features = 0 is a valid (empty) product, as in torch.nn.functional.linear: the result
    is the bias broadcast to (..., out_features), whatever the input's rank."""
    A = CSR.from_dense(torch.zeros(7, 0))
    bias = torch.arange(7.0)
    x = torch.zeros(xshape)
    expected = torch.nn.functional.linear(x, torch.zeros(7, 0), bias)
    torch.testing.assert_close(pysparse.linear(x, A, bias), expected)
    torch.testing.assert_close(pysparse.linear(x, A), torch.zeros(expected.shape))


def test_meta_tensors_give_shapes_only():
    A = CSR.from_dense(random_sparse(7, 33, 0.5, torch.bfloat16, gen(3))).to("meta")
    y = pysparse.spmm(A, torch.empty(33, 5, dtype=torch.bfloat16, device="meta"))
    assert (y.device.type, y.shape, y.dtype) == ("meta", (7, 5), torch.bfloat16)
    y = pysparse.linear(torch.empty(2, 4, 33, dtype=torch.bfloat16, device="meta"), A)
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 4, 7), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_samples(dtype):
    """Every index dtype choice at n = 1, one panel and several panels, zero columns, and linear
    with 2-D / 3-D / transposed inputs, with and without bias."""
    samples = sample_inputs("cpu", dtype)
    picked = [s for s in samples if s.name in {f"33x127 n=1 {_idt_name(i)}" for i in CSR_INDEX_DTYPES}]
    for prefix in ("33x127 n=17 ", "33x127 n=65 ", "empty 7x0 n=5", "33x127 x=(9,127) bias",
                   "33x127 x=(2, 5, 127) no bias", "33x127 x.T bias"):
        picked.append(next(s for s in samples if s.name.startswith(prefix)))
    return picked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_opcheck(dtype):
    samples = _opcheck_samples(dtype)
    assert len(samples) == 10
    for s in samples:
        op, args = _raw_args(s)
        torch.library.opcheck(op, args)


def test_compile_spmm_fullgraph():
    torch._dynamo.reset()
    g = gen(4)
    A = CSR.from_dense(random_sparse(33, 127, 0.3, torch.float32, g))

    def f(X):
        return pysparse.spmm(A, X) * 2.0

    cf = torch.compile(f, fullgraph=True)
    for n in (5, 9, 40):  # the second size recompiles with a symbolic n
        X = randn(127, n, g=g)
        torch.testing.assert_close(cf(X), f(X), rtol=0, atol=0)


def test_compile_linear_fullgraph():
    torch._dynamo.reset()
    g = gen(5)
    A = CSR.from_dense(random_sparse(33, 127, 0.3, torch.bfloat16, g), index_dtype=torch.int64)
    b = randn(33, dtype=torch.bfloat16, g=g)

    def f(x):
        return torch.relu(pysparse.linear(x, A, b))

    cf = torch.compile(f, fullgraph=True)
    for shape in ((2, 3, 127), (4, 7, 127)):
        x = randn(*shape, dtype=torch.bfloat16, g=g)
        torch.testing.assert_close(cf(x), f(x), rtol=0, atol=0)


def test_module_state_dict_round_trip_and_compile():
    torch._dynamo.reset()
    g = gen(6)
    W = random_sparse(65, 127, 0.2, torch.float32, g)
    m = SparseLinearModule(CSR.from_dense(W), randn(65, g=g))
    sd = save_load(m.state_dict())
    assert set(sd) == {"crow_indices", "col_indices", "values", "shape", "bias"}
    m2 = SparseLinearModule.from_state_dict(CSR, sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]) and v.dtype == m2.state_dict()[k].dtype, k
    m.load_state_dict(sd)  # same structure: a strict load works too
    x = randn(3, 5, 127, g=g)
    ref = reference_linear(x, W, m.bias)
    assert_close(m2(x), ref, reference_linear(x.abs(), W.abs(), m.bias.abs()), torch.float32, what="eager")
    cm = torch.compile(m2, fullgraph=True)
    torch.testing.assert_close(cm(x), m2(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: public API (Python checks)


def _A(dtype=torch.float32):
    return CSR.from_dense(random_sparse(7, 33, 0.5, dtype, gen(7)))


@pytest.mark.parametrize("fn", ["spmm", "linear"])
def test_api_rejects_non_format(fn):
    W = torch.randn(7, 33)
    with pytest.raises(TypeError, match=rf"pysparse\.{fn}: A must be a pysparse\.CSR, BSR or SparseNM/Sparse24, got Tensor"):
        pysparse.spmm(W, torch.randn(33, 2)) if fn == "spmm" else pysparse.linear(torch.randn(2, 33), W)
    with pytest.raises(TypeError, match=rf"pysparse\.{fn}: {'X' if fn == 'spmm' else 'x'} must be a tensor, got list"):
        pysparse.spmm(_A(), [[1.0]]) if fn == "spmm" else pysparse.linear([[1.0]], _A())


@pytest.mark.parametrize("A_dtype,X_dtype", [
    (torch.float32, torch.int64), (torch.float32, torch.int32), (torch.float32, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
])
def test_api_rejects_dtype_mismatch(A_dtype, X_dtype):
    A = _A(A_dtype)
    X = torch.ones(33, 4, dtype=X_dtype)
    with pytest.raises(TypeError, match=re.escape(f"pysparse.spmm: X is {X_dtype} but A's values are {A_dtype}")):
        pysparse.spmm(A, X)
    with pytest.raises(TypeError, match=re.escape(f"pysparse.linear: x is {X_dtype} but A's values are {A_dtype}")):
        pysparse.linear(X.t(), A)


@pytest.mark.parametrize("shape", [(32, 4), (34, 4), (33,), (33, 4, 1), (4, 33)])
def test_spmm_rejects_shape_mismatch(shape):
    with pytest.raises(ValueError, match=r"pysparse\.spmm: A is 7x33, so X must be \(33, n\) or \(\.\.\., 33, n\), got "
                       + re.escape(str(shape))):
        pysparse.spmm(_A(), torch.randn(*shape))


@pytest.mark.parametrize("shape", [(4, 32), (34,), (2, 3, 4), ()])
def test_linear_rejects_shape_mismatch(shape):
    with pytest.raises(ValueError, match=r"pysparse\.linear: A is 7x33, so x must end in 33 features, got shape "
                       + re.escape(str(shape))):
        pysparse.linear(torch.randn(shape), _A())


def test_api_rejects_device_mismatch():
    A = _A()
    with pytest.raises(ValueError, match=r"pysparse\.spmm: X is on meta but A is on cpu"):
        pysparse.spmm(A, torch.empty(33, 4, device="meta"))
    with pytest.raises(ValueError, match=r"pysparse\.linear: x is on meta but A is on cpu"):
        pysparse.linear(torch.empty(4, 33, device="meta"), A)
    with pytest.raises(ValueError, match=r"pysparse\.linear: bias is on meta but A is on cpu"):
        pysparse.linear(torch.randn(4, 33), A, torch.empty(7, device="meta"))
    with pytest.raises(ValueError, match=r"pysparse\.spmm: X is on cpu but A is on meta"):
        pysparse.spmm(A.to("meta"), torch.randn(33, 4))


@pytest.mark.parametrize("bshape", [(8,), (6,), (1, 7), (7, 1), ()])
def test_linear_rejects_bias_shape(bshape):
    with pytest.raises(ValueError, match=r"pysparse\.linear: bias must have shape \(7,\), got " + re.escape(str(bshape))):
        pysparse.linear(torch.randn(4, 33), _A(), torch.randn(bshape))


def test_linear_rejects_bias_dtype():
    with pytest.raises(TypeError, match=r"pysparse\.linear: bias is torch\.bfloat16 but A's values are torch\.float32"):
        pysparse.linear(torch.randn(4, 33), _A(), torch.randn(7, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Bad input: raw torch.ops calls (the C++ trusts nothing)

# (row pointer dtype, column index dtype) pairs the kernels take
INDEX_PAIRS = {"i32": (torch.int32, torch.int32), "i64": (torch.int64, torch.int64), "i32+i16": (torch.int32, torch.int16)}


@pytest.mark.parametrize("bad", ["K", "K+1", "max", "-1", "min"])
@pytest.mark.parametrize("pos", [5, 39], ids=["body", "tail"])
@pytest.mark.parametrize("pair", list(INDEX_PAIRS))
def test_raw_out_of_range_column_is_an_error(isa, bad, pos, pair):
    """Detected in the kernels on every path (gemv and its vector gathers, each panel width),
    for every index dtype, never read: a 3 x 64 matrix whose row 1 holds 40 nonzeros."""
    K = 64
    rdt, cdt = INDEX_PAIRS[pair]
    info = torch.iinfo(cdt)
    crow = torch.tensor([0, 0, 40, 40], dtype=rdt)
    col = torch.arange(40)
    col[pos] = {"K": K, "K+1": K + 1, "max": info.max, "-1": -1, "min": info.min}[bad]
    col = col.to(cdt)
    msg = r"pysparse: a column index is out of range for a matrix with 64 columns"
    for dtype in (torch.float32, torch.bfloat16):
        vals = torch.ones(40, dtype=dtype)
        for n in (1, 3, 8, 16, 24, 40, 70):
            X = torch.ones(K, n, dtype=dtype)
            with pytest.raises(RuntimeError, match=msg):
                ops.csr_spmm(crow, col, vals, [3, K], X)
            with pytest.raises(RuntimeError, match=msg):
                ops.csr_linear(X.t(), crow, col, vals, [3, K], None)
    # still alive and correct afterwards
    A = _A()
    X = torch.randn(33, 5)
    torch.testing.assert_close(pysparse.spmm(A, X), A.to_dense() @ X, rtol=1e-5, atol=1e-5)


def _t(*v, dtype=torch.int32):
    return torch.tensor(v, dtype=dtype)


# A 3 x 4 matrix with rows of 2, 0 and 2 nonzeros; each case replaces some of the arguments.
GOOD = dict(crow=_t(0, 2, 2, 4), col=_t(0, 3, 1, 2), values=torch.ones(4), shape=[3, 4], dense=torch.ones(4, 2))
RAW_BAD = {
    "decreasing crow": (dict(crow=_t(0, 3, 1, 4)), RuntimeError,
                        r"pysparse: row pointers must be non-decreasing, but entry 2 \(1\) is below entry 1 \(3\)"),
    "negative crow": (dict(crow=_t(0, -1, 2, 4)), RuntimeError, r"pysparse: row pointers must be non-decreasing"),
    "crow[0] != 0": (dict(crow=_t(1, 2, 2, 4)), RuntimeError, r"pysparse: row pointers must start at 0, got 1"),
    "crow[-1] != nnz": (dict(crow=_t(0, 2, 2, 3)), RuntimeError,
                        r"pysparse: the last row pointer \(3\) must equal the number of nonzeros \(4\)"),
    "crow past nnz": (dict(crow=_t(0, 9, 2, 4)), RuntimeError, r"pysparse: row pointers must be non-decreasing"),
    "crow too short": (dict(crow=_t(0, 2, 4)), RuntimeError,
        r"pysparse: crow_indices must have rows \+ 1 = 4 entries, got 3"),
    "crow too long": (dict(crow=_t(0, 2, 2, 4, 4)), RuntimeError,
        r"pysparse: crow_indices must have rows \+ 1 = 4 entries, got 5"),
    "negative col": (dict(col=_t(0, 3, -1, 2)), RuntimeError,
        r"pysparse: a column index is out of range for a matrix with 4 columns"),
    "values shorter than col": (dict(values=torch.ones(3)), RuntimeError,
        r"pysparse: values has 3 entries but col_indices has 4"),
    "values longer than col": (dict(values=torch.ones(5)), RuntimeError,
        r"pysparse: values has 5 entries but col_indices has 4"),
    "values 2-D": (dict(values=torch.ones(4, 1)), RuntimeError,
        r"pysparse: CSR values must be 1-D, got shape \[4, 1\]"),
    "crow 2-D": (dict(crow=_t(0, 2, 2, 4).view(1, 4)), RuntimeError,
        r"pysparse: crow_indices must be 1-D, got shape \[1, 4\]"),
    "int32 crow, int64 col": (dict(col=_t(0, 3, 1, 2, dtype=torch.int64)), TypeError,
        r"pysparse: index dtypes must be .*got Int and Long"),
    "int64 crow, int16 col": (dict(crow=_t(0, 2, 2, 4, dtype=torch.int64), col=_t(0, 3, 1, 2, dtype=torch.int16)), TypeError,
                              r"pysparse: index dtypes must be .*got Long and Short"),
    "int16 crow": (dict(crow=_t(0, 2, 2, 4, dtype=torch.int16), col=_t(0, 3, 1, 2, dtype=torch.int16)), TypeError,
                   r"pysparse: index dtypes must be .*got Short and Short"),
    "float indices": (dict(crow=torch.tensor([0., 2, 2, 4]), col=torch.tensor([0., 3, 1, 2])), TypeError,
                      r"pysparse: index dtypes must be .*got Float and Float"),
    "int16 col, K > 32768": (dict(col=_t(0, 3, 1, 2, dtype=torch.int16), shape=[3, 40000], dense=torch.ones(40000, 2)),
                             RuntimeError, r"pysparse: int16 column indices need at most 32768 columns, the matrix has 40000"),
    "float64 values": (dict(values=torch.ones(4, dtype=torch.float64), dense=torch.ones(4, 2, dtype=torch.float64)), TypeError,
                       r"pysparse: values must be float32, bfloat16 or float16, got Double"),
    "int values": (dict(values=torch.ones(4, dtype=torch.int64), dense=torch.ones(4, 2, dtype=torch.int64)), TypeError,
                   r"pysparse: values must be float32, bfloat16 or float16, got Long"),
    "dense dtype differs": (dict(dense=torch.ones(4, 2, dtype=torch.bfloat16)), TypeError,
                            r"pysparse: (dense|input) dtype BFloat16 differs from the sparse values' dtype Float"),
    "shape with 3 entries": (dict(shape=[3, 4, 1]), RuntimeError, r"pysparse: shape must have 2 entries, got 3"),
    "negative shape": (dict(shape=[3, -4]), RuntimeError, r"pysparse: shape must be non-negative, got \(3, -4\)"),
    "nonzeros with 0 columns": (dict(shape=[3, 0], dense=torch.ones(0, 2)), RuntimeError,
                                r"pysparse: a matrix with 0 columns cannot hold nonzeros"),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
@pytest.mark.parametrize("op", ["csr_spmm", "csr_linear"])
def test_raw_op_rejects(op, case):
    over, exc, msg = RAW_BAD[case]
    a = dict(GOOD, **over)
    with pytest.raises(exc, match=msg):
        if op == "csr_spmm":
            ops.csr_spmm(a["crow"], a["col"], a["values"], a["shape"], a["dense"])
        else:
            ops.csr_linear(a["dense"].t(), a["crow"], a["col"], a["values"], a["shape"], None)


def test_raw_shape_and_bias_errors():
    crow, col, values, shape = GOOD["crow"], GOOD["col"], GOOD["values"], GOOD["shape"]
    with pytest.raises(RuntimeError, match=r"pysparse: dense has 5 rows but the sparse matrix has 4 columns"):
        ops.csr_spmm(crow, col, values, shape, torch.ones(5, 2))
    with pytest.raises(RuntimeError, match=r"pysparse: dense must be \(K, n\) or a batch \(\.\.\., K, n\), got 1-D"):
        ops.csr_spmm(crow, col, values, shape, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"pysparse: input's last dimension \(5\) must equal the sparse matrix's columns \(4\)"):
        ops.csr_linear(torch.ones(2, 5), crow, col, values, shape, None)
    with pytest.raises(RuntimeError, match=r"pysparse: bias must have shape \(3\), got \[4\]"):
        ops.csr_linear(torch.ones(2, 4), crow, col, values, shape, torch.ones(4))
    with pytest.raises(TypeError, match=r"pysparse: bias dtype Half differs from the sparse values' dtype Float"):
        ops.csr_linear(torch.ones(2, 4), crow, col, values, shape, torch.ones(3, dtype=torch.half))
    # and the good operands do work
    torch.testing.assert_close(ops.csr_spmm(crow, col, values, shape, torch.ones(4, 2)),
                               torch.tensor([[2., 2.], [0., 0.], [2., 2.]]))


_FUZZ = textwrap.dedent("""
    import torch, pysparse
    ops = torch.ops.pysparse
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.int32, torch.int32), (torch.int64, torch.int64), (torch.int32, torch.int16)]
    counts = {"error": 0, "ok": 0}
    for isa in pysparse._C.cpu_isa_supported():
        pysparse.set_cpu_isa(isa)
        for it in range(150):
            M, K = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
            nnz = int(torch.randint(0, 12, (1,), generator=g))
            rdt, cdt = pairs[it % 3]
            # garbage: row pointers and columns drawn from ranges wider than the valid ones
            if it % 4:  # well-formed row pointers
                crow = torch.randint(0, nnz + 1, (M + 1,), generator=g).sort().values
                crow[0], crow[-1] = 0, nnz
            else:
                crow = torch.randint(-3, nnz + 3, (M + 1,), generator=g)
            if it % 3:  # in-range columns (maybe unsorted, duplicated)
                col = torch.randint(0, max(K, 1), (nnz,), generator=g)
            else:
                col = torch.randint(-2, K + 3, (nnz,), generator=g)
            crow, col = crow.to(rdt), col.to(cdt)
            vals = torch.randn(nnz, generator=g)
            n = (1, 2, 8, 17, 70)[it % 5]
            X = torch.randn(K, n, generator=g)
            valid = int(crow[0]) == 0 and int(crow[-1]) == nnz and bool((crow.diff() >= 0).all()) \\
                and bool(((col >= 0) & (col < K)).all())
            try:
                y = ops.csr_spmm(crow, col, vals, [M, K], X) if it % 2 else ops.csr_linear(X.t(), crow, col, vals, [M, K], None).t()
            except (RuntimeError, TypeError) as e:
                assert str(e).startswith("pysparse: "), str(e)
                assert not valid, (isa, crow, col, str(e))
                counts["error"] += 1
                continue
            assert valid, (isa, crow, col, "accepted")
            rows = torch.repeat_interleave(torch.arange(M), crow.diff().long())
            W = torch.zeros(M, K, dtype=torch.float64).index_put_((rows, col.long()), vals.double(), accumulate=True)
            torch.testing.assert_close(y.double(), W @ X.double(), rtol=1e-5, atol=1e-5)
            counts["ok"] += 1
    assert counts["error"] > 100 and counts["ok"] > 100, counts
    print("FUZZ-OK", counts)
""")


def test_raw_garbage_indices_never_crash():
    """Random row pointers / column indices, in a child process so a crash cannot take the session
    down: each call either raises a "pysparse: ..." error or, when the indices are valid (unsorted
    and duplicate columns are fine for the raw ops), returns A @ X."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _FUZZ], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert r.returncode == 0 and "FUZZ-OK" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (csrc/cuda/csr_spmm.cu)")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("index_dtype", [None, torch.int32, torch.int64])
def test_cuda_kernel_matches_the_cpu_one(dtype, index_dtype):
    W = pysparse.prune.magnitude(torch.randn(300, 200, generator=gen(1)), 0.9).to(dtype)
    W[7] = 0  # an empty row
    A = CSR.from_dense(W, index_dtype=index_dtype)
    Ac = A.to("cuda")
    # the narrow kernel (n <= 8), one column per lane, four (rows of B 4-aligned or not), partial tiles
    for n in (1, 5, 8, 9, 64, 130, 300):
        X = torch.randn(200, n, generator=gen(n)).to(dtype)
        torch.testing.assert_close(pysparse.spmm(Ac, X.cuda()).cpu(), pysparse.spmm(A, X), rtol=2e-2, atol=2e-2)
    Xb = torch.randn(2, 3, 200, 70, generator=gen(4)).to(dtype)  # a batch: one launch per matrix
    torch.testing.assert_close(pysparse.spmm(Ac, Xb.cuda()).cpu(), pysparse.spmm(A, Xb), rtol=2e-2, atol=2e-2)
    x, b = torch.randn(3, 4, 200, generator=gen(2)).to(dtype), torch.randn(300, generator=gen(3)).to(dtype)
    torch.testing.assert_close(pysparse.linear(x.cuda(), Ac, b.cuda()).cpu(), pysparse.linear(x, A, b), rtol=2e-2, atol=2e-2)
    for T in (1, 5, 8):  # decode: x and the output read and written through strides, no copies
        xd = x.reshape(12, 200)[:T]
        torch.testing.assert_close(pysparse.linear(xd.cuda(), Ac, b.cuda()).cpu(), pysparse.linear(xd, A, b),
                                   rtol=2e-2, atol=2e-2)
    bad_col = Ac.col_indices.clone()
    bad_col[0] = 10_000
    with pytest.raises(RuntimeError, match=r"column index or row pointer is out of range"):
        torch.ops.pysparse.csr_spmm(Ac.crow_indices, bad_col, Ac.values, [300, 200], torch.ones(200, 2, device="cuda", dtype=dtype))
    one = dict(device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"^pysparse: a matrix with 0 columns cannot hold nonzeros"):
        torch.ops.pysparse.csr_spmm(torch.tensor([0, 1, 1], **one), torch.tensor([0], **one), torch.ones(1, device="cuda", dtype=dtype),
                                    [2, 0], torch.ones(0, 20, device="cuda", dtype=dtype))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_wide_operand_split_by_panels_across_threads(isa, fmt):
    # A small matrix against a very wide operand (a 1x1 convolution's shape) is split by column
    # panels between threads instead of by rows: both halves must land, ragged last panel too.
    W = pysparse.prune.magnitude(torch.randn(32, 64, generator=gen(40)), 0.6)
    A = pysparse.CSR.from_dense(W) if fmt == "csr" else pysparse.BSR.from_dense(W, (8, 8))
    X = torch.randn(64, 4096 + 37, generator=gen(41))
    from conftest import num_threads

    with num_threads(2):
        got = pysparse.spmm(A, X)
    torch.testing.assert_close(got, W @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [17, 33, 70, 130])
@pytest.mark.parametrize("order", ["sorted", "unsorted", "duplicates"])
def test_k_blocked_walk(isa, dtype, n, order):
    """Panels taller than an L1 slice take the K-blocked kernel (csr_impl.h): several row blocks
    (M > 64), rows from empty to dense, columns spread over K with gaps longer than a slice, and
    rows whose columns are out of order or repeated (the block then takes the row-axpy kernel)."""
    g = torch.Generator().manual_seed(n)
    M, K = 150, 1100
    dense = torch.zeros(M, K, dtype=torch.float64)
    for m in range(M):
        k = (0, 1, 3, 40, 300, K)[m % 6]  # nonzeros in row m
        cols = torch.randperm(K, generator=g)[:k] if m % 7 else torch.arange(k) * (K // max(k, 1))
        dense[m, cols] = torch.randn(k, generator=g, dtype=torch.float64)
    crow, col, val = [], [], []
    for m in range(M):
        nz = dense[m].nonzero().flatten()
        if order == "unsorted" and m % 5 == 2:
            nz = nz.flip(0)
        v = dense[m, nz]
        if order == "duplicates" and len(nz) > 1 and m % 5 == 2:  # the first entry split in two
            half = v[:1] / 2
            nz, v = torch.cat([nz, nz[:1]]), torch.cat([half, v[1:], half])
        crow.append(len(col))
        col += nz.tolist()
        val += v.tolist()
    crow.append(len(col))
    crow, col = torch.tensor(crow, dtype=torch.int32), torch.tensor(col, dtype=torch.int32)
    vals = torch.tensor(val, dtype=torch.float64).to(dtype)
    X = torch.randn(K, n, generator=g).to(dtype)
    ref = dense.to(dtype).double() @ X.double()
    absref = dense.to(dtype).double().abs() @ X.double().abs()
    try:
        pysparse.set_cpu_isa(isa)
        y = torch.ops.pysparse.csr_spmm(crow, col, vals, [M, K], X)
        lin = torch.ops.pysparse.csr_linear(X.t(), crow, col, vals, [M, K], None)
    finally:
        pysparse.set_cpu_isa("auto")
    assert_close(y, ref, absref, dtype, what=f"{isa} spmm {order}")
    assert_close(lin.t(), ref, absref, dtype, what=f"{isa} linear {order}")
