"""Block-sparse masked attention on CUDA: kernels/masked_attention.py, registered for
pysparse::masked_attention."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import _checked
from ._common import INTERPRET
from .kernels.masked_attention import configs as attn_configs, masked_attention_kernel

_INT32_SAFE = 2**31 - 1
_attn_autotuned = triton.autotune(
    configs=attn_configs(), key=["Lq", "Lk", "D", "BLOCK_M", "BLOCK_N", "HAS_MASK", "HAS_BIAS"]
)(masked_attention_kernel)


def _kv_lists(block_kind: Optional[torch.Tensor], QB: int, KB: int, device):
    """(kv_num (Bb, Hb, QB) int32, kv_idx (Bb, Hb, QB, KB) int32, kv_full (Bb, Hb, QB, KB) int8):
    each query block's active key blocks first, in ascending order, and whether each is full."""
    if block_kind is None:
        kv_num = torch.full((1, 1, QB), KB, dtype=torch.int32, device=device)
        kv_idx = torch.arange(KB, dtype=torch.int32, device=device).expand(1, 1, QB, KB).contiguous()
        return kv_num, kv_idx, torch.zeros((1, 1, QB, KB), dtype=torch.int8, device=device)
    active = block_kind != 0
    kv_num = active.sum(-1, dtype=torch.int32)
    # A stable sort on "inactive" moves the active blocks to the front and keeps them ascending.
    order = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices
    kv_full = (block_kind.gather(-1, order) == 2).to(torch.int8)
    return kv_num.contiguous(), order.to(torch.int32).contiguous(), kv_full.contiguous()


def _strides4(t: Optional[torch.Tensor], shape):
    """t broadcast to `shape` (stride 0 on broadcast dims) and its strides; zeros when t is None."""
    if t is None:
        return None, (0, 0, 0, 0)
    e = t.expand(shape)
    return e, tuple(e.stride())


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     block_kind: Optional[torch.Tensor], block_q: int, block_k: int,
                     elem_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     band_lo: int, band_hi: int, kv_len: Optional[torch.Tensor], scale: float,
                     head_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias, over the allowed keys) @ v, visiting only active blocks.

    q (B, H, Lq, D), k and v (B, Hkv, Lk, D), H % Hkv == 0; any strides. block_kind int8
    (Bb|1, Hb|1, ceil(Lq/block_q), ceil(Lk/block_k)): 0 skip, 1 partial, 2 full; None = all
    partial. On partial blocks key j is allowed for query i iff elem_mask[b, h, i, j] (bool,
    broadcastable to (B, H, Lq, Lk)), band_lo <= j - i <= band_hi and j < kv_len[b]; full blocks
    allow every in-range key. bias (broadcastable) is added on every visited block. Rows with no
    allowed key, and heads with head_mask False, are zeros. block_q and block_k (powers of two
    >= 16) are the kernel's tiles.
    """
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"masked_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} differ")
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"masked_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"masked_attention: H = {H} is not a multiple of Hkv = {Hkv}")
    if not 1 <= D <= 256:
        raise ValueError(f"masked_attention: head dim {D} is outside 1..256")
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"masked_attention: {name} = {bs} must be a power of two >= 16")
    QB, KB = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    if block_kind is not None and (block_kind.dim() != 4 or tuple(block_kind.shape[2:]) != (QB, KB)
                                   or block_kind.shape[0] not in (1, B) or block_kind.shape[1] not in (1, H)):
        raise ValueError(f"masked_attention: block_kind {tuple(block_kind.shape)} must be "
                         f"(1 or {B}, 1 or {H}, {QB}, {KB})")
    if block_kind is not None:
        _checked.block_kinds(block_kind)
    if kv_len is not None and tuple(kv_len.shape) != (B,):
        raise ValueError(f"masked_attention: kv_len {tuple(kv_len.shape)} must be ({B},)")
    if head_mask is not None and tuple(head_mask.shape) != (H,):
        raise ValueError(f"masked_attention: head_mask {tuple(head_mask.shape)} must be ({H},)")
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()

    kv_num, kv_idx, kv_full = _kv_lists(block_kind, QB, KB, q.device)
    kv_num = kv_num.expand(B, H, QB)
    kv_idx = kv_idx.expand(B, H, QB, KB)
    if elem_mask is not None:
        elem_mask = elem_mask.view(torch.uint8) if elem_mask.dtype == torch.bool else elem_mask
    elem_mask, mask_strides = _strides4(elem_mask, (B, H, Lq, Lk))
    bias, bias_strides = _strides4(bias, (B, H, Lq, Lk))
    # j - i lies in [-(Lq - 1), Lk - 1]: a band covering that range cuts nothing, and clipping
    # either bound to int32 changes nothing either.
    has_band = band_lo > -(Lq - 1) or band_hi < Lk - 1
    band_lo = max(-_INT32_SAFE, min(_INT32_SAFE, int(band_lo)))
    band_hi = max(-_INT32_SAFE, min(_INT32_SAFE, int(band_hi)))
    if head_mask is not None and head_mask.dtype == torch.bool:
        head_mask = head_mask.view(torch.uint8)
    # Any pointer stands in for an absent operand: its flag keeps the kernel from reading it.
    args = (q, k, v, out, kv_num, kv_idx, kv_full,
            elem_mask if elem_mask is not None else kv_full, bias if bias is not None else q,
            kv_len if kv_len is not None else kv_num, head_mask if head_mask is not None else kv_full,
            float(scale) * 1.4426950408889634, band_lo, band_hi, H, H // Hkv, Lq, Lk, D,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *kv_num.stride(), *kv_idx.stride()[:3], *mask_strides, *bias_strides)
    meta = dict(HAS_MASK=elem_mask is not None, HAS_BIAS=bias is not None, HAS_BAND=has_band,
                HAS_KV_LEN=kv_len is not None, HAS_HEAD_MASK=head_mask is not None,
                # fp32 means fp32: tl.dot would otherwise round its inputs to tf32.
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=max(16, triton.next_power_of_2(D)))
    grid = (QB * B * H,)
    if INTERPRET:
        masked_attention_kernel[grid](*args, **meta, num_warps=4)
    elif q.dtype == torch.float32:
        # fp32 is the accuracy path, not the fast one: one unpipelined stage keeps 64 x 64 tiles
        # at D = 256 within shared memory, and skipping the autotuner saves a compile per config.
        masked_attention_kernel[grid](*args, **meta, num_warps=4, num_stages=1)
    else:
        _attn_autotuned[grid](*args, **meta)
    return out


@torch.library.register_kernel("pysparse::masked_attention", "cuda")
def _masked_attention_cuda(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo,
                           band_hi, kv_len, scale, head_mask):
    return masked_attention(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo,
                            band_hi, kv_len, scale, head_mask)

