"""A batch of dense operands, (..., K, n) -> (..., M, n), through csr_spmm, bsr_spmm and nm_spmm.

On the CPU a batch is one call whose threads take whole matrices (the rest shared by panels or
rows), and wide operands are packed a strip of panels at a time with a narrower last panel: every
one of those paths must give each matrix its own product.
"""
from __future__ import annotations

import pytest
import torch

import pysparse
from conftest import DTYPES, assert_close, gen, num_threads, randn, random_block_sparse, random_sparse

FORMATS = ["csr", "bsr", "nm"]


def _matrix(fmt: str, M: int, K: int, dtype, seed: int):
    """(A in `fmt`, its dense W)."""
    g = gen(seed)
    if fmt == "csr":
        W = random_sparse(M, K, 0.15, dtype, g)
        return pysparse.CSR.from_dense(W), W
    if fmt == "bsr":
        W = random_block_sparse(M, K, (8, 8), 0.3, dtype, g)
        return pysparse.BSR.from_dense(W, (8, 8)), W
    W = pysparse.prune.nm(randn(M, K, dtype=dtype, g=g), 2, 4)
    return pysparse.Sparse24.from_dense(W), W


def _check(A, W, X, dtype, what):
    Y = pysparse.spmm(A, X)
    assert Y.shape == (*X.shape[:-2], W.shape[0], X.shape[-1]), what
    Wd, Xd = W.double(), X.double()
    assert_close(Y, Wd @ Xd, Wd.abs() @ Xd.abs(), dtype, what=what)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_matrix_of_the_batch_gets_its_product(isa, fmt, dtype, threads):
    # n: a vector, a narrow panel, ragged panels, and a wide operand (packed in strips, split by
    # panels when it is the image left over); batches of whole images per thread plus leftovers.
    A, W = _matrix(fmt, 48, 64, dtype, seed=1)
    with num_threads(threads):
        for n in (1, 5, 37, 200, 2048 + 37):
            for batch in ((1,), (3,), (2, 2), (5,)):
                X = randn(*batch, 64, n, dtype=dtype, g=gen(n + len(batch)))
                _check(A, W, X, dtype, f"{fmt} n={n} batch={batch}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_strided_batches(fmt):
    # A channel slice of an NCHW batch (a grouped 1x1 convolution), a column slice, and a batch
    # whose matrices are column-major: the op reads them through their strides.
    A, W = _matrix(fmt, 32, 64, torch.float32, seed=2)
    x = randn(4, 128, 300, g=gen(3))
    with num_threads(2):
        _check(A, W, x[:, 64:], torch.float32, "channel slice")
        _check(A, W, x[:, :64, 7:250], torch.float32, "column slice")
        _check(A, W, randn(3, 300, 64, g=gen(4)).transpose(1, 2), torch.float32, "column-major")


def test_empty_batches_and_matrices():
    A, W = _matrix("csr", 16, 32, torch.float32, seed=5)
    for shape in ((0, 32, 8), (3, 32, 0), (2, 0, 32, 4)):
        assert pysparse.spmm(A, torch.randn(*shape)).shape == (*shape[:-2], 16, shape[-1])
    Z = pysparse.CSR.from_dense(torch.zeros(16, 32))
    assert torch.equal(pysparse.spmm(Z, torch.randn(3, 32, 9)), torch.zeros(3, 16, 9))


def test_bad_column_index_in_a_batch_is_an_error():
    # Whole-image tasks report an out-of-range index like the shared path does.
    A, _ = _matrix("csr", 16, 32, torch.float32, seed=6)
    col = A.col_indices.clone()
    col[3] = 40
    for X in (torch.randn(4, 32, 100), torch.randn(4, 32, 5000)):
        with num_threads(2), pytest.raises(RuntimeError, match="column index is out of range"):
            torch.ops.pysparse.csr_spmm(A.crow_indices, col, A.values, list(A.shape), X)


def test_batch_rejects_wrong_rows():
    A, _ = _matrix("csr", 16, 32, torch.float32, seed=7)
    with pytest.raises(ValueError, match=r"X must be \(32, n\) or \(\.\.\., 32, n\), got \(3, 31, 4\)"):
        pysparse.spmm(A, torch.randn(3, 31, 4))
    with pytest.raises(RuntimeError, match="pysparse: dense has 31 rows but the sparse matrix has 32 columns"):
        torch.ops.pysparse.csr_spmm(A.crow_indices, A.col_indices, A.values, list(A.shape), torch.randn(3, 31, 4))


def test_batch_compiles_fullgraph():
    A, W = _matrix("csr", 16, 32, torch.float32, seed=8)
    f = torch.compile(lambda X: pysparse.spmm(A, X) + 1, fullgraph=True)
    X = torch.randn(2, 3, 32, 10)
    torch.testing.assert_close(f(X), (W @ X) + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_wide_operand_split_by_rows_packs_every_panel(fmt):
    # A wide operand with fewer panels than threads is split by rows, each part packing all the
    # panels (2 here) although a wide strip holds only one of them (K * 64 * 4 > 128 KiB).
    A, W = _matrix(fmt, 16, 1024, torch.float32, seed=9)
    X = randn(1024, 128, g=gen(10))
    with num_threads(3):
        _check(A, W, X, torch.float32, f"{fmt} wide, row split")
        _check(A, W, randn(2, 1024, 128, g=gen(11)), torch.float32, f"{fmt} wide batch, row split")
