"""The Triton N:M (2:4) linear kernel (pysparse/_triton/kernels/nm_linear.py). Without a GPU it runs under
TRITON_INTERPRET=1 on CPU tensors, in fp32 (the interpreter's bf16 tl.dot is wrong) and with one
large tile per program; on a GPU the same tests run on CUDA tensors."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import SparseNM
from conftest import gen, randn
from references import reference_linear

pytest.importorskip("triton")

_triton = pytest.importorskip("pysparse._triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (8, 16)])
@pytest.mark.parametrize("T", [1, 5, 16, 33])
def test_matches_reference(n, m, T):
    R, K = 80, (200 // m) * m  # K not a multiple of the 64-column tile, R not of 64 rows
    W = pysparse.prune.nm(randn(R, K, g=gen(T)), n, m)
    A = SparseNM.from_dense(W, n, m).to(DEVICE)
    x = randn(T, K, g=gen(T + 1)).to(DEVICE)
    b = randn(R, g=gen(2)).to(DEVICE)
    y = _triton.nm_linear(x, A.values, A.mask, A.shape, n, m, b)
    torch.testing.assert_close(y.cpu().double(), x.cpu().double() @ W.double().T + b.cpu().double(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", pysparse.activations.NAMES)
def test_fused_activation_and_leading_dims(activation):
    W = pysparse.prune.nm(randn(64, 128, g=gen(5)), 2, 4)
    A = SparseNM.from_dense(W).to(DEVICE)
    x = randn(2, 3, 128, g=gen(6)).to(DEVICE)
    y = _triton.nm_linear(x, A.values, A.mask, A.shape, 2, 4, None, activation)
    assert y.shape == (2, 3, 64)
    ref = reference_linear(x.cpu(), W, activation=activation)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input():
    W = pysparse.prune.nm(randn(48, 64, g=gen(7)), 2, 4)
    A = SparseNM.from_dense(W).to(DEVICE)
    x = randn(64, 9, g=gen(8)).to(DEVICE).t()  # (9, 64), stride (1, 9)
    y = _triton.nm_linear(x, A.values, A.mask, A.shape, 2, 4)
    torch.testing.assert_close(y.cpu(), x.cpu() @ W.T, rtol=1e-4, atol=1e-4)


def test_nm_spmm_batch_runs_as_a_linear():
    # nm_spmm's CUDA kernel: A @ X as (X^T @ A^T)^T through nm_linear, batches included
    W = pysparse.prune.nm(randn(48, 64, g=gen(11)), 2, 4)
    A = SparseNM.from_dense(W).to(DEVICE)
    X = randn(2, 64, 9, g=gen(12)).to(DEVICE)
    Y = _triton.nm_spmm(A.values, A.mask, list(A.shape), 2, 4, X)
    assert Y.shape == (2, 48, 9) and Y.is_contiguous()
    torch.testing.assert_close(Y.cpu(), W @ X.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_triton.nm_spmm(A.values, A.mask, list(A.shape), 2, 4, X[0]).cpu(),
                               W @ X[0].cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (dispatch of the op to the kernel)")
def test_linear_dispatches_cuda_tensors_here():
    W = pysparse.prune.nm(randn(256, 512, g=gen(9)), 2, 4).to(torch.bfloat16)
    A = SparseNM.from_dense(W).to("cuda")
    x = randn(4, 512, g=gen(10)).to(torch.bfloat16).cuda()
    y = pysparse.linear(x, A, activation="silu")
    torch.testing.assert_close(y.float().cpu(), F.silu(x.float().cpu() @ W.float().T), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (cuSPARSELt)")
def test_many_tokens_take_cusparselt_and_recompress_after_an_update():
    from pysparse import ops
    W = pysparse.prune.nm(randn(256, 512, g=gen(11)), 2, 4).to(torch.bfloat16)
    A = SparseNM.from_dense(W).to("cuda")
    b = randn(256, g=gen(12)).to(torch.bfloat16).cuda()
    x = randn(2, 50, 512, g=gen(13)).to(torch.bfloat16).cuda()  # 100 tokens, not a multiple of 16
    if not ops.uses_cusparselt(x, A):
        pytest.skip("this torch has no cuSPARSELt")
    ref = lambda: F.gelu(x.float() @ A.to_dense().float().T + b.float())  # noqa: E731
    torch.testing.assert_close(pysparse.linear(x, A, b, activation="gelu").float(), ref(), rtol=2e-2, atol=5e-2)
    A.values.mul_(2)  # in place: the cached compressed weight must be rebuilt
    torch.testing.assert_close(pysparse.linear(x, A, b, activation="gelu").float(), ref(), rtol=2e-2, atol=1e-1)
