"""@triton.jit helpers shared by the kernels: a weight tile rebuilt from any supported layout, and
the fused activations (codes: 0 none, 1 relu, 2 gelu (erf), 3 silu, 4 gelu_tanh)."""
import triton
import triton.language as tl


@triton.jit
def weight_tile(w_ptr, bits_ptr, rows, cols, row_ok, col_ok, need, K, stride_r, stride_c, c0,
                 NM: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """The (len(rows), len(cols)) tile of a (R, K) weight starting at column c0 (a multiple of M
    for N:M), zeros outside row_ok x col_ok. Values are only fetched where `need` (per column)
    holds; the N:M bitmap is read over the full range, since ranks count every kept column."""
    rows = rows.to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    if NM:
        byte = tl.load(bits_ptr + rows[:, None] * ((K + 7) // 8) + (cols // 8)[None, :], mask=ok, other=0)
        kept = (byte.to(tl.int32) >> (cols % 8)[None, :]) & 1
        rank = tl.cumsum(kept, axis=1)
        pos = (c0 // M) * N + rank - 1
        # pos stays inside the row for a valid bitmap (checked by the launcher, pysparse/_checked.py);
        # the bound keeps a bitmap changed behind the check from reading past the values.
        w = tl.load(w_ptr + rows[:, None] * (K // M * N) + pos,
                    mask=ok & need[None, :] & (kept != 0) & (pos < K // M * N), other=0.0)
    else:
        w = tl.load(w_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                    mask=ok & need[None, :], other=0.0)
    return w


@triton.jit
def activation(g, ACT: tl.constexpr):
    if ACT == 1:
        g = tl.maximum(g, 0.0)
    elif ACT == 2:
        g = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 3:
        g = g / (1.0 + tl.exp(-g))
    elif ACT == 4:
        # tanh(z) = 1 - 2 / (1 + e^(2z)): saturates to +-1 at either end without a NaN.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        g = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    return g
