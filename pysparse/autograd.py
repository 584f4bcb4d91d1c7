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

BSR (bsr_linear, bsr_spmm; values (nnzb, bh, bw)):

- dX: the BSR product with A^T: the block pattern transposed (remembered as for CSR) and each
  gathered block transposed, (nnzb, bw, bh).
- dvalues: one (bh x T) @ (T x bw) product per stored block, batched (torch.bmm, in chunks of
  blocks whose gathered operands stay under _BMM_BYTES): dense blocks are what dense GEMM kernels
  do best, and the work is that of the stored blocks only.

N:M (nm_linear, nm_spmm; values (M, K/m*n)): the stored positions in row-major order are a CSR
pattern with K/m*n entries per row whose values are N:M's values as they are, so the gradients
run on the CSR kernels: the pattern (crow, col) is built from the bitmap once per mask version
and remembered. nm_linear's fused activation is differentiated at the pre-activation, which the
backward recomputes (one more forward product) except for relu, whose derivative the output
gives.

pruned_ffn: the intermediate is recomputed with the per-format ops (like activation
checkpointing), then each product's backward above runs; the activation, the gate and the
threshold (a fixed mask: zeroed entries get no gradient) are differentiated in torch.

activation: torch's derivative at the input (relu's from the output).

masked_attention: over the active tiles only, with the softmax statistics recomputed: the
fused CPU kernel masked_attention_backward, or batched GEMMs on gathered tiles on other devices
(pysparse/_attention_grad.py dispatches); gradients for q, k and v (the
block and element masks, the band, key lengths and head_mask are constants; so is the additive
bias: asking for its gradient is refused).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from . import _checked, activations
from ._attention_grad import masked_attention_backward
from .formats.nm import unpack_bits
from .ops import linear_tensors

_ops = torch.ops.pysparse
_aten = torch.ops.aten


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t (..., cols) as (tokens, cols): reshape(-1, cols) is ambiguous when cols is 0."""
    return t.reshape(t.shape[:-1].numel(), cols)


def _side_by_side(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A batch (..., rows, n) as (rows, batch * n): every batch entry's tokens side by side."""
    t = t.movedim(-2, 0)
    return t.reshape(rows, t.shape[1:].numel())


def memoized(tensors: Tuple[torch.Tensor, ...], param, build: Callable[[], tuple]) -> tuple:
    """build()'s result, remembered in pysparse._checked's memo per (tensors, param) until one of
    the tensors is written in place or freed; under tracing computed each time, as a traced graph
    would."""
    if _checked.traced(*tensors):
        return build()
    hit = _checked.recalled(tensors, param)
    if hit is not None:
        return hit[2]
    out = build()
    _checked.remember(tensors, param, out)
    return out


def _transpose_now(crow: torch.Tensor, col: torch.Tensor, M: int, K: int):
    nnz = col.numel()
    dev = col.device
    # Index tensors as narrow as the sizes allow (the result is remembered for the layer's life).
    small = crow.dtype == torch.int32
    idx = torch.int32 if small else torch.int64
    rows = torch.repeat_interleave(torch.arange(M, device=dev, dtype=idx), crow.diff().to(idx), output_size=nnz)
    perm = torch.argsort(col, stable=True)  # row-major order kept within each column: rows ascend
    per_col = torch.bincount(col.long(), minlength=K) if nnz else torch.zeros(K, dtype=torch.int64, device=dev)
    crow_t = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), per_col.cumsum(0)])
    if small:  # int32 row pointers; int16 columns only while M fits them
        col_dtype = torch.int16 if col.dtype == torch.int16 and M <= 2**15 else torch.int32
        return crow_t.to(torch.int32), rows[perm].to(col_dtype), perm.to(torch.int32)
    return crow_t, rows[perm], perm


