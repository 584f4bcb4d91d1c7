"""The N:M (2:4) linear op on CUDA: kernels/nm_linear.py, registered for pysparse::nm_linear and
pysparse::nm_spmm."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import _checked
from ._common import ACT_CODES, INTERPRET
from .kernels.nm_linear import configs, nm_linear_kernel

_autotuned = triton.autotune(configs=configs(), key=["T", "R", "K", "N", "M"])(nm_linear_kernel)

def _nm_operand(values: torch.Tensor, mask: torch.Tensor, shape, n: int, m: int):
    """(R, K) after the checks the CPU launcher makes of an N:M operand (csrc/include/checks.h),
    with its sentences."""
    if m not in (4, 8, 16):
        raise RuntimeError(f"pysparse: N:M needs m in (4, 8, 16), got {m}")
    if not 0 < n < m:
        raise RuntimeError(f"pysparse: N:M needs 0 < n < m, got {n}:{m}")
    for name, t in (("N:M values", values), ("N:M mask", mask)):
        if t.dim() != 2:
            raise RuntimeError(f"pysparse: {name} must be 2-D, got shape {list(t.shape)}")
    if len(shape) != 2:
        raise RuntimeError(f"pysparse: shape must have 2 entries, got {len(shape)}")
    R, K = (int(s) for s in shape)
    if R < 0 or K < 0 or K % m:
        raise RuntimeError(f"pysparse: N:M shape ({R}, {K}) needs non-negative sizes and columns divisible by m = {m}")
    if tuple(values.shape) != (R, K // m * n):
        raise RuntimeError(f"pysparse: N:M values must have shape ({R}, {K // m * n}), got {list(values.shape)}")
    if mask.dtype != torch.uint8:
        raise TypeError(f"pysparse: N:M mask must be uint8, got {mask.dtype}")
    if tuple(mask.shape) != (R, (K + 7) // 8):
        raise RuntimeError(f"pysparse: N:M mask must have shape ({R}, {(K + 7) // 8}), got {list(mask.shape)}")
    return R, K


def nm_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, shape, n: int, m: int,
              bias: Optional[torch.Tensor] = None, activation: str = "none",
              block: Optional[dict] = None) -> torch.Tensor:
    """act(x @ A^T + bias) for A = (values, mask) in N:M form; x (..., K) -> (..., R).

    `block` fixes the tile sizes (BLOCK_T/BLOCK_R/BLOCK_K, num_warps) instead of autotuning; the
    interpreter always uses one large tile (its programs run one after another).
    """
    R, K = _nm_operand(values, mask, shape, n, m)
    _checked.nm_mask(mask, R, K, n, m)
    values, mask = values.contiguous(), mask.contiguous()
    x2 = x.reshape(-1, K)
    T = x2.shape[0]
    y = torch.empty((T, R), dtype=x.dtype, device=x.device)
    args = (x2, values, mask, bias if bias is not None else values, y, T, R, K,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1))
    meta = dict(N=n, M=m, HAS_BIAS=bias is not None, ACT=ACT_CODES[activation])
    if block is None and INTERPRET:
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
    return nm_linear(input, values, mask, shape, n, m, bias, activation)


def nm_spmm(values, mask, shape, n, m, dense):
    """A @ dense for A in N:M form; dense (K, n) or a batch (..., K, n) -> (..., M, n), computed
    as (dense^T @ A^T)^T by nm_linear and made contiguous (the layout the fake implementation
    and the CPU kernel give)."""
    if dense.dim() < 2:
        raise ValueError(f"nm_spmm: dense must be (K, n) or a batch (..., K, n), got {dense.dim()}-D")
    y = nm_linear(dense.transpose(-1, -2), values, mask, shape, n, m)
    return y.transpose(-1, -2).contiguous()


@torch.library.register_kernel("pysparse::nm_spmm", "cuda")
def _nm_spmm_cuda(values, mask, shape, n, m, dense):
    return nm_spmm(values, mask, shape, n, m, dense)

