"""Magnitude pruning, unstructured and block-structured."""
from __future__ import annotations

from typing import Tuple

import torch


def _check(W: torch.Tensor, sparsity: float, fn: str, min_dim: int = 1) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() < min_dim or not W.is_floating_point():
        raise ValueError(f"pysparse.prune.{fn} needs a floating-point tensor with at least {min_dim} dimension"
                         + ("s" if min_dim > 1 else ""))
    try:  # a Python, numpy or 0-d torch number; not a string or a bool
        ok = not isinstance(sparsity, (bool, str, bytes)) and 0.0 <= float(sparsity) <= 1.0
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"pysparse.prune.{fn}: sparsity must be a number in [0, 1], got {sparsity!r}")


def _rows(W: torch.Tensor) -> torch.Tensor:
    """W as the matrix torch's pruning and the sparse layers see: one row per output channel
    ((Cout, Cin * kh * kw) for a conv weight), a 1-D tensor as one row."""
    return W.reshape(1, -1) if W.dim() == 1 else W.reshape(W.shape[0], -1)


def _keep_top(scores: torch.Tensor, keep: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask of exactly `keep` largest scores along dim (which of tied scores is kept
    is unspecified)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        idx = torch.topk(scores, keep, dim=dim, sorted=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def block_scores(x: torch.Tensor, bh: int, bw: int, norm: str = "l2") -> torch.Tensor:
    """(M, K) -> (M / bh, K / bw): per (bh, bw) block, the sum of |x| (l1) or of x^2 (l2), the
    ranking `blocks` prunes by (M and K multiples of bh and bw)."""
    M, K = x.shape
    b = x.reshape(M // bh, bh, K // bw, bw)
    return b.abs().sum(dim=(1, 3)) if norm == "l1" else b.square().sum(dim=(1, 3))


def expand_blocks(mask: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Block mask (R, C) -> element mask (R * bh, C * bw), each block's entry repeated over it."""
    R, C = mask.shape
    return mask[:, None, :, None].expand(R, bh, C, bw).reshape(R * bh, C * bw)


def magnitude(W: torch.Tensor, sparsity: float, *, per_row: bool = False) -> torch.Tensor:
    """Zero the smallest-|w| fraction `sparsity` of W (exactly round(sparsity * count) entries).

    W may have any shape, as with torch.nn.utils.prune. per_row=False ranks the whole tensor
    (global within the layer); per_row=True prunes every output row (output channel of a conv
    weight: its Cin * kh * kw entries) to the same sparsity, which balances work across rows for
    the kernels.
    """
    _check(W, sparsity, "magnitude")
    scores = W.detach().abs().float()
    if per_row:
        rows = _rows(scores)
        keep = rows.shape[1] - round(sparsity * rows.shape[1])
        mask = _keep_top(rows, keep, dim=1).view_as(W)
    else:
        keep = W.numel() - round(sparsity * W.numel())
        mask = _keep_top(scores.flatten(), keep).view_as(W)
    return W * mask


def blocks(W: torch.Tensor, sparsity: float, blocksize: Tuple[int, int] = (32, 32), *,
           norm: str = "l2") -> torch.Tensor:
    """Zero whole (bh, bw) blocks: the fraction `sparsity` of blocks with the smallest norm.

    norm is "l2" (Frobenius) or "l1"; blocksize an int (square blocks) or (bh, bw). A weight of
    more than 2 dimensions is blocked as its (rows, rest) matrix (a conv weight: (Cout, Cin * kh *
    kw)); the matrix must be divisible by the block size.
    """
    _check(W, sparsity, "blocks", min_dim=2)
    if isinstance(blocksize, int):
        blocksize = (blocksize, blocksize)
    bh, bw = (int(b) for b in blocksize)
    shape, W = W.shape, _rows(W)
    M, K = W.shape
    if bh <= 0 or bw <= 0 or M % bh or K % bw:
        raise ValueError(f"pysparse.prune.blocks: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"pysparse.prune.blocks: norm must be 'l1' or 'l2', got {norm!r}")
    scores = block_scores(W.detach().float(), bh, bw, norm)
    nblocks = scores.numel()
    mask = _keep_top(scores.flatten(), nblocks - round(sparsity * nblocks)).view_as(scores)
    return (W * expand_blocks(mask, bh, bw)).view(shape)
