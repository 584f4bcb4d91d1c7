"""BSR x dense on CUDA: kernels/bsr_spmm.py, registered for pysparse::bsr_spmm and
pysparse::bsr_linear."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from .. import _checked
from ._common import INTERPRET
from .kernels.bsr_spmm import bsr_spmm_kernel, configs as bsr_configs

# N (the output columns, tokens in the linear layout) is in the key because the best BLOCK_N
# follows it; the block size because every block size is its own kernel.
_bsr_autotuned = triton.autotune(configs=bsr_configs(), key=["M", "N", "K", "BH", "BW"])(bsr_spmm_kernel)


def _bsr_check(fn: str, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape,
               x: torch.Tensor, what: str):
    """(M, K, bh, bw) after checking A's tensors against shape and x's dtype."""
    if len(shape) != 2:
        raise ValueError(f"{fn}: shape must be (M, K), got {tuple(shape)}")
    M, K = (int(s) for s in shape)
    if values.dim() != 3 or crow.dim() != 1 or col.dim() != 1:
        raise ValueError(f"{fn}: crow_indices and col_indices must be 1-D and values 3-D (nnzb, bh, bw), "
                         f"got {crow.dim()}-D, {col.dim()}-D and {values.dim()}-D")
    bh, bw = values.shape[1], values.shape[2]
    if bh <= 0 or bw <= 0 or M % bh or K % bw:
        raise ValueError(f"{fn}: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{fn}: indices must be int32 or int64, got {crow.dtype} and {col.dtype}")
    if crow.numel() != M // bh + 1 or col.numel() != values.shape[0]:
        raise ValueError(f"{fn}: crow_indices must have {M // bh + 1} entries and col_indices one per "
                         f"block ({values.shape[0]}), got {crow.numel()} and {col.numel()}")
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{fn}: values must be float32, bfloat16 or float16, got {values.dtype}")
    if x.dtype != values.dtype:
        raise ValueError(f"{fn}: {what} is {x.dtype} but the values are {values.dtype}")
    return M, K, bh, bw


def _bsr_launch(crow, col, values, b, bias, out, M, N, K, b_strides, out_strides, block_n):
    """out[i][M, N] = A @ b[i] (+ bias) for each matrix i of a batch, b and out addressed as
    (matrix, rows, cols) through the given strides (3 each); one launch per 65535 matrices (the
    grid's third axis)."""
    batch = out.shape[0]
    bh, bw = values.shape[1], values.shape[2]
    _checked.compressed(crow, col, K // bw, "blocks")
    if out.numel() == 0:
        return
    has_bias = bias is not None
    head = (crow.contiguous(), col.contiguous(), values.contiguous())
    bias = bias.contiguous() if has_bias else values  # any pointer: never read
    meta = dict(BH=bh, BW=bw, PH=max(16, triton.next_power_of_2(bh)), PW=max(16, triton.next_power_of_2(bw)),
                HAS_BIAS=has_bias,
                # fp32 means fp32: tl.dot would otherwise round its inputs to tf32.
                DOT_PRECISION="ieee" if values.dtype == torch.float32 else "tf32")
    if block_n is None and INTERPRET:
        block_n = min(128, max(16, triton.next_power_of_2(N)))
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"bsr_spmm: block_n must be a power of two >= 16, got {block_n}")
    for i0 in range(0, batch, 65535):
        nb = min(65535, batch - i0)
        args = (*head, b[i0:], bias, out[i0:], M, N, K, values.shape[0], *b_strides, *out_strides)
        if block_n is not None:
            bsr_spmm_kernel[(M // bh, triton.cdiv(N, block_n), nb)](*args, **meta, BLOCK_N=block_n, num_warps=4)
        else:
            grid = lambda c: (M // bh, triton.cdiv(N, c["BLOCK_N"]), nb)  # noqa: E731
            _bsr_autotuned[grid](*args, **meta)


def bsr_spmm(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape,
             dense: torch.Tensor, *, block_n: Optional[int] = None) -> torch.Tensor:
    """A @ dense for A (M, K) in BSR form (values (nnzb, bh, bw)); dense (K, n), any strides, or a
    batch (..., K, n) -> (..., M, n) in values' dtype, accumulated in fp32.

    A batch runs in one launch (the grid's third axis). `block_n` fixes the output-column tile (a power of two
    >= 16) instead of autotuning; the interpreter always uses one large tile.
    """
    if dense.dim() < 2:
        raise ValueError(f"bsr_spmm: dense must be (K, n) or a batch (..., K, n), got {dense.dim()}-D")
    M, K, _, _ = _bsr_check("bsr_spmm", crow_indices, col_indices, values, shape, dense, "dense")
    if dense.shape[-2] != K:
        raise ValueError(f"bsr_spmm: dense has {dense.shape[-2]} rows but A has {K} columns")
    n, batch = dense.shape[-1], math.prod(dense.shape[:-2])
    out = torch.empty((*dense.shape[:-2], M, n), dtype=values.dtype, device=values.device)
    b3, o3 = dense.reshape(batch, K, n), out.view(batch, M, n)
    _bsr_launch(crow_indices, col_indices, values, b3, None, o3, M, n, K, b3.stride(), o3.stride(), block_n)
    return out


def bsr_linear(input: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, shape, bias: Optional[torch.Tensor] = None, *,
               block_n: Optional[int] = None) -> torch.Tensor:
    """input @ A^T + bias for A (M, K) in BSR form; input (..., K) -> (..., M).

    Runs as out^T = A @ input^T: the kernel reads input and writes out through swapped strides,
    so nothing is transposed in memory. `block_n` (a tile of tokens) is bsr_spmm's.
    """
    if input.dim() < 1:
        raise ValueError("bsr_linear: input must have at least one dimension (..., K)")
    M, K, _, _ = _bsr_check("bsr_linear", crow_indices, col_indices, values, shape, input, "input")
    if input.shape[-1] != K:
        raise ValueError(f"bsr_linear: input ends in {input.shape[-1]} features but A has {K} columns")
    if bias is not None:
        if bias.dtype != values.dtype:
            raise ValueError(f"bsr_linear: bias is {bias.dtype} but the values are {values.dtype}")
        if tuple(bias.shape) != (M,):
            raise ValueError(f"bsr_linear: bias must have shape ({M},), got {tuple(bias.shape)}")
    x2 = input.reshape(-1, K)
    T = x2.shape[0]
    out = torch.empty((T, M), dtype=values.dtype, device=values.device)
    _bsr_launch(crow_indices, col_indices, values, x2[None], bias, out[None], M, T, K,
                (0, x2.stride(1), x2.stride(0)), (0, out.stride(1), out.stride(0)), block_n)
    return out.reshape(*input.shape[:-1], M)


@torch.library.register_kernel("pysparse::bsr_spmm", "cuda")
def _bsr_spmm_cuda(crow_indices, col_indices, values, shape, dense):
    return bsr_spmm(crow_indices, col_indices, values, shape, dense)


@torch.library.register_kernel("pysparse::bsr_linear", "cuda")
def _bsr_linear_cuda(input, crow_indices, col_indices, values, shape, bias):
    return bsr_linear(input, crow_indices, col_indices, values, shape, bias)

