"""Launchers for the Triton kernels in triton_kernels/ (GPU path; runs on CPU tensors under
TRITON_INTERPRET=1, which is how CI tests it).

Importing this module needs triton. On CUDA, pysparse.linear sends N:M weights here (the CUDA
kernel registered for pysparse::nm_linear below).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from triton_kernels.nm_linear import configs, nm_linear_kernel

_ACT = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_autotuned = triton.autotune(configs=configs(), key=["T", "R", "K", "N", "M"])(nm_linear_kernel)


def nm_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, shape, n: int, m: int,
              bias: Optional[torch.Tensor] = None, activation: str = "none",
              block: Optional[dict] = None) -> torch.Tensor:
    """act(x @ A^T + bias) for A = (values, mask) in N:M form; x (..., K) -> (..., R).

    `block` fixes the tile sizes (BLOCK_T/BLOCK_R/BLOCK_K, num_warps) instead of autotuning; the
    interpreter always uses one large tile (its programs run one after another).
    """
    R, K = (int(s) for s in shape)
    x2 = x.reshape(-1, K)
    T = x2.shape[0]
    y = torch.empty((T, R), dtype=x.dtype, device=x.device)
    args = (x2, values, mask, bias if bias is not None else values, y, T, R, K,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1))
    meta = dict(N=n, M=m, HAS_BIAS=bias is not None, ACT=_ACT[activation])
    if block is None and _INTERPRET:
        block = {"BLOCK_T": 16, "BLOCK_R": 64, "BLOCK_K": 64}
    if block is not None:
        grid = (triton.cdiv(R, block["BLOCK_R"]), triton.cdiv(T, block["BLOCK_T"]))
        nm_linear_kernel[grid](*args, **meta, **block)
    else:
        grid = lambda c: (triton.cdiv(R, c["BLOCK_R"]), triton.cdiv(T, c["BLOCK_T"]))
        _autotuned[grid](*args, **meta)
    return y.reshape(*x.shape[:-1], R)


@torch.library.register_kernel("pysparse::nm_linear", "cuda")
def _nm_linear_cuda(input, values, mask, shape, n, m, bias, activation="none"):
    return nm_linear(input, values.contiguous(), mask.contiguous(), shape, n, m, bias, activation)


@torch.library.register_kernel("pysparse::nm_spmm", "cuda")
def _nm_spmm_cuda(values, mask, shape, n, m, dense):
    return nm_linear(dense.t(), values.contiguous(), mask.contiguous(), shape, n, m).t()
