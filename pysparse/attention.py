"""Block-sparse masked attention: ``BlockMask`` and ``masked_attention``.

    bm = pysparse.BlockMask.causal(L) & pysparse.BlockMask.key_padding(lengths, L)
    out = pysparse.masked_attention(q, k, v, block_mask=bm)      # q, k, v (B, H, L, D)

A BlockMask says, per (batch, head) and per tile of block_q queries x block_k keys, whether the
tile is skipped (no work at all), full (every key allowed, no per-element test) or partial (the
element-level rule is evaluated). The element-level rule is the AND of whichever of these the
mask carries: a dense bool mask, a band of diagonals (causal, sliding window) and per-batch key
lengths (padding). Bands and lengths are evaluated from indices, so only masks that really are
arbitrary cost an (Lq, Lk) tensor.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch

from ._loader import _C  # noqa: F401  (loads the library that defines the op)

SKIP, PARTIAL, FULL = 0, 1, 2


def default_block_size(device) -> Tuple[int, int]:
    """(block_q, block_k) used when none is given.

    CPU: 64 x 64. The kernel keeps a 64-query tile of Q, the 64 x 64 score tile and the output
    tile in L1/L2 (16 KB each in fp32 at head dim 64) and walks K^T in 64-key blocks; smaller
    blocks follow an irregular mask more closely but pay the per-block softmax rescale and loop
    overhead more often, larger ones skip less. CUDA: 128 x 64, FlashAttention-2's tile for head
    dims up to 128 (128 queries across 4 warps, 64-key steps that keep K and V in shared memory).
    """
    return (128, 64) if torch.device(device).type == "cuda" else (64, 64)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _size(v, what: str, minimum: int) -> int:
    """v as an int >= minimum (ints, numpy ints, 0-d integer tensors; not bools, not floats)."""
    try:
        if isinstance(v, bool):
            raise TypeError
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"BlockMask: {what} must be an integer, got {v!r}") from None
    if i < minimum:
        raise ValueError(f"BlockMask: {what} must be >= {minimum}, got {i}")
    return i


def _block_pair(block_size, device) -> Tuple[int, int]:
    """(block_q, block_k) from None (the device's default), an int (square tiles) or a pair."""
    if block_size is None:
        return default_block_size(device)
    if not isinstance(block_size, (tuple, list)):
        block_size = (block_size, block_size)
    if len(block_size) != 2:
        raise ValueError(f"BlockMask: block_size must be an int or a (block_q, block_k) pair, got {block_size!r}")
    return _size(block_size[0], "block_q", 1), _size(block_size[1], "block_k", 1)


def _tile(block: int, length: int) -> int:
    """The extent of a tile: a block longer than its sequence covers the sequence (same grid), so
    tensors sized by tiles never follow a declared block size of, say, 2**62."""
    return min(block, max(length, 1))


def _clamp_band(lo, hi, Lq: int, Lk: int) -> Tuple[int, int]:
    """Band bounds clamped to [-Lq, Lk]: j - i lies in [-(Lq - 1), Lk - 1], so the same keys are
    allowed, and index arithmetic on the bounds cannot overflow (+-inf are accepted)."""
    def clamp(b, what):
        if isinstance(b, bool) or not isinstance(b, (int, float)) and not hasattr(b, "__index__"):
            raise ValueError(f"BlockMask: band {what} must be an integer or +-inf, got {b!r}")
        if isinstance(b, float) and (math.isnan(b) or (math.isfinite(b) and b != int(b))):
            raise ValueError(f"BlockMask: band {what} must be an integer or +-inf, got {b!r}")
        return int(max(-Lq, min(Lk, b)))
    return clamp(lo, "lower bound"), clamp(hi, "upper bound")


def _block_reduce(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """int8 kinds of a bool (..., Lq, Lk) mask: FULL where every element of a tile is True, SKIP
    where none is, else PARTIAL. Tails of the last tiles count as neither."""
    Lq, Lk = mask.shape[-2:]
    bq, bk = _tile(bq, Lq), _tile(bk, Lk)
    QB, KB = _cdiv(Lq, bq), _cdiv(Lk, bk)
    pad = (0, KB * bk - Lk, 0, QB * bq - Lq)
    tiles = lambda t: t.reshape(*t.shape[:-2], QB, bq, KB, bk)  # noqa: E731
    anyv = tiles(torch.nn.functional.pad(mask, pad, value=False)).any(-1).any(-2)
    allv = tiles(torch.nn.functional.pad(mask, pad, value=True)).all(-1).all(-2)
    return (anyv.to(torch.int8) + allv.to(torch.int8)).contiguous()


def _to4d(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() > 4 or t.dim() < 2:
        raise ValueError(f"{what} must have 2 to 4 dims (..., Lq, Lk), got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


class BlockMask:
    """Which (query block, key block) tiles attention visits, and the element rule on partial ones.

    kind: int8 (B or 1, H or 1, ceil(Lq / block_q), ceil(Lk / block_k)): 0 skip, 1 partial,
    2 full. A full tile must allow every (query, key) in it; a skipped one none.
    elem_mask: optional bool (B or 1, H or 1, Lq, Lk), True = attend.
    band: optional (lo, hi): key j is allowed for query i iff lo <= j - i <= hi.
    kv_len: optional int64 (B,): key j is allowed iff j < kv_len[b].
    Build one with the constructors; combine with ``&`` and ``|``.
    """

    def __init__(self, kind: torch.Tensor, block_size: Tuple[int, int], seq_lens: Tuple[int, int], *,
                 elem_mask: Optional[torch.Tensor] = None, band: Optional[Tuple[int, int]] = None,
                 kv_len: Optional[torch.Tensor] = None):
        bq, bk = _block_pair(block_size, kind.device if isinstance(kind, torch.Tensor) else "cpu")
        if not isinstance(seq_lens, (tuple, list, torch.Size)) or len(seq_lens) != 2:
            raise ValueError(f"BlockMask: seq_lens must be (Lq, Lk), got {seq_lens!r}")
        Lq, Lk = _size(seq_lens[0], "Lq", 0), _size(seq_lens[1], "Lk", 0)
        grid = (_cdiv(Lq, bq), _cdiv(Lk, bk))
        if not (isinstance(kind, torch.Tensor) and kind.dtype == torch.int8 and kind.dim() == 4
                and tuple(kind.shape[2:]) == grid):
            got = f"{kind.dtype} {tuple(kind.shape)}" if isinstance(kind, torch.Tensor) else type(kind).__name__
            raise ValueError(f"BlockMask: kind must be int8 of shape (B|1, H|1, {grid[0]}, {grid[1]}) "
                             f"for {Lq}x{Lk} in {bq}x{bk} blocks, got {got}")
        # (Not while compiling: a data-dependent branch; the op checks the kinds again anyway.)
        bad_kind = kind.device.type != "meta" and not torch.compiler.is_compiling()
        if bad_kind and bool(((kind < SKIP) | (kind > FULL)).any()):
            bad = int(kind[(kind < SKIP) | (kind > FULL)][0])
            raise ValueError(f"BlockMask: kind must hold 0 (skip), 1 (partial) or 2 (full), got {bad}")
        if elem_mask is not None:
            if elem_mask.dtype != torch.bool or elem_mask.dim() != 4 or tuple(elem_mask.shape[2:]) != (Lq, Lk):
                raise ValueError(f"BlockMask: elem_mask must be bool of shape (B|1, H|1, {Lq}, {Lk}), got "
                                 f"{elem_mask.dtype} {tuple(elem_mask.shape)}")
        if kv_len is not None and (kv_len.dim() != 1 or kv_len.dtype != torch.int64):
            raise ValueError(f"BlockMask: kv_len must be int64 of shape (B,), got {kv_len.dtype} {tuple(kv_len.shape)}")
        if band is not None:
            if not isinstance(band, (tuple, list)) or len(band) != 2:
                raise ValueError(f"BlockMask: band must be (lo, hi), got {band!r}")
            band = _clamp_band(band[0], band[1], Lq, Lk)
        self.kind, self.block_size, self.seq_lens = kind, (bq, bk), (Lq, Lk)
        self.elem_mask, self.band, self.kv_len = elem_mask, band, kv_len

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_size: Optional[Tuple[int, int]] = None) -> "BlockMask":
        """From a bool mask (Lq, Lk), (H, Lq, Lk) or (B, H, Lq, Lk) (True = attend); sizes 1 broadcast."""
        if mask.dtype != torch.bool:
            raise ValueError(f"BlockMask.from_dense_mask needs a bool mask, got {mask.dtype}")
        mask = _to4d(mask, "BlockMask.from_dense_mask: mask")
        bq, bk = _block_pair(block_size, mask.device)
        return cls(_block_reduce(mask, bq, bk), (bq, bk), mask.shape[-2:], elem_mask=mask)

    @classmethod
    def band_of(cls, Lq: int, Lk: int, lo: int, hi: int, *, block_size=None, device="cpu") -> "BlockMask":
        """Key j allowed for query i iff lo <= j - i <= hi (causal: lo = -inf, hi = 0). Bounds may
        be any integers or +-inf (clamped to the sequences)."""
        Lq, Lk = _size(Lq, "Lq", 0), _size(Lk, "Lk", 0)
        lo, hi = _clamp_band(lo, hi, Lq, Lk)
        bq, bk = _block_pair(block_size, device)
        QB, KB = _cdiv(Lq, bq), _cdiv(Lk, bk)
        bq, bk = _tile(bq, Lq), _tile(bk, Lk)
        qb = torch.arange(QB, device=device)[:, None]
        kb = torch.arange(KB, device=device)[None, :]
        q0, q1 = qb * bq, torch.clamp((qb + 1) * bq, max=Lq) - 1  # first and last query of the tile
        k0, k1 = kb * bk, torch.clamp((kb + 1) * bk, max=Lk) - 1
        dmin, dmax = k0 - q1, k1 - q0  # range of j - i over the tile
        full = (dmin >= lo) & (dmax <= hi)
        skip = (dmax < lo) | (dmin > hi)
        kind = torch.where(full, FULL, torch.where(skip, SKIP, PARTIAL)).to(torch.int8)
        return cls(kind[None, None].contiguous(), _block_pair(block_size, device), (Lq, Lk), band=(lo, hi))

    @classmethod
    def causal(cls, Lq: int, Lk: Optional[int] = None, *, block_size=None, device="cpu") -> "BlockMask":
        """Query i sees keys j <= i (top-left aligned, as SDPA's is_causal)."""
        return cls.band_of(Lq, Lq if Lk is None else Lk, -math.inf, 0, block_size=block_size, device=device)

    @classmethod
    def sliding_window(cls, Lq: int, window: int, *, Lk: Optional[int] = None, causal: bool = True,
                       block_size=None, device="cpu") -> "BlockMask":
        """causal=True: query i sees the `window` keys i - window < j <= i.
        causal=False: it sees |j - i| < window (window - 1 keys on each side and itself)."""
        window = _size(window, "sliding_window's window", 1)
        Lk = Lq if Lk is None else Lk
        return cls.band_of(Lq, Lk, -(window - 1), 0 if causal else window - 1, block_size=block_size, device=device)

    @classmethod
    def key_padding(cls, lengths: torch.Tensor, Lq: int, Lk: Optional[int] = None, *, block_size=None) -> "BlockMask":
        """Batch b attends to its first lengths[b] keys (the rest is padding)."""
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.dtype.is_floating_point:
            raise ValueError(f"BlockMask.key_padding: lengths must be a 1-D integer tensor, got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        Lq = _size(Lq, "Lq", 0)
        Lk = Lq if Lk is None else _size(Lk, "Lk", 0)
        block = _block_pair(block_size, lengths.device)
        lengths = lengths.to(torch.int64).clamp(0, Lk)  # any length past the keys means all of them
        bk = _tile(block[1], Lk)
        k0 = torch.arange(_cdiv(Lk, bk), device=lengths.device) * bk
        k1 = torch.clamp(k0 + bk, max=Lk)
        n = lengths[:, None]
        kind = torch.where(k1[None] <= n, FULL, torch.where(k0[None] >= n, SKIP, PARTIAL)).to(torch.int8)
        kind = kind[:, None, None, :].expand(-1, 1, _cdiv(Lq, block[0]), -1).contiguous()
        return cls(kind, block, (Lq, Lk), kv_len=lengths)

    @classmethod
    def from_flex(cls, block_mask) -> "BlockMask":
        """From a FlexAttention BlockMask (torch.nn.attention.flex_attention): its partial and full
        block lists become kinds, its mask_mod is evaluated once into the element mask."""
        from torch.nn.attention.flex_attention import create_mask

        Lq, Lk = (int(s) for s in block_mask.seq_lengths)
        bq, bk = (int(s) for s in block_mask.BLOCK_SIZE)
        B, H, QB = block_mask.kv_num_blocks.shape
        KB = _cdiv(Lk, bk)
        dev = block_mask.kv_num_blocks.device
        kind = torch.zeros(B, H, QB, KB + 1, dtype=torch.int8, device=dev)  # column KB absorbs padding

        def mark(num, idx, value):
            if num is None:
                return
            valid = torch.arange(idx.shape[-1], device=dev) < num[..., None]
            kind.scatter_(-1, torch.where(valid, idx.long().clamp(max=KB), KB), value)

        mark(block_mask.kv_num_blocks, block_mask.kv_indices, PARTIAL)
        mark(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL)
        kind = kind[..., :KB][:, :, :_cdiv(Lq, bq)].contiguous()
        elem = create_mask(block_mask.mask_mod, B, H, Lq, Lk, device=dev) if block_mask.mask_mod is not None else None
        return cls(kind, (bq, bk), (Lq, Lk), elem_mask=elem)

    # ---- properties and combinations ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.kind.device

    @property
    def sparsity(self) -> float:
        """Fraction of tiles skipped (over the stored batch and head entries)."""
        return float((self.kind == SKIP).float().mean())

    def to_dense(self) -> torch.Tensor:
        """The bool (B|1, H|1, Lq, Lk) mask this BlockMask stands for (True = attend)."""
        (Lq, Lk), (bq, bk) = self.seq_lens, self.block_size
        bq, bk = _tile(bq, Lq), _tile(bk, Lk)
        kind = self.kind.repeat_interleave(bq, 2)[:, :, :Lq].repeat_interleave(bk, 3)[..., :Lk]
        rule = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=self.device)
        if self.elem_mask is not None:
            rule = rule & self.elem_mask
        if self.band is not None:
            d = torch.arange(Lk, device=self.device)[None, :] - torch.arange(Lq, device=self.device)[:, None]
            rule = rule & ((d >= self.band[0]) & (d <= self.band[1]))
        if self.kv_len is not None:
            rule = rule & (torch.arange(Lk, device=self.device) < self.kv_len[:, None, None, None])
        return (kind == FULL) | ((kind == PARTIAL) & rule)

    def _check_same_grid(self, other: "BlockMask", op: str) -> None:
        if not isinstance(other, BlockMask):
            raise TypeError(f"BlockMask {op} needs another BlockMask, got {type(other).__name__}")
        if self.block_size != other.block_size or self.seq_lens != other.seq_lens:
            raise ValueError(f"BlockMask {op}: both masks need the same lengths and block size, got "
                             f"{self.seq_lens} in {self.block_size} and {other.seq_lens} in {other.block_size}")

    def __and__(self, other: "BlockMask") -> "BlockMask":
        """Attend where both masks attend. Element rules stack: a tile is full only if full in both."""
        self._check_same_grid(other, "&")
        elem = self.elem_mask if other.elem_mask is None else (
            other.elem_mask if self.elem_mask is None else self.elem_mask & other.elem_mask)
        band = self.band if other.band is None else (other.band if self.band is None else (
            max(self.band[0], other.band[0]), min(self.band[1], other.band[1])))
        kv = self.kv_len if other.kv_len is None else (
            other.kv_len if self.kv_len is None else torch.minimum(self.kv_len, other.kv_len))
        kind = torch.minimum(self.kind, other.kind).contiguous()  # skip < partial < full
        return BlockMask(kind, self.block_size, self.seq_lens, elem_mask=elem, band=band, kv_len=kv)

    def __or__(self, other: "BlockMask") -> "BlockMask":
        """Attend where either mask attends (the element rule becomes one dense mask)."""
        self._check_same_grid(other, "|")
        kind = torch.maximum(self.kind, other.kind).contiguous()
        return BlockMask(kind, self.block_size, self.seq_lens, elem_mask=self.to_dense() | other.to_dense())

    def __repr__(self) -> str:
        rules = [n for n, v in (("elem_mask", self.elem_mask), ("band", self.band), ("kv_len", self.kv_len)) if v is not None]
        return (f"BlockMask(seq_lens={self.seq_lens}, block_size={self.block_size}, kind={tuple(self.kind.shape)}, "
                f"sparsity={self.sparsity:.2f}, rules={rules})")


# ---------------------------------------------------------------------------------------------
# The op


@torch.library.register_fake("pysparse::masked_attention")
def _masked_attention_fake(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo, band_hi,
                           kv_len, scale, head_mask):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "pysparse: q, k and v must be 4-D")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype, lambda: "pysparse: q, k and v must share a dtype")
    torch._check(k.shape[3] == q.shape[3], lambda: "pysparse: q and k must share the head dim")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


@torch.library.register_fake("pysparse::masked_attention_backward")
def _masked_attention_backward_fake(grad, out, q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo,
                                    band_hi, kv_len, scale, head_mask):
    torch._check(grad.shape == out.shape, lambda: "pysparse: grad and out must have the output's shape")
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     block_mask: Optional[BlockMask] = None, attn_mask: Optional[torch.Tensor] = None,
                     is_causal: bool = False, scale: Optional[float] = None,
                     head_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the active tiles of block_mask only.

    q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H a multiple of Hkv (grouped-query attention
    needs no flag). attn_mask as in F.scaled_dot_product_attention (bool: True = attend; float:
    added to the scores), broadcastable to (B, H, Lq, Lk). block_mask, attn_mask and is_causal
    may be combined: a key must pass all of them. head_mask (H,) bool: heads marked False are
    not computed and return zeros. A query row with no allowed key returns zeros (as SDPA does
    since torch 2.5); attn_mask together with is_causal is allowed (SDPA refuses it).
    NaN and Inf: at the keys the masks allow, as in SDPA (a NaN or +inf score, from q, k or a
    NaN in a float attn_mask, makes the query row NaN; NaN/Inf in v spread to the rows that use
    it). Keys the masks exclude never reach the output through their scores, and skipped tiles
    are not read at all; SDPA computes every score, so a NaN or Inf at an excluded key can make
    its rows NaN where ours are not. (A NaN in v at an excluded key of a computed tile still
    propagates, as 0 * NaN does in SDPA.)
    fp32, bf16 and fp16 (fp32 accumulation).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"pysparse.masked_attention: {name} must be a 4-D tensor (B, H, L, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    Lq, Lk = q.shape[2], k.shape[2]
    bm = block_mask
    if bm is not None:
        if not isinstance(bm, BlockMask):
            raise TypeError(f"pysparse.masked_attention: block_mask must be a pysparse.BlockMask, got {type(bm).__name__}")
        if bm.seq_lens != (Lq, Lk):
            raise ValueError(f"pysparse.masked_attention: block_mask is for {bm.seq_lens[0]}x{bm.seq_lens[1]} "
                             f"but q and k give {Lq}x{Lk}")
        if bm.device != q.device:
            raise ValueError(f"pysparse.masked_attention: block_mask is on {bm.device} but q is on {q.device}")
    block = bm.block_size if bm is not None else default_block_size(q.device)
    if is_causal:
        c = BlockMask.causal(Lq, Lk, block_size=block, device=q.device)
        bm = c if bm is None else bm & c
    bias = None
    if attn_mask is not None:
        am = _to4d(attn_mask, "pysparse.masked_attention: attn_mask")
        if am.device != q.device:
            raise ValueError(f"pysparse.masked_attention: attn_mask is on {am.device} but q is on {q.device}")
        want = (q.shape[0], q.shape[1], Lq, Lk)
        if any(s not in (1, w) for s, w in zip(am.shape, want)):
            raise ValueError(f"pysparse.masked_attention: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to {want}")
        am = am.expand(am.shape[0], am.shape[1], Lq, Lk)  # e.g. (B, 1, 1, Lk) key padding: one row for every query
        if am.dtype == torch.bool:
            m = BlockMask.from_dense_mask(am, block)
        elif am.dtype.is_floating_point:
            bias = am
            # Tiles where the additive mask is -inf everywhere are skipped like masked ones.
            live = _block_reduce(~torch.isneginf(am), *block)
            m = BlockMask(torch.where(live == SKIP, SKIP, FULL).to(torch.int8), block, (Lq, Lk))
        else:
            raise ValueError(f"pysparse.masked_attention: attn_mask must be bool or float, got {am.dtype}")
        bm = m if bm is None else bm & m
    if head_mask is not None and (head_mask.dtype != torch.bool or tuple(head_mask.shape) != (q.shape[1],)):
        raise ValueError(f"pysparse.masked_attention: head_mask must be bool of shape ({q.shape[1]},), got "
                         f"{head_mask.dtype} {tuple(head_mask.shape)}")
    # Head dim 0: every score is 0 whatever the scale (SDPA then averages the allowed values).
    scale = (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else float(scale)
    lo, hi = bm.band if bm is not None and bm.band is not None else (-Lq, Lk)
    return torch.ops.pysparse.masked_attention(
        q, k, v, bm.kind if bm is not None else None, block[0], block[1],
        bm.elem_mask if bm is not None else None, bias, int(lo), int(hi),
        bm.kv_len if bm is not None else None, scale, head_mask)
