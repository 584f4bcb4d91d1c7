"""Backward passes of the ops (torch.library.register_autograd), pattern fixed: gradients flow to
the dense operand, the stored values and the bias; the index tensors get none.

CSR (csr_linear y = x A^T + b, csr_spmm Y = A X):

- dX: the transposed product, run by the forward kernels on A^T. A^T's index structure (row
  pointers, column indices and the permutation that takes A's values to A^T's order) is built once
  per matrix version and remembered (`transpose`) in pysparse._checked's memo, keyed by the index
  tensors themselves and their version counters; each backward only gathers the values,
  which change every optimizer step.
- dvalues: the sampled product csr_sddmm, one dot product over the tokens per stored entry, so a
  pruned position never receives a gradient (no leak into the pattern) and the work is that of
  the nonzeros.
- dbias: the sum of the output gradient over the tokens.

BSR, N:M, masked_attention and pruned_ffn have no backward yet (torch then warns that no
autograd kernel is registered, and their SparseLinear values stay buffers).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _checked

_ops = torch.ops.pysparse


def _transpose_now(crow: torch.Tensor, col: torch.Tensor, M: int, K: int):
    nnz = col.numel()
    dev = col.device
    counts = crow.diff().long()
    rows = torch.repeat_interleave(torch.arange(M, device=dev), counts, output_size=nnz)
    c = col.long()
    perm = torch.argsort(c, stable=True)  # row-major order kept within each column: rows ascend
    per_col = torch.zeros(K, dtype=torch.int64, device=dev).scatter_add_(0, c, torch.ones_like(c))
    crow_t = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), per_col.cumsum(0)])
    if crow.dtype == torch.int32:  # int32 row pointers; int16 columns only while M fits them
        col_dtype = torch.int16 if col.dtype == torch.int16 and M <= 2**15 else torch.int32
        return crow_t.to(torch.int32), rows[perm].to(col_dtype), perm
    return crow_t, rows[perm], perm


def transpose(crow: torch.Tensor, col: torch.Tensor, M: int, K: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_t, col_t, perm) of A^T for the CSR pattern (crow, col) of shape (M, K): A^T's values
    are A's values[perm]. Remembered (pysparse._checked's memo) per (crow, col) until either is
    written in place or freed. Under torch.compile or opcheck's tracing (fake and functional
    tensors have no storage to key on) it is computed each time, as a traced graph would."""
    if torch.compiler.is_compiling():
        return _transpose_now(crow, col, M, K)
    try:
        crow.data_ptr(), col.data_ptr()
    except RuntimeError:  # no data pointer: a traced tensor
        return _transpose_now(crow, col, M, K)
    param = ("csr_transpose", int(M), int(K))
    hit = _checked.recalled((crow, col), param)
    if hit is not None:
        return hit[2]
    out = _transpose_now(crow, col, M, K)
    _checked.remember((crow, col), param, out)
    return out


# ---------------------------------------------------------------------------------------------
# csr_linear: y = x A^T + b

def _csr_linear_setup(ctx, inputs, output):
    x, crow, col, values, shape, bias = inputs
    ctx.shape = (shape[0], shape[1])
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, crow, col, values)


def _csr_linear_backward(ctx, grad):
    x, crow, col, values = ctx.saved_tensors
    M, K = ctx.shape
    g = grad.reshape(-1, M)
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        crow_t, col_t, perm = transpose(crow, col, M, K)
        dx = _ops.csr_linear(g, crow_t, col_t, values[perm], [K, M], None).reshape(x.shape)
    if ctx.needs_input_grad[3]:
        # Transposed views, no copies: the op packs them into token panels itself.
        dvalues = _ops.csr_sddmm(crow, col, [M, K], g.t(), x.reshape(-1, K).t())
    if ctx.has_bias and ctx.needs_input_grad[5]:
        dbias = g.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, None, None, dvalues, None, dbias


# ---------------------------------------------------------------------------------------------
# csr_spmm: Y = A X, X (..., K, n)

def _csr_spmm_setup(ctx, inputs, output):
    crow, col, values, shape, dense = inputs
    ctx.shape = (shape[0], shape[1])
    ctx.save_for_backward(crow, col, values, dense)


def _csr_spmm_backward(ctx, grad):
    crow, col, values, dense = ctx.saved_tensors
    M, K = ctx.shape
    ddense = dvalues = None
    if ctx.needs_input_grad[4]:
        crow_t, col_t, perm = transpose(crow, col, M, K)
        ddense = _ops.csr_spmm(crow_t, col_t, values[perm], [K, M], grad)
    if ctx.needs_input_grad[2]:
        # Every batch entry's tokens side by side: a (M, batch * n), b (K, batch * n).
        a = grad.movedim(-2, 0).reshape(M, -1)
        b = dense.movedim(-2, 0).reshape(K, -1)
        dvalues = _ops.csr_sddmm(crow, col, [M, K], a, b)
    return None, None, dvalues, None, ddense


torch.library.register_autograd("pysparse::csr_linear", _csr_linear_backward, setup_context=_csr_linear_setup)
torch.library.register_autograd("pysparse::csr_spmm", _csr_spmm_backward, setup_context=_csr_spmm_setup)

__all__ = ["transpose"]
