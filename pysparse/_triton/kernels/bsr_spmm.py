"""Triton kernel for out = A @ B (+ bias per row of out) with A (M, K) in pysparse's BSR layout.

A is crow (M/BH + 1), col (nnzb, in block units) and values (nnzb, BH, BW), each block row-major
and contiguous. One program owns one block row of A and a BLOCK_N-wide tile of output columns: it
walks that block row's nonzero blocks, loads each (BH, BW) block whole and the BW matching rows of
B for its columns, and tl.dot's them into an fp32 (BH, BLOCK_N) accumulator. Zero blocks cost
nothing, and an empty block row just writes its bias (or zeros).

tl.dot needs every dim >= 16 and tl.arange powers of two, so a block smaller than 16 or of another
size is padded in registers to (PH, PW), the next powers of two >= 16, by masked loads that read
zeros there: the padding is never fetched from memory, only multiplied. The block size is a
constexpr, so each one compiles its own kernel and the masks of unpadded blocks fold away.

B and out are addressed through their strides only, so the nn.Linear layout needs no copy:
out^T = A @ input^T, B = input^T (strides swapped) and out written through swapped strides.
"""
import triton
import triton.language as tl


def configs():
    # Narrow tiles first: the linear layout at decode has n = tokens, often 1-16. The (PH, BLOCK_N)
    # fp32 accumulator has to fit in registers, which caps BLOCK_N * PH per warp count.
    return [
        triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
    ]


# M is unused in the body: it is an argument so that the autotuner can key on it.
@triton.jit
def bsr_spmm_kernel(crow_ptr, col_ptr, val_ptr, b_ptr, bias_ptr, out_ptr,
                    M, N, K, NNZB, stride_bb, stride_bk, stride_bn, stride_ob, stride_om, stride_on,
                    BH: tl.constexpr, BW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    # axis 2: the matrix of a batch of dense operands (one launch for all of them)
    pid_b = tl.program_id(2).to(tl.int64)
    b_ptr += pid_b * stride_bb
    out_ptr += pid_b * stride_ob
    # The launcher checked the indices (pysparse/_checked.py); these clamps (and the one on kb) keep
    # indices changed behind that check from sending a read out of bounds, for a few scalar ops.
    start = tl.minimum(tl.maximum(tl.load(crow_ptr + pid_r).to(tl.int64), 0), NNZB)
    end = tl.minimum(tl.maximum(tl.load(crow_ptr + pid_r + 1).to(tl.int64), start), NNZB)
    rh = tl.arange(0, PH)
    rw = tl.arange(0, PW)
    h_ok = rh < BH
    w_ok = rw < BW
    # int64 offsets: nnzb * BH * BW and n * stride can pass 2**31 on large layers.
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < N
    blk_off = rh[:, None] * BW + rw[None, :]
    blk_ok = h_ok[:, None] & w_ok[None, :]
    b_ok = w_ok[:, None] & col_ok[None, :]
    acc = tl.zeros((PH, BLOCK_N), dtype=tl.float32)
    for p in range(start, end):
        kb = tl.minimum(tl.maximum(tl.load(col_ptr + p).to(tl.int64), 0), K // BW - 1)
        a = tl.load(val_ptr + p * (BH * BW) + blk_off, mask=blk_ok, other=0.0)
        krows = kb * BW + rw
        b = tl.load(b_ptr + krows[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    rows = pid_r.to(tl.int64) * BH + rh
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=h_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & col_ok[None, :])
