"""Triton kernel for pysparse::masked_attention: FlashAttention-2 forward that visits only the
key blocks a block mask marks active.

One program owns one (BLOCK_M query rows, batch * head) tile and walks its query block's compact
list of active key blocks (kv_num active entries of kv_idx, ascending; FlexAttention's
kv_num_blocks / kv_indices), so skipped blocks cost nothing, not even a test. The mask's blocks
are the kernel's tiles, which is what lets a block's kind be one byte per tile: kv_full says the
whole block is allowed, and then no element-level mask is evaluated at all (no mask loads, no
band or key-length compares); only partial blocks pay for the element mask, the band
band_lo <= j - i <= band_hi and j < kv_len[b]. Key tails j >= Lk are cut on every block (a full
block may overhang the end), and an additive bias is applied on every visited block.

Softmax is the online one, in fp32 and in base 2: scores are multiplied by scale * log2(e) once so
each element costs one exp2. A running max of -inf (nothing allowed yet, or only -inf scores) is
replaced by 0 before it is subtracted, so exp2 sees -inf - 0 rather than -inf - (-inf) = NaN; rows
that end with l == 0 (nothing allowed) store zeros. Heads switched off by head_mask store zeros
and return before loading anything else. Batch and head offsets, and the row offsets into a
dense mask or bias, are formed in int64 so tensors past 2**31 elements address correctly. The
head dimension is padded to BLOCK_D (a power of two) with masked loads.
"""
import triton
import triton.language as tl


def configs():
    # Tiles are fixed by the mask's block size, so only the launch shape is tuned: 8 warps suit
    # 128-row tiles, 4 the 64-row ones. Shared memory bounds the stages (sm90, bf16, measured
    # from the compiled kernel): 128 x 128 tiles at D = 256 take 128 KiB with 1 stage, 192 KiB
    # with 2 and 256 KiB with 3, so the 1-stage config is the one that always fits; the
    # autotuner drops configs that fail to launch.
    return [
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=3),
        triton.Config({}, num_warps=8, num_stages=1),
        triton.Config({}, num_warps=8, num_stages=2),
        triton.Config({}, num_warps=8, num_stages=3),
    ]


# Sizes and band bounds change with every sequence; specializing on them (multiples of 16, == 1)
# would only buy recompiles. Strides stay specialized: they decide vectorized loads.
@triton.jit(do_not_specialize=["band_lo", "band_hi", "H", "GROUP", "Lq", "Lk", "D"])
def masked_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, kv_num_ptr, kv_idx_ptr, kv_full_ptr,
                            mask_ptr, bias_ptr, kv_len_ptr, head_mask_ptr,
                            qk_scale, band_lo, band_hi, H, GROUP, Lq, Lk, D,
                            stride_qb, stride_qh, stride_qm, stride_qd,
                            stride_kb, stride_kh, stride_kn, stride_kd,
                            stride_vb, stride_vh, stride_vn, stride_vd,
                            stride_ob, stride_oh, stride_om, stride_od,
                            stride_nb, stride_nh, stride_nm,
                            stride_ib, stride_ih, stride_im,
                            stride_mb, stride_mh, stride_mm, stride_mn,
                            stride_bb, stride_bh, stride_bm, stride_bn,
                            HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BAND: tl.constexpr,
                            HAS_KV_LEN: tl.constexpr, HAS_HEAD_MASK: tl.constexpr,
                            DOT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    # One flat grid axis (the y axis stops at 65535 programs, B * H may not); query blocks vary
    # fastest so programs running side by side share one head's K and V in L2.
    n_qblocks = tl.cdiv(Lq, BLOCK_M)
    pid_m = tl.program_id(0) % n_qblocks
    pid_bh = tl.program_id(0) // n_qblocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < Lq
    d_ok = offs_d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    o_ptrs = (o_ptr + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_om
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)

    if HAS_HEAD_MASK:
        if tl.load(head_mask_ptr + h) == 0:
            tl.store(o_ptrs, tl.zeros((BLOCK_M, BLOCK_D), dtype=o_ptr.dtype.element_ty), mask=tile_ok)
            return

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    kvh = h // GROUP
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    n_blocks = tl.load(kv_num_ptr + b * stride_nb + h * stride_nh + pid_m * stride_nm)
    list_off = b * stride_ib + h * stride_ih + pid_m * stride_im
    if HAS_KV_LEN:
        kv_len = tl.load(kv_len_ptr + b)
    # int64 rows: an (Lq, Lk) mask or bias passes 2**31 elements at Lq = Lk = 46341.
    rows64 = rows.to(tl.int64)
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(0, n_blocks):
        kb = tl.load(kv_idx_ptr + list_off + t)
        is_full = tl.load(kv_full_ptr + list_off + t)
        start_n = kb * BLOCK_N
        cols = start_n + offs_n
        col_ok = cols < Lk
        kt = tl.load(k_base + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn
                     + offs_d[:, None] * stride_kd, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + rows64[:, None] * stride_bm + cols[None, :] * stride_bn,
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            bias = bias.to(tl.float32)
            # -inf excludes the key whatever its score (+inf plus -inf would be NaN), as on the CPU
            s = tl.where(bias == float("-inf"), float("-inf"), s + bias * LOG2E)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if is_full == 0:
            ok = row_ok[:, None] & col_ok[None, :]
            if HAS_MASK:
                em = tl.load(mask_base + rows64[:, None] * stride_mm + cols[None, :] * stride_mn,
                             mask=ok, other=0)
                ok = ok & (em != 0)
            if HAS_BAND:
                diff = cols[None, :] - rows[:, None]
                ok = ok & (diff >= band_lo) & (diff <= band_hi)
            if HAS_KV_LEN:
                ok = ok & (cols[None, :] < kv_len)
            s = tl.where(ok, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # l == 0 only where every p was 0, so acc is 0 there too and dividing by 1 stores zeros.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=tile_ok)
