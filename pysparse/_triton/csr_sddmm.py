"""The CSR SDDMM op on CUDA: kernels/csr_sddmm.py, registered for pysparse::csr_sddmm."""
from __future__ import annotations

import torch
import triton

from .. import _checked
from ._common import INTERPRET
from .kernels.csr_sddmm import csr_sddmm_kernel


def csr_sddmm(crow: torch.Tensor, col: torch.Tensor, shape, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out[j] = <a[r(j), :], b[col[j], :]> for the stored entries of the CSR pattern (crow, col) of
    `shape` (M, K); a (M, n), b (K, n) of one dtype; out (nnz) in that dtype."""
    if len(shape) != 2:
        raise RuntimeError(f"pysparse: shape must have 2 entries, got {len(shape)}")
    M, K = (int(s) for s in shape)
    if a.dim() != 2 or b.dim() != 2:
        raise RuntimeError(f"pysparse: a and b must be 2-D, got {a.dim()}-D and {b.dim()}-D")
    if a.dtype != b.dtype:
        raise TypeError(f"pysparse: a is {a.dtype} but b is {b.dtype}; they must share a dtype")
    if a.shape[0] != M or b.shape[0] != K or a.shape[1] != b.shape[1]:
        raise RuntimeError(f"pysparse: a must be ({M}, n) and b ({K}, n), got {list(a.shape)} and {list(b.shape)}")
    if crow.dim() != 1 or crow.numel() != M + 1:
        raise RuntimeError(f"pysparse: crow_indices must have rows + 1 = {M + 1} entries, got {crow.numel()}")
    _checked.compressed(crow, col, K, "nonzeros")
    nnz = col.numel()
    out = torch.empty(nnz, dtype=a.dtype, device=a.device)
    if nnz == 0:
        return out
    rows = torch.repeat_interleave(torch.arange(M, device=crow.device), crow.diff().long(), output_size=nnz)
    a, b = a.contiguous(), b.contiguous()
    n = a.shape[1]
    block_j, block_n = (64, 64) if INTERPRET else (32, 64)
    grid = (triton.cdiv(nnz, block_j),)
    csr_sddmm_kernel[grid](rows, col, a, b, out, nnz, n, a.stride(0), b.stride(0), BLOCK_J=block_j, BLOCK_N=block_n)
    return out


@torch.library.register_kernel("pysparse::csr_sddmm", "cuda")
def _csr_sddmm_cuda(crow_indices, col_indices, shape, a, b):
    return csr_sddmm(crow_indices, col_indices, shape, a, b)
