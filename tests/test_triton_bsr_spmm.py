"""The Triton BSR x dense kernel (pysparse/_triton/kernels/bsr_spmm.py) through its launchers
pysparse._triton.bsr_spmm / bsr_linear. Without a GPU it runs under TRITON_INTERPRET=1 on CPU
tensors, in fp32 (the interpreter's bf16 tl.dot is wrong) and with one large tile per program; on
a GPU the same tests run on CUDA tensors, plus the dispatch of pysparse.spmm/linear to it."""
from __future__ import annotations

import os

import pytest
import torch

import pysparse
from conftest import TOL, gen, randn

pytest.importorskip("triton")

_triton = pytest.importorskip("pysparse._triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

BLOCKSIZES = [(16, 16), (32, 32), (8, 8), (16, 32), (4, 16)]  # (8, 8), (4, 16): padded to 16
M, K = 96, 128
# fp32 with fp32 accumulation ("ieee" tl.dot on a GPU): a sum of at most K = 128 products has a
# rounding error within about K * 2**-24 ~ 7.6e-6 of sum |a| |x|, plus one rounding of the output,
# so 1e-5 relative to that sum bounds it for any summation order (tiles, blocks, tensor cores).
RTOL = TOL[torch.float32].acc


def bsr(W: torch.Tensor, blocksize, index_dtype=None) -> pysparse.BSR:
    return pysparse.BSR.from_dense(W, blocksize=blocksize, index_dtype=index_dtype).to(DEVICE)


def pruned(blocksize, seed: int, sparsity: float = 0.6) -> torch.Tensor:
    """(M, K) with 60% of its blocks zero and its first and a middle block row empty."""
    bh, _ = blocksize
    W = pysparse.prune.blocks(randn(M, K, g=gen(seed)), sparsity, blocksize=blocksize)
    mid = M // bh // 2 * bh
    W[:bh] = 0
    W[mid:mid + bh] = 0
    return W


def check(out: torch.Tensor, A: torch.Tensor, X: torch.Tensor, bias=None):
    """out against A @ X (+ bias) in fp64, with the error bound scaled by |A| @ |X|."""
    A, X = A.double(), X.cpu().double()
    ref = A @ X
    scale = A.abs() @ X.abs()
    if bias is not None:
        ref = ref + bias.cpu().double()[:, None]
        scale = scale + bias.cpu().double().abs()[:, None]
    out = out.cpu().double()
    assert out.shape == ref.shape
    err = (out - ref).abs()
    bound = RTOL * scale + 1e-30
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, max bound {bound.max().item():.3g}"


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [1, 7, 33, 64])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_spmm_matches_reference(blocksize, n, index_dtype):
    W = pruned(blocksize, seed=n)
    A = bsr(W, blocksize, index_dtype)
    assert A.crow_indices.dtype == index_dtype and A.values.shape[0] > 0
    X = randn(K, n, g=gen(n + 1)).to(DEVICE)
    y = _triton.bsr_spmm(A.crow_indices, A.col_indices, A.values, A.shape, X)
    assert y.dtype == torch.float32 and y.device.type == DEVICE
    check(y, W, X)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("blocksize", [(16, 16), (8, 8)])
def test_spmm_non_contiguous_dense(blocksize, layout):
    W = pruned(blocksize, seed=3)
    A = bsr(W, blocksize)
    if layout == "transposed":
        X = randn(33, K, g=gen(4)).to(DEVICE).t()  # (K, 33), strides (1, K)
    else:
        X = randn(K, 66, g=gen(4)).to(DEVICE)[:, ::2]  # (K, 33), strides (66, 2)
    assert not X.is_contiguous()
    check(_triton.bsr_spmm(A.crow_indices, A.col_indices, A.values, A.shape, X), W, X)


def test_spmm_several_column_tiles():
    W = pruned((16, 16), seed=5)
    A = bsr(W, (16, 16))
    X = randn(K, 70, g=gen(6)).to(DEVICE)  # 16-wide tiles: five, the last one partly masked
    check(_triton.bsr_spmm(A.crow_indices, A.col_indices, A.values, A.shape, X, block_n=16), W, X)


def test_spmm_batch_of_dense_operands():
    # (..., K, n) -> (..., M, n), one launch per matrix, strided batches included
    W = pruned((16, 16), seed=22)
    A = bsr(W, (16, 16))
    args = (A.crow_indices, A.col_indices, A.values, A.shape)
    X = randn(2, 3, K, 20, g=gen(23)).to(DEVICE)
    Y = _triton.bsr_spmm(*args, X)
    assert Y.shape == (2, 3, M, 20)
    for i in range(2):
        for j in range(3):
            check(Y[i, j], W, X[i, j])
    Xs = randn(3, 2 * K, 20, g=gen(24)).to(DEVICE)[:, K:]  # a channel slice
    Ys = _triton.bsr_spmm(*args, Xs)
    for i in range(3):
        check(Ys[i], W, Xs[i])
    assert _triton.bsr_spmm(*args, torch.zeros(0, K, 4, device=DEVICE)).shape == (0, M, 4)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("blocksize", [(32, 32), (8, 8), (4, 16)])
