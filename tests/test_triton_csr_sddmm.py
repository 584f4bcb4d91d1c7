"""The Triton CSR SDDMM kernel (pysparse/_triton/kernels/csr_sddmm.py), the CUDA side of the CSR
value gradient. Without a GPU it runs under TRITON_INTERPRET=1 on CPU tensors, in fp32."""
from __future__ import annotations

import os

import pytest
import torch

from pysparse import CSR
from conftest import gen, randn, random_sparse

pytest.importorskip("triton")

_triton = pytest.importorskip("pysparse._triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


@pytest.mark.parametrize("M,K,n", [(1, 1, 1), (40, 70, 5), (65, 33, 130)])
def test_matches_reference(M, K, n):
    W = random_sparse(M, K, 0.3, torch.float32, gen(M + n))
    A = CSR.from_dense(W, index_dtype=torch.int32).to(DEVICE)
    a, b = randn(M, n, g=gen(1)).to(DEVICE), randn(K, n, g=gen(2)).to(DEVICE)
    out = _triton.csr_sddmm(A.crow_indices, A.col_indices, [M, K], a, b)
    ref = (a.cpu().double() @ b.cpu().double().t())[W != 0]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)
    cpu = torch.ops.pysparse.csr_sddmm(A.crow_indices.cpu(), A.col_indices.cpu(), [M, K], a.cpu(), b.cpu())
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_bad_input_raises_the_cpu_sentences():
    W = random_sparse(5, 6, 0.5, torch.float32, gen(0))
    A = CSR.from_dense(W, index_dtype=torch.int32).to(DEVICE)
    col = A.col_indices.clone()
    col[0] = 6
    a, b = torch.randn(5, 3, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="out of range"):
        _triton.csr_sddmm(A.crow_indices, col, [5, 6], a, b)
    with pytest.raises(RuntimeError, match=r"a must be \(5, n\)"):
        _triton.csr_sddmm(A.crow_indices, A.col_indices, [5, 6], a[:4], b)
    with pytest.raises(TypeError, match="share a dtype"):
        _triton.csr_sddmm(A.crow_indices, A.col_indices, [5, 6], a, b.double())
