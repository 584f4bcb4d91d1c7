"""Triton kernel for act(x @ A^T + bias) with A in pysparse's N:M layout (2:4 included).

A is stored as values (R, K/m*n), kept entries of each row in column order, and a bitmap
mask (R, ceil(K/8)) uint8 of the kept positions. A tile of A is rebuilt in registers from the
compressed values: the bits of a BLOCK_K-column chunk are expanded, an inclusive cumsum along the
row numbers the kept entries (each group of m columns holds exactly n, so the chunk's entries
start at k0 / m * n), and a masked load fetches them into their dense positions. tl.dot then runs
on the dense tile: bytes are those of the compressed weights, the math is the tensor cores'.
Aimed at decode-sized token counts, where cuSPARSELt's 2:4 GEMM loses to dense.
"""
import triton
import triton.language as tl

from ._tiles import activation, weight_tile


def configs():
    # Small token tiles first: decode (1-16 tokens) is what this kernel is for.
    return [
        triton.Config({"BLOCK_T": 16, "BLOCK_R": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 16, "BLOCK_R": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 32, "BLOCK_R": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 64, "BLOCK_R": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ]


@triton.jit
def nm_linear_kernel(x_ptr, val_ptr, mask_ptr, bias_ptr, y_ptr,
                     T, R, K, stride_xt, stride_xk, stride_yt, stride_yr,
                     N: tl.constexpr, M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < R
    tok_ok = toks < T
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = weight_tile(val_ptr, mask_ptr, rows, cols, row_ok, col_ok, col_ok, K, 0, 0, k0, True, N, M)
        x = tl.load(x_ptr + toks[:, None] * stride_xt + cols[None, :] * stride_xk,
                    mask=tok_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w.to(tl.float32)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    acc = activation(acc, ACT)
    tl.store(y_ptr + toks[:, None] * stride_yt + rows[None, :] * stride_yr,
             acc.to(y_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])
