"""pysparse.CSR / pysparse.BSR: round trips (hypothesis), index dtypes, conversions, state_dict,
and every construction error."""
from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysparse import BSR, CSR
from conftest import DTYPES, gen, save_load

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CSR_INDEX_DTYPES = (None, torch.int16, torch.int32, torch.int64)
BSR_INDEX_DTYPES = (None, torch.int32, torch.int64)


def _matrix(M, K, density, dtype, seed, zero_rows=(), zero_cols=(), specials=False):
    g = gen(seed)
    W = torch.randn(M, K, generator=g) * (torch.rand(M, K, generator=g) < density)
    if specials and W.numel():
        # infinities, a subnormal of the dtype and a negative zero (dropped, it equals 0)
        flat = W.view(-1)
        idx = torch.randint(0, W.numel(), (4,), generator=g)
        flat[idx] = torch.tensor([float("inf"), float("-inf"), torch.finfo(dtype).tiny / 2, -0.0])
    W[list(zero_rows)] = 0
    W[:, list(zero_cols)] = 0
    return W.to(dtype)


@st.composite
def dense_matrices(draw, max_side=12):
    """Random dense matrices: shapes from 0, densities from 0 to 1, whole zero rows / columns,
    every value dtype, sometimes infinities and subnormals."""
    M, K = draw(st.integers(0, max_side)), draw(st.integers(0, max_side))
    density = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    zero_rows = draw(st.sets(st.integers(0, M - 1), max_size=M)) if M else set()
    zero_cols = draw(st.sets(st.integers(0, K - 1), max_size=K)) if K else set()
    return _matrix(M, K, density, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1)),
                   zero_rows, zero_cols, specials=draw(st.booleans()))


@st.composite
def block_matrices(draw):
    """(W, blocksize): random blocks of random sizes, whole zero blocks / block rows, and zeros
    inside kept blocks."""
    bh, bw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    Mb, Kb = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    keep = torch.rand(Mb, Kb, generator=g) < draw(st.floats(0.0, 1.0))
    full = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    inner = torch.rand(Mb * bh, Kb * bw, generator=g) < draw(st.floats(0.3, 1.0))
    W = torch.randn(Mb * bh, Kb * bw, generator=g) * (full & inner)
    return W.to(draw(st.sampled_from(DTYPES))), (bh, bw)


