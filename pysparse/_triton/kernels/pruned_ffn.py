"""Triton kernel for pysparse::pruned_ffn at decode-sized token counts: the whole FFN
out = W2 g(x) + b2, g(x) = act(W1 x + b1) [* (W3 x)] [zeroed where |g| <= threshold], in one pass
over the weights with the intermediate g never written to memory.

One program owns BLOCK_H hidden neurons (a chunk of W1/W3 rows, the same range of W2 columns) for
a tile of BLOCK_T tokens. It first reduces x @ W1[chunk]^T (and x @ W3[chunk]^T) over all of d,
which is all g[:, chunk] depends on, applies the bias, activation, gate and threshold in fp32, and
then multiplies that (BLOCK_T, BLOCK_H) block by W2[:, chunk]^T, BLOCK_D output features at a
time, adding each partial product into an fp32 (T, d) accumulator with atomics: split-K over
hidden. Every weight byte is read once per token tile, and at decode there is one token tile, so
the kernel streams W1, W3 and W2 once, which is the floor for a memory-bound product. The
launcher fills the accumulator with b2 (or zeros) beforehand and casts it to x's dtype after.
Atomics make the fp32 sum's order depend on scheduling: results are not bitwise reproducible
from run to run (the order changes the last bits, within the accumulation error bound).

Weights are dense (any strides, so W2 given transposed is the same code with swapped strides) or
pysparse's N:M layout, rebuilt tile by tile in registers as nm_linear.py does: a tile's bitmap
bits are expanded, an inclusive cumsum along the row numbers the kept entries, and a masked load
places the compressed values at their dense positions. For W1/W3 a tile is a block of rows
(hidden neurons) and columns (features of x); for W2 (d, hidden) the program's chunk is a column
range of every row, and because the range starts at a multiple of BLOCK_H (a multiple of 16, so
of m and of 8) it starts a group of m columns and a mask byte: the row's kept values for it begin
at row * kept + c0 / m * n. tl.dot then runs on dense tiles in x's dtype (fp32 accumulate); g
is rounded to x's dtype only as the second product's operand, where the unfused sequence would
have stored it.

Activation sparsity: a chunk whose g is zero for every token of the tile (after ReLU or the
threshold) skips the second product altogether. Within a live chunk, dead hidden units are left
out of W2's loads where that saves bytes: with W2 stored transposed ("dense_t", rows of W2^T
contiguous) a dead neuron's row is never fetched, and N:M values are gathered one by one anyway.
Row-major dense W2 is loaded whole (see the kernel).

NOT YET RUN ON A GPU: tested under TRITON_INTERPRET=1 only; configs() and the launcher's
token cutoff are first guesses until benchmarks/gpu_bench.py has run.
"""
import triton
import triton.language as tl

from ._tiles import activation, weight_tile


def configs():
    # BLOCK_H sets both the number of programs (hidden / BLOCK_H: enough to fill the SMs at
    # decode) and the atomics issued (T * d per program); the tuner trades the two per shape and
    # token count. Five configs: each is compiled per format combination and token tile.
    return [
        triton.Config({"BLOCK_H": 16, "BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_H": 32, "BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_H": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_H": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_H": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    ]


# T changes every decode step; specializing on it (== 1, multiple of 16) would only recompile.
@triton.jit(do_not_specialize=["T"])
def pruned_ffn_kernel(x_ptr, w1_ptr, m1_ptr, b1_ptr, w3_ptr, m3_ptr, w2_ptr, m2_ptr, out_ptr,
                      T, D, HIDDEN, threshold,
                      stride_xt, stride_xd, stride_w1r, stride_w1c, stride_w3r, stride_w3c,
                      stride_w2r, stride_w2c, stride_ot,
                      F1: tl.constexpr, N1: tl.constexpr, M1: tl.constexpr,
                      F3: tl.constexpr, N3: tl.constexpr, M3: tl.constexpr,
                      F2: tl.constexpr, N2: tl.constexpr, M2: tl.constexpr,
                      GATED: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr,
                      HAS_THRESHOLD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # Format codes (see the launcher): 0 dense, 1 dense given transposed (W2 only), 2 N:M.
    pid_h = tl.program_id(0)
    pid_t = tl.program_id(1)
    h0 = pid_h * BLOCK_H
    hid = h0 + tl.arange(0, BLOCK_H)
    hid_ok = hid < HIDDEN
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < T
    x_rows = x_ptr + toks[:, None].to(tl.int64) * stride_xt

    acc1 = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    if GATED:
        acc3 = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_rows + cols[None, :] * stride_xd, mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
        w1 = weight_tile(w1_ptr, m1_ptr, hid, cols, hid_ok, col_ok, col_ok, D, stride_w1r, stride_w1c,
                          k0, F1 == 2, N1, M1)
        acc1 = tl.dot(x, tl.trans(w1.to(x.dtype)), acc1, input_precision=DOT_PRECISION)
        if GATED:
            w3 = weight_tile(w3_ptr, m3_ptr, hid, cols, hid_ok, col_ok, col_ok, D, stride_w3r,
                              stride_w3c, k0, F3 == 2, N3, M3)
            acc3 = tl.dot(x, tl.trans(w3.to(x.dtype)), acc3, input_precision=DOT_PRECISION)

    g = acc1
    if HAS_B1:
        g += tl.load(b1_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)[None, :]
    g = activation(g, ACT)
    if GATED:
        g = g * acc3
    if HAS_THRESHOLD:
        # "<=" then zero, not "> keep": a NaN stays a NaN, as in the unfused sequence.
        g = tl.where(tl.abs(g) <= threshold, 0.0, g)
    # Padding tokens carry act(b1), not zeros; they must not make a neuron look live.
    g = tl.where(tok_ok[:, None], g, 0.0)
    # != rather than |g| > 0: a NaN is live and reaches the output, as it would unfused.
    live = tl.max((g != 0.0).to(tl.int32), axis=0) != 0
    if tl.sum(live.to(tl.int32), axis=0) > 0:
        # Row-major W2 runs along hidden: a per-column mask there would split its vector loads
        # into scalar ones, costing more than the dead columns save.
        if F2 == 0:
            need = hid_ok
        else:
            need = live
        gq = g.to(x_ptr.dtype.element_ty)
        o_rows = out_ptr + toks[:, None].to(tl.int64) * stride_ot
        for n0 in range(0, D, BLOCK_D):
            feats = n0 + tl.arange(0, BLOCK_D)
            feat_ok = feats < D
            w2 = weight_tile(w2_ptr, m2_ptr, feats, hid, feat_ok, hid_ok, need, HIDDEN, stride_w2r,
                              stride_w2c, h0, F2 == 2, N2, M2)
            part = tl.dot(gq, tl.trans(w2.to(gq.dtype)), input_precision=DOT_PRECISION)
            tl.atomic_add(o_rows + feats[None, :], part, mask=tok_ok[:, None] & feat_ok[None, :],
                          sem="relaxed")
