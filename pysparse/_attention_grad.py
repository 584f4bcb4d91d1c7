"""The backward of pysparse::masked_attention over the active tiles only (pysparse.autograd
registers it). On CPU it is one fused kernel, pysparse::masked_attention_backward
(csrc/cpu/attention_impl.h: FlashAttention-2's backward over the active tiles). Elsewhere (CUDA,
until a GPU kernel exists) it runs the gathered-tile path below.

Like the forward, it visits only the (batch, head, query block, key block) tiles the block mask
does not skip. The tiles are gathered into batches and every product is a batched GEMM
(torch.bmm), in chunks of tiles whose operands stay under _CHUNK_BYTES:

1. per chunk, S = Q K^T scale (+ bias) with the element rule applied on partial tiles; each
   query row's max and sum of exp over all its active tiles are reduced into row statistics
   (the log-sum-exp the forward computed and did not keep);
2. per chunk, S again, P = exp(S - max) / sum, then with Delta = rowsum(dO * O):
   dV += P^T dO, dP = dO V^T, dS = P (dP - Delta), dQ += dS K scale, dK += dS^T Q scale,
   accumulated into the query / key blocks with index_add (grouped-query heads sum into their
   kv head).

Everything is fp32 (16-bit inputs are widened per tile); gradients come back in the input dtype.
A row with no allowed key has P = 0 and gets no gradient, as its output is 0; head_mask's False
heads get none. What neither path gives: a gradient for the additive bias (attn_mask as a float
tensor is a constant).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._checked import traced as _traced

# Largest gathered operands of one chunk of tiles (bytes), and largest set of scores kept from
# the statistics pass for the gradient pass (else they are computed twice).
_CHUNK_BYTES = 48 * 2**20
# exp2, not exp: torch.exp on CPU floats calls MKL's vsExp, which on this machine (torch 2.13, 2
# threads) returned values off by up to 7e-5 relative on one thread's half of a call, in about
# one process in ten; exp2 is torch's own vectorised code.
_LOG2E = 1.4426950408889634
_KEEP_BYTES = 256 * 2**20
# CPU tensors take the fused kernel; False sends them down the gathered-tile path too (the tests
# check both paths on CPU: the gathered one is what other devices run).
_FUSED_CPU = True


def _tile(block: int, length: int) -> int:
    return min(block, max(length, 1))


def masked_attention_backward(grad: torch.Tensor, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, kind: Optional[torch.Tensor], block_q: int, block_k: int,
                              elem_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], band_lo: int,
                              band_hi: int, kv_len: Optional[torch.Tensor], scale: float,
                              head_mask: Optional[torch.Tensor], need=(True, True, True)):
    """(dq, dk, dv) of masked_attention's output `out` for the output gradient `grad`: the fused
    CPU kernel (pysparse::masked_attention_backward) on CPU, batched GEMMs over the gathered
    active tiles elsewhere."""
    if q.device.type == "cpu" and _FUSED_CPU:
        return torch.ops.pysparse.masked_attention_backward(grad, out, q, k, v, kind, block_q, block_k, elem_mask,
                                                            bias, band_lo, band_hi, kv_len, scale, head_mask)
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    f32 = torch.float32
    bq, bk = _tile(block_q, Lq), _tile(block_k, Lk)
    QB, KB = -(-Lq // bq), -(-Lk // bk)
    g = H // Hkv

    # The active tiles (b, h, qb, kb) and their kinds.
    if kind is None:
        kinds = torch.ones(B, H, QB, KB, dtype=torch.int8, device=q.device)
    else:
        kinds = kind.expand(B, H, QB, KB)
    if head_mask is not None:
        kinds = kinds * head_mask.view(1, H, 1, 1).to(kinds.dtype)
    if Lq == 0 or Lk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Traced (torch.compile, opcheck): every tile, the skipped ones fully excluded, as a graph
    # needs static shapes; eager: the active tiles only.
    traced = _traced(q, kinds)
    tiles = torch.ones_like(kinds, dtype=torch.bool).nonzero_static(size=kinds.numel()) if traced \
        else (kinds != 0).nonzero()
    if tiles.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    tb, th, tqb, tkb = tiles.unbind(1)
    thk = th // g
    tkind = kinds[tb, th, tqb, tkb]
    # Element rules only where they can exclude something: partial tiles, and tiles over the
    # zero-padded end of the keys. (Padded query rows have dO = 0: they add nothing.)
    partial = tkind != 2
    if Lk % bk:
        partial = partial | (tkb == KB - 1)

    def blocks(t: torch.Tensor, block: int, nblocks: int) -> torch.Tensor:
        """(B, heads, L, d) zero-padded to whole blocks, as (B * heads * nblocks, block, d) fp32."""
        pad = nblocks * block - t.shape[2]
        t = t.to(f32)
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.reshape(-1, block, t.shape[3])

    Qb, Kb, Vb = blocks(q, bq, QB), blocks(k, bk, KB), blocks(v, bk, KB)
    dOb, Ob = blocks(grad, bq, QB), blocks(out, bq, QB)
    delta = (dOb * Ob).sum(-1)  # (B * H * QB, bq): rowsum(dO * O)
    qrow = (tb * H + th) * QB + tqb  # flat (b, h, query block) of each tile
    krow = (tb * Hkv + thk) * KB + tkb  # flat (b, kv head, key block)
    qi = torch.arange(bq, device=q.device)
    kj = torch.arange(bk, device=q.device)
    em = None if elem_mask is None else elem_mask.expand(B, H, Lq, Lk)
    bb = None if bias is None else bias.expand(B, H, Lq, Lk)

    def excluded(sel: torch.Tensor) -> torch.Tensor:
        """(n, bq, bk) True where the tile's kind and element rule exclude the key, for tiles
        `sel` (skipped: all; full: only keys past the end; partial: the rule)."""
        b, h, qb, kb = tb[sel], th[sel], tqb[sel], tkb[sel]
        i = qb[:, None, None] * bq + qi[None, :, None]
        j = kb[:, None, None] * bk + kj[None, None, :]
        ok = (j - i >= band_lo) & (j - i <= band_hi)
        if kv_len is not None:
            ok = ok & (j < kv_len[b].view(-1, 1, 1))
        if em is not None:
            ok = ok & em[b.view(-1, 1, 1), h.view(-1, 1, 1), i.clamp(max=Lq - 1), j.clamp(max=Lk - 1)]
        kd = tkind[sel].view(-1, 1, 1)
        return ~((j < Lk) & (kd != 0) & ((kd == 2) | ok))

    def scores(sel: torch.Tensor) -> torch.Tensor:
        """S log2(e) (fp32, excluded keys at -inf) of the tiles `sel`: softmax runs on exp2, as
        in the forward kernel."""
        s = torch.bmm(Qb.index_select(0, qrow[sel]), Kb.index_select(0, krow[sel]).transpose(1, 2)).mul_(scale * _LOG2E)
        if bb is not None:
            b, h = tb[sel].view(-1, 1, 1), th[sel].view(-1, 1, 1)
            i = (tqb[sel][:, None, None] * bq + qi[None, :, None]).clamp(max=Lq - 1)
            j = (tkb[sel][:, None, None] * bk + kj[None, None, :]).clamp(max=Lk - 1)
            bt = bb[b, h, i, j].to(f32)
            s = torch.where(bt == -math.inf, -math.inf, s + bt * _LOG2E)  # -inf excludes whatever the score
        if traced:
            return s.masked_fill(excluded(sel), -math.inf)
        part = partial[sel].nonzero().squeeze(1)
        if part.numel():
            s[part] = s[part].masked_fill(excluded(sel[part]), -math.inf)
        return s

    n_tiles = tiles.shape[0]
    per_tile = 4 * (bq * (D + 2 * Dv) + bk * (D + Dv) + 4 * bq * bk)
    step = max(1, _CHUNK_BYTES // per_tile)
    chunks = [torch.arange(c, min(n_tiles, c + step), device=q.device) for c in range(0, n_tiles, step)]
    # The scores of pass 1 are kept for pass 2 while they take at most _KEEP_BYTES.
    keep = n_tiles * bq * bk * 4 <= _KEEP_BYTES
    kept = []

    # 1. Row statistics over all active tiles: max, then the sum of exp.
    rmax = torch.full((B * H * QB, bq), -math.inf, dtype=f32, device=q.device)
    for sel in chunks:
        s = scores(sel)
        rmax.scatter_reduce_(0, qrow[sel].view(-1, 1).expand(-1, bq), s.amax(-1), "amax")
        if keep:
            kept.append(s)
    safe_max = torch.where(rmax == -math.inf, 0.0, rmax)
    rsum = torch.zeros_like(rmax)
    probs = []
    for c, sel in enumerate(chunks):
        s = kept[c] if keep else scores(sel)
        p = torch.exp2(s.sub_(safe_max.index_select(0, qrow[sel]).unsqueeze(-1)))
        rsum.index_add_(0, qrow[sel], p.sum(-1))
        if keep:
            probs.append(p)
    inv = torch.where(rsum > 0, 1.0 / rsum, 0.0)

    # 2. The gradients, tile by tile.
    dqb = torch.zeros(B * H * QB, bq, D, dtype=f32, device=q.device)
    dkb = torch.zeros(B * Hkv * KB, bk, D, dtype=f32, device=q.device)
    dvb = torch.zeros(B * Hkv * KB, bk, Dv, dtype=f32, device=q.device)
    for c, sel in enumerate(chunks):
        r, kr = qrow[sel], krow[sel]
        if keep:
            p = probs[c]
        else:
            p = torch.exp2(scores(sel).sub_(safe_max.index_select(0, r).unsqueeze(-1)))
        p.mul_(inv.index_select(0, r).unsqueeze(-1))
        do = dOb.index_select(0, r)
        if need[2]:
            dvb.index_add_(0, kr, torch.bmm(p.transpose(1, 2), do))
        if need[0] or need[1]:
            ds = torch.bmm(do, Vb.index_select(0, kr).transpose(1, 2))
            ds.sub_(delta.index_select(0, r).unsqueeze(-1)).mul_(p).mul_(scale)
            if need[0]:
                dqb.index_add_(0, r, torch.bmm(ds, Kb.index_select(0, kr)))
            if need[1]:
                dkb.index_add_(0, kr, torch.bmm(ds.transpose(1, 2), Qb.index_select(0, r)))
    dq = dqb.view(B, H, QB * bq, D)[:, :, :Lq]
    dk = dkb.view(B, Hkv, KB * bk, D)[:, :, :Lk]
    dv = dvb.view(B, Hkv, KB * bk, Dv)[:, :, :Lk]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