def assert_same(a: torch.Tensor, b: torch.Tensor):
    """Bit-exact up to the sign of zero: same dtype, shape and values (inf included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def assert_same_format(A, B):
    assert type(A) is type(B) and A.shape == B.shape
    for name in ("crow_indices", "col_indices", "values"):
        assert_same(getattr(A, name), getattr(B, name))


def _csr_invariants(A: CSR, W: torch.Tensor):
    M, K = W.shape
    crow, col = A.crow_indices.long(), A.col_indices.long()
    assert crow.shape == (M + 1,) and int(crow[0]) == 0 and int(crow[-1]) == A.nnz == int((W != 0).sum())
    assert bool((crow.diff() >= 0).all())
    for m in range(M):
        c = col[crow[m]:crow[m + 1]]
        assert bool((c.diff() > 0).all()) and bool(((c >= 0) & (c < K)).all())
    assert A.values.dtype == W.dtype and A.shape == (M, K)


# ---------------------------------------------------------------------------------------------
# CSR round trips


@SETTINGS
@given(W=dense_matrices(), index_dtype=st.sampled_from(CSR_INDEX_DTYPES))
def test_csr_from_dense_round_trip(W, index_dtype):
    A = CSR.from_dense(W, index_dtype=index_dtype)
    _csr_invariants(A, W)
    assert_same(A.to_dense(), W)
    expected = {None: (torch.int32, torch.int16), torch.int16: (torch.int32, torch.int16),
                torch.int32: (torch.int32, torch.int32), torch.int64: (torch.int64, torch.int64)}[index_dtype]
    assert (A.crow_indices.dtype, A.col_indices.dtype) == expected
    # what from_dense builds passes the full validation
    assert_same_format(CSR(A.crow_indices, A.col_indices, A.values, A.shape), A)
    for other in CSR_INDEX_DTYPES:
        assert_same(A.with_index_dtype(other).to_dense(), W)


@SETTINGS
@given(W=dense_matrices())
def test_csr_torch_round_trip(W):
    A = CSR.from_dense(W)
    t = A.to_torch()
    assert t.layout == torch.sparse_csr and t.shape == W.shape
    assert_same(t.to_dense(), W)
    assert_same_format(CSR.from_torch(t), A)
    assert_same(CSR.from_torch(W.to_sparse_csr()).to_dense(), W)
    assert_same(CSR.from_torch(W.to_sparse()).to_dense(), W)  # COO
    assert_same(CSR.from_torch(W).to_dense(), W)  # strided
    assert CSR.from_torch(t, index_dtype=torch.int64).index_dtype == torch.int64


@SETTINGS
@given(W=dense_matrices(), kind=st.sampled_from(["csr_matrix", "csr_array", "coo_matrix", "csc_matrix", "lil_matrix"]))
def test_csr_from_scipy_equals_dense(W, kind):
    m = getattr(sp, kind)(W.float().numpy())  # bf16 / fp16 values are exact in fp32
    A = CSR.from_scipy(m, dtype=W.dtype)
    assert A.shape == tuple(W.shape)
    assert_same(A.to_dense(), W)


@SETTINGS
@given(W=dense_matrices(), prefix=st.sampled_from(["", "layer.0.weight."]))
def test_csr_state_dict_round_trip(W, prefix):
    A = CSR.from_dense(W)
    sd = save_load(A.state_dict(prefix))
    assert set(sd) == {prefix + k for k in ("crow_indices", "col_indices", "values", "shape")}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert_same_format(CSR.from_state_dict(sd, prefix), A)


# ---------------------------------------------------------------------------------------------
# BSR round trips


@SETTINGS
@given(Wb=block_matrices(), index_dtype=st.sampled_from(BSR_INDEX_DTYPES))
def test_bsr_from_dense_round_trip(Wb, index_dtype):
    W, (bh, bw) = Wb
    A = BSR.from_dense(W, (bh, bw), index_dtype=index_dtype)
    assert A.blocksize == (bh, bw) and A.shape == tuple(W.shape)
    assert A.index_dtype == (index_dtype or torch.int32) and A.col_indices.dtype == A.index_dtype
    blocks = W.reshape(W.shape[0] // bh, bh, W.shape[1] // bw, bw).transpose(1, 2)
    nonzero_blocks = int((blocks != 0).flatten(2).any(2).sum())
    assert A.values.shape == (nonzero_blocks, bh, bw) and A.nnz == nonzero_blocks * bh * bw
    assert_same(A.to_dense(), W)
    assert_same_format(BSR(A.crow_indices, A.col_indices, A.values, A.shape), A)


@SETTINGS
@given(Wb=block_matrices())
def test_bsr_torch_round_trip(Wb):
    W, bs = Wb
    A = BSR.from_dense(W, bs)
    t = A.to_torch()
    assert t.layout == torch.sparse_bsr
    assert_same(t.to_dense(), W)
    assert_same_format(BSR.from_torch(t), A)
    assert_same_format(BSR.from_torch(W.to_sparse_bsr(bs)), A)
    assert_same_format(BSR.from_torch(W, bs), A)
    assert_same_format(BSR.from_torch(W.to_sparse(), bs), A)


@SETTINGS
@given(Wb=block_matrices())
def test_bsr_from_scipy_equals_dense(Wb):
    W, bs = Wb
    m = sp.bsr_matrix(W.float().numpy(), blocksize=bs)
    A = BSR.from_scipy(m, dtype=W.dtype)
    assert A.blocksize == bs
    assert_same(A.to_dense(), W)


@SETTINGS
@given(Wb=block_matrices())
def test_bsr_state_dict_round_trip(Wb):
    W, bs = Wb
    A = BSR.from_dense(W, bs, index_dtype=torch.int64)
    sd = save_load(A.state_dict("w."))
    B = BSR.from_state_dict(sd, "w.")
    assert_same_format(B, A)
    assert B.blocksize == bs


# ---------------------------------------------------------------------------------------------
# Properties, conversions, index dtypes


def test_properties():
    W = torch.tensor([[0., 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 4]])
    A = CSR.from_dense(W)
    assert (A.shape, A.nnz, A.dtype, A.device, A.index_dtype) == ((3, 4), 4, torch.float32, torch.device("cpu"), torch.int32)
    assert A.density == pytest.approx(4 / 12)
    assert A.crow_indices.tolist() == [0, 2, 2, 4] and A.col_indices.tolist() == [1, 3, 0, 3]
    assert A.values.tolist() == [1, 2, 3, 4]
    B = BSR.from_dense(W, (1, 2))
    assert (B.shape, B.blocksize, B.nnz) == ((3, 4), (1, 2), 8)
    assert B.crow_indices.tolist() == [0, 2, 2, 4] and B.col_indices.tolist() == [0, 1, 0, 1]
    assert CSR.from_dense(torch.zeros(0, 0)).density == 0.0
    for fmt in (A, B):
        r = repr(fmt)
        assert r.startswith(type(fmt).__name__ + "(shape=(3, 4)") and f"nnz={fmt.nnz}" in r


def test_to_converts_values_and_moves_everything():
    A = CSR.from_dense(_matrix(7, 33, 0.5, torch.float32, 1))
    B = A.to(torch.bfloat16)
    assert B.dtype == torch.bfloat16 and B.col_indices is A.col_indices and B.shape == A.shape
    assert_same(B.values, A.values.to(torch.bfloat16))
    assert A.dtype == torch.float32  # A itself is unchanged
    C = A.to("meta")
    assert {t.device.type for t in (C.crow_indices, C.col_indices, C.values)} == {"meta"}
    with pytest.raises(ValueError, match=r"values must be float32, bfloat16 or float16, got torch\.float64"):
        A.to(torch.float64)
    with pytest.raises(ValueError, match=r"values must be float32, bfloat16 or float16, got torch\.int32"):
        BSR.from_dense(torch.ones(4, 4), (2, 2)).to(torch.int32)


def test_csr_int16_column_limit():
    W = torch.zeros(2, 32769)
    W[0, 32768] = 1.0
    A = CSR.from_dense(W)
    assert (A.crow_indices.dtype, A.col_indices.dtype) == (torch.int32, torch.int32)
    assert_same(A.to_dense(), W)
    with pytest.raises(ValueError, match=r"int16 column indices need at most 32768 columns.*got 32769 columns"):
        CSR.from_dense(W, index_dtype=torch.int16)
    with pytest.raises(ValueError, match=r"int16 column indices need at most 32768 columns"):
        A.with_index_dtype(torch.int16)
    with pytest.raises(ValueError, match=r"CSR: int16 column indices need at most 32768 columns, got 32769"):
        CSR(A.crow_indices, A.col_indices.to(torch.int16), A.values, A.shape)
    W = torch.zeros(2, 32768)
    W[1, 32767] = 2.0
    A = CSR.from_dense(W)
    assert A.col_indices.dtype == torch.int16 and A.col_indices.tolist() == [32767]
    assert_same(A.to_dense(), W)
    assert_same(A.to_torch().to_dense(), W)


@pytest.mark.parametrize("fmt,bad", [("CSR", torch.float32), ("CSR", torch.uint8), ("BSR", torch.float32),
                                     ("BSR", torch.uint8), ("BSR", torch.int16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_from_dense_rejects_bad_index_dtype(fmt, bad):
    """An index_dtype the format cannot hold is refused up front, not stored unchecked (BSR has
    no int16 indices: its kernels refuse them; int16 is a valid CSR choice, tested above)."""
    W = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"index_dtype"):
        CSR.from_dense(W, index_dtype=bad) if fmt == "CSR" else BSR.from_dense(W, (2, 2), index_dtype=bad)


def test_from_scipy_sums_duplicates_and_sorts():
    m = sp.coo_matrix((np.array([1.0, 2.0, 5.0, 4.0]), (np.array([0, 0, 1, 1]), np.array([2, 2, 3, 0]))), shape=(2, 4))
    A = CSR.from_scipy(m)
    assert A.col_indices.tolist() == [2, 0, 3] and A.values.tolist() == [3.0, 4.0, 5.0]
    m = sp.csr_matrix((np.array([5.0, 4.0]), np.array([3, 0]), np.array([0, 0, 2])), shape=(2, 4))  # unsorted row
    assert CSR.from_scipy(m).col_indices.tolist() == [0, 3]
    b = sp.bsr_matrix((np.ones((2, 2, 2)), np.array([1, 0]), np.array([0, 2])), shape=(2, 4))  # unsorted blocks
    B = BSR.from_scipy(b)
    assert B.col_indices.tolist() == [0, 1] and torch.equal(B.to_dense(), torch.ones(2, 4))
    assert CSR.from_scipy(sp.csr_matrix(np.ones((2, 2))), dtype=torch.float16).dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Construction errors

i32, i64, i16 = torch.int32, torch.int64, torch.int16


def _t(*v, dtype=i32):
    return torch.tensor(v, dtype=dtype)


# 3 x 4, rows of 2, 0 and 2 entries
CSR_GOOD = dict(crow=_t(0, 2, 2, 4), col=_t(0, 3, 1, 2), values=torch.ones(4), shape=(3, 4))
CSR_BAD = {
    "crow too short": (dict(crow=_t(0, 2, 4)), r"CSR: crow_indices must have 4 entries \(rows \+ 1\), got 3"),
    "crow too long": (dict(crow=_t(0, 2, 2, 4, 4)), r"CSR: crow_indices must have 4 entries \(rows \+ 1\), got 5"),
    "crow[0] != 0": (dict(crow=_t(1, 2, 2, 4)), r"CSR: crow_indices\[0\] must be 0, got 1"),
    "crow[-1] != nnz": (dict(crow=_t(0, 2, 2, 3)),
        r"CSR: crow_indices\[-1\] must equal the number of stored entries \(4\), got 3"),
    "decreasing crow": (dict(crow=_t(0, 3, 1, 4)),
        r"CSR: crow_indices must be non-decreasing, but row 1 ends \(1\) before it starts \(3\)"),
    "column == K": (dict(col=_t(0, 3, 1, 4)),
        r"CSR: column index 4 at position 3 \(row 2\) is out of range for 4 columns"),
    "negative column": (dict(col=_t(0, 3, -1, 2)),
        r"CSR: column index -1 at position 2 \(row 2\) is out of range for 4 columns"),
    "unsorted row": (dict(col=_t(3, 0, 1, 2)),
        r"CSR: column indices of row 0 must be sorted and unique, but 0 follows 3"),
    "duplicate column": (dict(col=_t(0, 3, 2, 2)),
        r"CSR: column indices of row 2 must be sorted and unique, but 2 follows 2"),
    "int32 crow, int64 col": (dict(col=_t(0, 3, 1, 2, dtype=i64)),
        r"CSR: crow_indices and col_indices must both be int32 or both int64.*got torch\.int32 and torch\.int64"),
    "int64 crow, int16 col": (dict(crow=_t(0, 2, 2, 4, dtype=i64), col=_t(0, 3, 1, 2, dtype=i16)),
        r"must both be int32 or both int64.*got torch\.int64 and torch\.int16"),
    "int16 crow": (dict(crow=_t(0, 2, 2, 4, dtype=i16), col=_t(0, 3, 1, 2, dtype=i16)),
        r"must both be int32 or both int64.*got torch\.int16 and torch\.int16"),
    "float indices": (dict(crow=torch.tensor([0., 2, 2, 4]), col=torch.tensor([0., 3, 1, 2])),
        r"must both be int32 or both int64.*got torch\.float32"),
    "float64 values": (dict(values=torch.ones(4, dtype=torch.float64)),
        r"CSR: values must be float32, bfloat16 or float16, got torch\.float64"),
    "int values": (dict(values=torch.ones(4, dtype=torch.int32)),
        r"CSR: values must be float32, bfloat16 or float16, got torch\.int32"),
    "values 2-D": (dict(values=torch.ones(4, 1)), r"CSR: values must be 1-D, got shape \(4, 1\)"),
    "crow 2-D": (dict(crow=_t(0, 2, 2, 4).view(2, 2)),
        r"CSR: crow_indices and col_indices must be 1-D, got shapes \(2, 2\) and \(4,\)"),
    "values on meta": (dict(values=torch.ones(4, device="meta")),
        r"CSR: crow_indices, col_indices and values must be on one device, got cpu, cpu and meta"),
    "crow on meta": (dict(crow=_t(0, 2, 2, 4).to("meta")), r"must be on one device, got meta, cpu and cpu"),
    "values shorter": (dict(values=torch.ones(3)), r"CSR: col_indices has 4 entries but values has 3"),
    "values longer": (dict(values=torch.ones(5)), r"CSR: col_indices has 4 entries but values has 5"),
    "crow a list": (dict(crow=[0, 2, 2, 4]), r"CSR: crow_indices must be a tensor, got list"),
    "values a numpy array": (dict(values=np.ones(4)), r"CSR: values must be a tensor, got ndarray"),
    "shape with 3 entries": (dict(shape=(3, 4, 1)), r"shape must be two non-negative integers, got \(3, 4, 1\)"),
    "negative shape": (dict(shape=(3, -4)), r"shape must be two non-negative integers, got \(3, -4\)"),
    "shape not numbers": (dict(shape=("a", 4)), r"shape must be two non-negative integers, got \('a', 4\)"),
}


@pytest.mark.parametrize("case", list(CSR_BAD))
def test_csr_construction_errors(case):
    over, msg = CSR_BAD[case]
    a = dict(CSR_GOOD, **over)
    with pytest.raises(ValueError, match=msg):
        CSR(a["crow"], a["col"], a["values"], a["shape"])


def test_csr_valid_and_unchecked_construction():
    a = CSR_GOOD
    A = CSR(a["crow"], a["col"], a["values"], a["shape"])
    assert A.to_dense().tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    # a new row may restart at a lower column (1 after 3 above); empty rows and empty matrices are valid
    CSR(_t(0, 0, 0), _t(), torch.ones(0), (2, 5))
    CSR(_t(0), _t(), torch.ones(0), (0, 0))
    CSR(_t(0, 2, 2, 4, dtype=i64), _t(0, 3, 1, 2, dtype=i64), torch.ones(4, dtype=torch.float16), (3, 4))
    # check=False trusts the caller
    CSR(_t(0, 3, 1, 4), _t(9, 9, 9, 9), torch.ones(4), (3, 4), check=False)


# 8 x 16 in (4, 4) blocks, one block in each block row
BSR_GOOD = dict(crow=_t(0, 1, 2), col=_t(3, 0), values=torch.ones(2, 4, 4), shape=(8, 16))
BSR_BAD = {
    "values 2-D": (dict(values=torch.ones(2, 16)),
        r"BSR: values must be a 3-D tensor \(blocks, block_rows, block_cols\), got shape \(2, 16\)"),
    "values a list": (dict(values=[1.0]), r"BSR: values must be a 3-D tensor .*got list"),
    "rows not divisible": (dict(shape=(6, 16)), r"BSR: shape \(6, 16\) is not divisible by the block size \(4, 4\)"),
    "cols not divisible": (dict(shape=(8, 18)), r"BSR: shape \(8, 18\) is not divisible by the block size \(4, 4\)"),
    "zero block size": (dict(values=torch.ones(2, 0, 4)), r"BSR: .*block size \(0, 4\)"),
    "crow[0] != 0": (dict(crow=_t(1, 1, 2)), r"BSR: crow_indices\[0\] must be 0, got 1"),
    "crow[-1] != nnzb": (dict(crow=_t(0, 1, 1)),
        r"BSR: crow_indices\[-1\] must equal the number of stored entries \(2\), got 1"),
    "decreasing crow": (dict(crow=_t(0, 3, 2)),
        r"BSR: crow_indices must be non-decreasing, but block row 1 ends \(2\) before it starts \(3\)"),
    "unsorted block row": (dict(crow=_t(0, 2, 2)),
        r"BSR: block column indices of block row 0 must be sorted and unique, but 0 follows 3"),
    "negative block column": (dict(col=_t(3, -1)), r"BSR: block column index -1 at position 1"),
    "int16 indices": (dict(col=_t(3, 0, dtype=i16)),
        r"BSR: crow_indices and col_indices must both be int32 or both int64, got torch\.int32 and torch\.int16"),
    "float64 values": (dict(values=torch.ones(2, 4, 4, dtype=torch.float64)),
        r"BSR: values must be float32, bfloat16 or float16, got torch\.float64"),
    "values on meta": (dict(values=torch.ones(2, 4, 4, device="meta")),
        r"BSR: crow_indices, col_indices and values must be on one device"),
    "values-col mismatch": (dict(values=torch.ones(3, 4, 4)), r"BSR: col_indices has 2 entries but values has 3"),
}


@pytest.mark.parametrize("case", list(BSR_BAD))
def test_bsr_construction_errors(case):
    over, msg = BSR_BAD[case]
    a = dict(BSR_GOOD, **over)
    with pytest.raises(ValueError, match=msg):
        BSR(a["crow"], a["col"], a["values"], a["shape"])


@pytest.mark.parametrize("case", ["crow length", "block column"])
def test_bsr_errors_speak_of_blocks(case):
    """BSR indices count blocks, and the messages must say so: "crow_indices must have 3 entries
    (rows + 1)" and "out of range for 4 columns" contradict an 8 x 16 matrix."""
    a = BSR_GOOD
    if case == "crow length":
        with pytest.raises(ValueError, match=r"BSR: crow_indices must have 3 entries \(block rows \+ 1\), got 4"):
            BSR(_t(0, 1, 2, 2), a["col"], a["values"], a["shape"])
    else:
        with pytest.raises(ValueError, match=r"BSR: block column index 4 at position 0 \(block row 0\) is out of range for 4 block columns"):
            BSR(a["crow"], _t(4, 0), a["values"], a["shape"])