def transpose(crow: torch.Tensor, col: torch.Tensor, M: int, K: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow_t, col_t, perm) of A^T for the CSR pattern (crow, col) of shape (M, K) (for BSR: of
    its block pattern, in blocks): A^T's values are A's values[perm]. Remembered per (crow, col)."""
    return memoized((crow, col), ("csr_transpose", int(M), int(K)), lambda: _transpose_now(crow, col, M, K))


# Output positions per block of transpose_order: 2^15 (128 KiB of fp32) stay in L2 while the
# block's values are read in ascending runs.
_ORDER_BLOCK = 15


def transpose_order(crow: torch.Tensor, col: torch.Tensor, M: int, K: int) -> Optional[torch.Tensor]:
    """(2, nnz) int32 [output position; value position] for csr_transpose_values: A^T's values as
    values[perm] (``transpose``), visited a block of 2^15 output positions at a time, sorted by
    value position within a block. None where nnz does not fit int32. Remembered per (crow, col)."""
    def build():
        perm = transpose(crow, col, M, K)[2]
        n = perm.numel()
        if n >= 2**31 - 1:
            return (None,)
        order = torch.empty((2, n), dtype=torch.int32, device=perm.device)
        step = 1 << _ORDER_BLOCK
        for b0 in range(0, n, step):  # a block at a time: no temporaries the size of the matrix
            src, at = torch.sort(perm[b0:b0 + step])
            order[0, b0:b0 + step] = at + b0
            order[1, b0:b0 + step] = src
        return (order,)
    return memoized((crow, col), ("csr_transpose_order", int(M), int(K)), build)[0]


def transposed_values(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """A^T's values (1-D, in transpose's order) of the CSR or N:M matrix A (M, K) whose values in
    CSR order are ``values``."""
    order = transpose_order(crow, col, M, K)
    if order is None:
        return values[transpose(crow, col, M, K)[2]]
    return _ops.csr_transpose_values(values, order)


# ---------------------------------------------------------------------------------------------
# BSR blocks: the transposed matrix and the value gradient

# Largest gathered operand pair of one batched block product (bytes): bounds the backward's
# scratch memory whatever the number of blocks.
_BMM_BYTES = 32 * 2**20


def _bsr_transposed(crow, col, values, M: int, K: int):
    """(crow_t, col_t, values_t) of A^T for the BSR matrix A (M, K)."""
    bh, bw = values.shape[1], values.shape[2]
    crow_t, col_t, perm = transpose(crow, col, M // bh, K // bw)
    return crow_t, col_t, values[perm].transpose(1, 2).contiguous()


def _bsr_sddmm(crow, col, bh: int, bw: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(nnzb, bh, bw): block p at block (I, J) gets a[I rows] @ b[J rows]^T, a (M, T), b (K, T)."""
    M, T = a.shape
    K = b.shape[0]
    nnzb = col.numel()
    rows = memoized((crow,), ("bsr_block_rows", int(nnzb)),
                     lambda: (torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                                      crow.diff().long(), output_size=nnzb),))[0]
    ab = a.contiguous().view(M // bh, bh, T)
    bb = b.t().contiguous().view(T, K // bw, bw).transpose(0, 1).contiguous()  # (Kb, T, bw)
    step = max(1, _BMM_BYTES // max(1, T * (bh + bw) * a.element_size()))
    c = col.long()
    parts = [torch.bmm(ab.index_select(0, rows[p0:p0 + step]), bb.index_select(0, c[p0:p0 + step]))
             for p0 in range(0, nnzb, step)]
    if not parts:
        return a.new_empty((0, bh, bw))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# CSR and BSR: *_linear (y = x A^T + b) and *_spmm (Y = A X, X (..., K, n)), one backward each

def _csr_transposed(crow, col, values, M: int, K: int):
    crow_t, col_t, _ = transpose(crow, col, M, K)
    return crow_t, col_t, transposed_values(crow, col, values, M, K)


def _csr_dvalues(crow, col, values, a, b):
    # a (M, T), b (K, T) may be transposed views: the op packs them into token panels itself
    return _ops.csr_sddmm(crow, col, [a.shape[0], b.shape[0]], a, b)


def _bsr_dvalues(crow, col, values, a, b):
    return _bsr_sddmm(crow, col, values.shape[1], values.shape[2], a, b)


# kind -> (A^T's (crow, col, values), dvalues from (M, T) and (K, T) operands, linear op, spmm op)
_COMPRESSED = {
    "csr": (_csr_transposed, _csr_dvalues, _ops.csr_linear, _ops.csr_spmm),
    "bsr": (_bsr_transposed, _bsr_dvalues, _ops.bsr_linear, _ops.bsr_spmm),
}


def _compressed_linear_grads(kind: str, crow, col, values, M: int, K: int, x2, g, need_x: bool, need_v: bool):
    """(dx, dvalues) of y = x A^T for x (T, K), g (T, M)."""
    transposed, dvalues_of, linear, _ = _COMPRESSED[kind]
    dx = linear(g, *transposed(crow, col, values, M, K), [K, M], None) if need_x else None
    dvalues = dvalues_of(crow, col, values, g.t(), x2.t()) if need_v else None
    return dx, dvalues


def _linear_setup(ctx, inputs, output):
    x, crow, col, values, shape, bias = inputs
    ctx.shape = (shape[0], shape[1])
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, crow, col, values)


def _linear_backward(kind: str):
    def backward(ctx, grad):
        x, crow, col, values = ctx.saved_tensors
        M, K = ctx.shape
        g = _rows(grad, M)
        need = ctx.needs_input_grad
        dx, dvalues = _compressed_linear_grads(kind, crow, col, values, M, K, _rows(x, K), g, need[0], need[3])
        dbias = g.sum(0, dtype=torch.float32).to(grad.dtype) if ctx.has_bias and need[5] else None
        return None if dx is None else dx.reshape(x.shape), None, None, dvalues, None, dbias
    return backward


def _spmm_setup(ctx, inputs, output):
    crow, col, values, shape, dense = inputs
    ctx.shape = (shape[0], shape[1])
    ctx.save_for_backward(crow, col, values, dense)


def _spmm_backward(kind: str):
    def backward(ctx, grad):
        crow, col, values, dense = ctx.saved_tensors
        M, K = ctx.shape
        transposed, dvalues_of, _, spmm = _COMPRESSED[kind]
        ddense = dvalues = None
        if ctx.needs_input_grad[4]:
            ddense = spmm(*transposed(crow, col, values, M, K), [K, M], grad)
        if ctx.needs_input_grad[2]:
            # Every batch entry's tokens side by side: a (M, batch * n), b (K, batch * n).
            dvalues = dvalues_of(crow, col, values, _side_by_side(grad, M),
                                 _side_by_side(dense, K))
        return None, None, dvalues, None, ddense
    return backward


# ---------------------------------------------------------------------------------------------
# N:M: nm_linear (y = act(x A^T + b)) and nm_spmm (Y = A X), on the CSR kernels

def _nm_pattern_now(mask: torch.Tensor, M: int, K: int, per_row: int):
    kept = unpack_bits(mask, K)
    if not _checked.traced(mask):
        marked = int(kept.sum())
        if marked != M * per_row:
            raise ValueError(f"pysparse: the N:M mask marks {marked} positions but the values hold {M * per_row}; "
                             f"the mask was changed after the forward")
    # The kept columns of each row in ascending order, with static shapes (traceable): a stable
    # sort puts the row's kept positions first.
    col = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :per_row].reshape(-1)
    big = M * per_row >= 2**31
    crow = torch.arange(M + 1, device=mask.device, dtype=torch.int64 if big else torch.int32) * per_row
    return crow, col.to(torch.int16 if K <= 2**15 and not big else (torch.int64 if big else torch.int32))


def nm_pattern(mask: torch.Tensor, M: int, K: int, n: int, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(crow, col): the CSR pattern of an N:M matrix (M, K) given by its bitmap, whose values in
    CSR order are the N:M values as stored. Remembered per mask."""
    return memoized((mask,), ("nm_pattern", int(M), int(K), int(n), int(m)),
                     lambda: _nm_pattern_now(mask, M, K, K // m * n))


def _nm_grads(values, mask, M, K, n, m, g_rows, x_rows, need_x, need_v, dx_op):
    """dX (by dx_op on A^T) and dvalues of an N:M product; g_rows (M, T) / x_rows (K, T) are the
    output gradient and the dense operand with the tokens along dim 1."""
    crow, col = nm_pattern(mask, M, K, n, m)
    dx = dvalues = None
    if need_x:
        crow_t, col_t, _ = transpose(crow, col, M, K)
        dx = dx_op(crow_t, col_t, transposed_values(crow, col, values.reshape(-1), M, K))
    if need_v:
        dvalues = _ops.csr_sddmm(crow, col, [M, K], g_rows, x_rows).view(values.shape)
    return dx, dvalues


def _activation_backward(activation: str, grad, out, pre: Callable[[], torch.Tensor]):
    """The gradient at the pre-activation z of out = act(z): relu reads it off the output; gelu,
    gelu_tanh and silu need z, which pre() gives (recomputed only for them)."""
    if activation == "none":
        return grad
    if activation == "relu":
        return _aten.threshold_backward(grad, out, 0)
    if activation == "silu":
        return _aten.silu_backward(grad, pre())
    return _aten.gelu_backward(grad, pre(), approximate="tanh" if activation == "gelu_tanh" else "none")


def _activation_setup(ctx, inputs, output):
    x, ctx.activation = inputs
    ctx.save_for_backward(x, output if ctx.activation == "relu" else None)


def _activation_op_backward(ctx, grad):
    x, out = ctx.saved_tensors
    return _activation_backward(ctx.activation, grad, out, lambda: x), None


torch.library.register_autograd("pysparse::activation", _activation_op_backward, setup_context=_activation_setup)


def _nm_linear_setup(ctx, inputs, output):
    x, values, mask, shape, n, m, bias, activation = inputs
    ctx.shape, ctx.n, ctx.m, ctx.activation = (shape[0], shape[1]), n, m, activation
    ctx.has_bias = bias is not None
    saved_out = output if activation == "relu" else None
    ctx.save_for_backward(x, values, mask, bias, saved_out)


def _nm_linear_backward(ctx, grad):
    x, values, mask, bias, out = ctx.saved_tensors
    (M, K), n, m = ctx.shape, ctx.n, ctx.m
    gz = _activation_backward(ctx.activation, grad, out,
                              lambda: _ops.nm_linear(x, values, mask, [M, K], n, m, bias, "none"))
    g = _rows(gz, M)
    dx, dvalues = _nm_grads(values, mask, M, K, n, m, g.t(), _rows(x, K).t(),
                            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                            lambda crow_t, col_t, vt: _ops.csr_linear(g, crow_t, col_t, vt, [K, M], None))
    if dx is not None:
        dx = dx.reshape(x.shape)
    dbias = g.sum(0, dtype=torch.float32).to(grad.dtype) if ctx.has_bias and ctx.needs_input_grad[6] else None
    return dx, dvalues, None, None, None, None, dbias, None


def _nm_spmm_setup(ctx, inputs, output):
    values, mask, shape, n, m, dense = inputs
    ctx.shape, ctx.n, ctx.m = (shape[0], shape[1]), n, m
    ctx.save_for_backward(values, mask, dense)


def _nm_spmm_backward(ctx, grad):
    values, mask, dense = ctx.saved_tensors
    (M, K), n, m = ctx.shape, ctx.n, ctx.m
    need_v = ctx.needs_input_grad[0]
    a = _side_by_side(grad, M) if need_v else None
    b = _side_by_side(dense, K) if need_v else None
    ddense, dvalues = _nm_grads(values, mask, M, K, n, m, a, b, ctx.needs_input_grad[5], need_v,
                                lambda crow_t, col_t, vt: _ops.csr_spmm(crow_t, col_t, vt, [K, M], grad))
    return dvalues, None, None, None, None, ddense


# ---------------------------------------------------------------------------------------------
# pruned_ffn: y = W2 h + b2, h = act(W1 x + b1) [* (W3 x)] [zeroed where |h| <= threshold].
# The backward recomputes the intermediate (like activation checkpointing: the fused forward
# never materialises it for all tokens) with the per-format ops, then runs each product's
# backward above; weights in any format, each weight's tensors given as the op takes them.

def _ffn_linear(tag: str, w, x, bias, rows: int, cols: int):
    """x @ W^T (+ bias) for one pruned_ffn weight (rows, cols) in its op encoding."""
    if tag == "dense":
        return torch.nn.functional.linear(x, w[0], bias)
    if tag == "dense_t":  # W^T stored (cols, rows)
        y = x @ w[0]
        return y if bias is None else y + bias
    nm = tuple(int(v) for v in tag.split(":")[1:]) if tag.startswith("nm:") else (0, 0)
    return linear_tensors("nm" if nm != (0, 0) else tag, list(w), (rows, cols), nm, x, bias)


def _ffn_linear_grads(tag: str, w, x, g, rows: int, cols: int, need, need_x: bool = True):
    """(dx, [grad per weight tensor]) of y = x @ W^T for x (T, cols), g (T, rows); need: the
    weight tensors' needs_input_grad (only values / dense weights can need one)."""
    need_w = any(need)
    dx, dw = None, [None] * len(w)
    if tag == "dense":
        dx = g @ w[0] if need_x else None
        if need_w:
            dw[0] = g.t() @ x
    elif tag == "dense_t":
        dx = g @ w[0].t() if need_x else None
        if need_w:
            dw[0] = x.t() @ g
    elif tag in _COMPRESSED:
        dx, dw[2] = _compressed_linear_grads(tag, w[0], w[1], w[2], rows, cols, x, g, need_x, need_w)
    else:
        n, m = (int(v) for v in tag.split(":")[1:])
        dx, dw[0] = _nm_grads(w[0], w[1], rows, cols, n, m, g.t(), x.t(), need_x, need_w,
                              lambda crow_t, col_t, vt: _ops.csr_linear(g, crow_t, col_t, vt, [cols, rows], None))
    return dx, dw


def _pruned_ffn_setup(ctx, inputs, output):
    x, f1, w1, b1, f2, w2, b2, f3, w3, hidden, activation, threshold = inputs
    ctx.tags, ctx.hidden, ctx.activation, ctx.threshold = (f1, f2, f3), hidden, activation, threshold
    ctx.counts = (len(w1), len(w2), len(w3))
    ctx.save_for_backward(x, b1, b2, *w1, *w2, *w3)


def _pruned_ffn_backward(ctx, grad):
    x, b1, b2, *ws = ctx.saved_tensors
    n1, n2, _ = ctx.counts
    w1, w2, w3 = ws[:n1], ws[n1:n1 + n2], ws[n1 + n2:]
    (f1, f2, f3), H, act = ctx.tags, ctx.hidden, ctx.activation
    need = ctx.needs_input_grad
    d = x.shape[-1]
    x2 = _rows(x, d)
    gy = _rows(grad, d)
    # the intermediate, recomputed as the op computes it (rounded to x's dtype)
    z = _ffn_linear(f1, w1, x2, b1, H, d)
    a = activations.apply(act, z)
    u = _ffn_linear(f3, w3, x2, None, H, d) if f3 != "none" else None
    h = a if u is None else a * u
    keep = None
    if ctx.threshold > 0:
        keep = h.abs() > ctx.threshold
        h = h * keep
    dh, dw2 = _ffn_linear_grads(f2, w2, h, gy, d, H, need[5])
    if keep is not None:
        dh = dh * keep
    du = None if u is None else dh * a
    da = dh if u is None else dh * u
    dz = _activation_backward(act, da, a, lambda: z)
    dx, dw1 = _ffn_linear_grads(f1, w1, x2, dz, H, d, need[2], need[0])
    dw3 = [None] * len(w3)
    if u is not None:
        dx3, dw3 = _ffn_linear_grads(f3, w3, x2, du, H, d, need[8], need[0])
        dx = dx3 if dx is None else (dx if dx3 is None else dx + dx3)
    db1 = dz.sum(0, dtype=torch.float32).to(x.dtype) if b1 is not None and need[3] else None
    db2 = gy.sum(0, dtype=torch.float32).to(x.dtype) if b2 is not None and need[6] else None
    dx = dx.reshape(x.shape) if need[0] else None
    keep_only = lambda grads, needs: [g if n else None for g, n in zip(grads, needs)]  # noqa: E731
    return (dx, None, keep_only(dw1, need[2]), db1, None, keep_only(dw2, need[5]), db2, None,
            keep_only(dw3, need[8]), None, None, None)


# ---------------------------------------------------------------------------------------------
# masked_attention

def _masked_attention_setup(ctx, inputs, output):
    q, k, v, kind, block_q, block_k, elem_mask, bias, band_lo, band_hi, kv_len, scale, head_mask = inputs
    ctx.ints = (block_q, block_k, band_lo, band_hi, scale)
    ctx.save_for_backward(q, k, v, kind, elem_mask, bias, kv_len, head_mask, output)


def _masked_attention_backward(ctx, grad):
    q, k, v, kind, elem_mask, bias, kv_len, head_mask, out = ctx.saved_tensors
    block_q, block_k, band_lo, band_hi, scale = ctx.ints
    need = ctx.needs_input_grad
    if need[7]:
        raise RuntimeError("pysparse.masked_attention: no gradient for a float attn_mask (the additive bias); "
                           "pass it detached (requires_grad=False)")
    dq, dk, dv = masked_attention_backward(grad, out, q, k, v, kind, block_q, block_k, elem_mask, bias, band_lo,
                                           band_hi, kv_len, scale, head_mask, (need[0], need[1], need[2]))
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("pysparse::masked_attention", _masked_attention_backward,
                                setup_context=_masked_attention_setup)
for _kind in _COMPRESSED:
    torch.library.register_autograd(f"pysparse::{_kind}_linear", _linear_backward(_kind), setup_context=_linear_setup)
    torch.library.register_autograd(f"pysparse::{_kind}_spmm", _spmm_backward(_kind), setup_context=_spmm_setup)
torch.library.register_autograd("pysparse::nm_linear", _nm_linear_backward, setup_context=_nm_linear_setup)
torch.library.register_autograd("pysparse::nm_spmm", _nm_spmm_backward, setup_context=_nm_spmm_setup)
torch.library.register_autograd("pysparse::pruned_ffn", _pruned_ffn_backward, setup_context=_pruned_ffn_setup)

__all__ = ["memoized", "nm_pattern", "transpose"]