def test_linear_leading_dims_and_bias(blocksize, with_bias):
    W = pruned(blocksize, seed=7)
    A = bsr(W, blocksize)
    x = randn(2, 3, 5, K, g=gen(8)).to(DEVICE)
    b = randn(M, g=gen(9)).to(DEVICE) if with_bias else None
    y = _triton.bsr_linear(x, A.crow_indices, A.col_indices, A.values, A.shape, b)
    assert y.shape == (2, 3, 5, M)
    check(y.reshape(-1, M).t(), W, x.reshape(-1, K).t(), b)


def test_linear_non_contiguous_input():
    W = pruned((16, 32), seed=10)
    A = bsr(W, (16, 32))
    x = randn(K, 9, g=gen(11)).to(DEVICE).t()  # (9, K), strides (1, 9)
    y = _triton.bsr_linear(x, A.crow_indices, A.col_indices, A.values, A.shape)
    check(y.t(), W, x.t())


def test_no_blocks_at_all():
    W = torch.zeros(M, K)
    A = bsr(W, (16, 16))
    assert A.values.shape[0] == 0
    X = randn(K, 7, g=gen(12)).to(DEVICE)
    y = _triton.bsr_spmm(A.crow_indices, A.col_indices, A.values, A.shape, X)
    assert bool((y == 0).all())
    b = randn(M, g=gen(13)).to(DEVICE)
    x = randn(4, K, g=gen(14)).to(DEVICE)
    y = _triton.bsr_linear(x, A.crow_indices, A.col_indices, A.values, A.shape, b)
    assert torch.equal(y, b.expand(4, M))


def test_empty_operands():
    A = bsr(pruned((16, 16), seed=15), (16, 16))
    y = _triton.bsr_spmm(A.crow_indices, A.col_indices, A.values, A.shape, torch.zeros(K, 0, device=DEVICE))
    assert y.shape == (M, 0)
    y = _triton.bsr_linear(torch.zeros(0, 2, K, device=DEVICE), A.crow_indices, A.col_indices, A.values, A.shape)
    assert y.shape == (0, 2, M)


def test_bad_inputs_say_what_is_wrong():
    A = bsr(pruned((16, 16), seed=16), (16, 16))
    args = (A.crow_indices, A.col_indices, A.values, A.shape)
    X = randn(K, 4, g=gen(17)).to(DEVICE)
    with pytest.raises(ValueError, match=r"dense must be \(K, n\) or a batch"):
        _triton.bsr_spmm(*args, X[:, 0])
    with pytest.raises(ValueError, match="dense has 64 rows"):
        _triton.bsr_spmm(*args, X[:64])
    with pytest.raises(ValueError, match="dense is torch.float64"):
        _triton.bsr_spmm(*args, X.double())
    with pytest.raises(ValueError, match="not divisible by the block size"):
        _triton.bsr_spmm(A.crow_indices, A.col_indices, A.values, (M, K + 8), X)
    with pytest.raises(ValueError, match="crow_indices must have 7 entries"):
        _triton.bsr_spmm(A.crow_indices[:-1], A.col_indices, A.values, A.shape, X)
    with pytest.raises(ValueError, match="ends in 64 features"):
        _triton.bsr_linear(X.t()[:, :64], *args)
    with pytest.raises(ValueError, match="bias must have shape"):
        _triton.bsr_linear(X.t(), *args, torch.zeros(M + 1, device=DEVICE))
    with pytest.raises(ValueError, match="bias is torch.float16"):
        _triton.bsr_linear(X.t(), *args, torch.zeros(M, device=DEVICE, dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (dispatch of the ops to the kernel)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_dispatch_cuda_tensors_here(dtype):
    W = pysparse.prune.blocks(randn(256, 512, g=gen(18)), 0.75, blocksize=(32, 32)).to(dtype)
    A = pysparse.BSR.from_dense(W.cuda(), blocksize=(32, 32))
    x = randn(3, 5, 512, g=gen(19)).to(dtype).cuda()
    b = randn(256, g=gen(20)).to(dtype).cuda()
    ref = x.float() @ W.float().cuda().T + b.float()
    y = pysparse.linear(x, A, b)
    assert y.dtype == dtype and y.shape == (3, 5, 256)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)
    X = randn(512, 40, g=gen(21)).to(dtype).cuda()
    torch.testing.assert_close(pysparse.spmm(A, X).float(), W.float().cuda() @ X.float(), rtol=2e-2, atol=5e-2)
    Xb = randn(3, 512, 40, g=gen(22)).to(dtype).cuda()
    torch.testing.assert_close(pysparse.spmm(A, Xb).float(), W.float().cuda() @ Xb.float(), rtol=2e-2, atol=5e-2)