def test_from_dense_errors():
    for bad, msg in (
        (torch.ones(4), r"CSR\.from_dense needs a 2-D tensor, got Tensor of shape \(4,\)"),
        (torch.ones(2, 2, 2), r"CSR\.from_dense needs a 2-D tensor, got Tensor of shape \(2, 2, 2\)"),
        ([[1.0]], r"CSR\.from_dense needs a 2-D tensor, got list"),
        (torch.ones(2, 2, dtype=torch.float64), r"CSR\.from_dense: values must be float32, bfloat16 or float16, got torch\.float64"),
        (torch.ones(2, 2, dtype=torch.int64), r"CSR\.from_dense: values must be float32, bfloat16 or float16, got torch\.int64"),
    ):
        with pytest.raises(ValueError, match=msg):
            CSR.from_dense(bad)
        with pytest.raises(ValueError, match=msg.replace("CSR", "BSR")):
            BSR.from_dense(bad, (1, 1))
    for bs in ((3, 4), (4, 3), (0, 4), (4, -1)):
        with pytest.raises(ValueError, match=r"BSR\.from_dense: shape \(8, 8\) is not divisible by the block size " + re.escape(str(bs))):
            BSR.from_dense(torch.ones(8, 8), bs)


def test_from_torch_and_scipy_errors():
    with pytest.raises(ValueError, match=r"CSR\.from_torch needs a 2-D torch tensor"):
        CSR.from_torch(torch.ones(3))
    with pytest.raises(ValueError, match=r"BSR\.from_torch needs a 2-D torch tensor"):
        BSR.from_torch(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"BSR\.from_torch: a torch\.strided tensor needs a blocksize"):
        BSR.from_torch(torch.ones(4, 4))
    # torch allows unsorted columns within a row (with check_invariants=False); the format does not
    t = torch.sparse_csr_tensor(_t(0, 2), _t(1, 0), torch.ones(2), (1, 2), check_invariants=False)
    with pytest.raises(ValueError, match=r"CSR: column indices of row 0 must be sorted and unique, but 0 follows 1"):
        CSR.from_torch(t)
    with pytest.raises(ValueError, match=r"BSR\.from_scipy needs a scipy BSR matrix, got format 'csr'"):
        BSR.from_scipy(sp.csr_matrix(np.ones((2, 2))))


def test_from_state_dict_errors():
    sd = CSR.from_dense(torch.eye(3)).state_dict("w.")
    with pytest.raises(ValueError, match=r"CSR\.from_state_dict: missing entry 'w\.values'"):
        CSR.from_state_dict({k: v for k, v in sd.items() if k != "w.values"}, "w.")
    with pytest.raises(ValueError, match=r"BSR\.from_state_dict: missing entry 'crow_indices'"):
        BSR.from_state_dict(sd)  # wrong prefix
    bad = dict(sd, **{"w.col_indices": sd["w.col_indices"] + 5})
    with pytest.raises(ValueError, match=r"CSR: column index 5 at position 0 \(row 0\) is out of range for 3 columns"):
        CSR.from_state_dict(bad, "w.")
    CSR.from_state_dict(bad, "w.", check=False)
