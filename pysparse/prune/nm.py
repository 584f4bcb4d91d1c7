"""N:M semi-structured pruning: keep the n most important of every m consecutive weights."""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import NM_CHOICES, keep_largest

#: The group sizes m that N:M pruning and the N:M formats support.
M_CHOICES = tuple(sorted({m for _, m in NM_CHOICES}))


def nm(W: torch.Tensor, n: int = 2, m: int = 4, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero all but the n largest-scoring of every m consecutive entries along the last dimension.

    W: (..., K) floating-point, K a multiple of m. m is 4, 8 or 16 and 0 < n < m (2:4 is what
    sparse tensor cores run). scores: importance of each weight, broadcastable to W (default
    |W|); activation-aware criteria feed it, e.g. ``W.abs() * x_norm`` with ``x_norm`` (K,) the
    per-input-channel norm of calibration activations (Wanda). Exactly n entries of each group are
    kept (which of tied scores is unspecified). Returns a new tensor with W's dtype.
    """
    if not isinstance(W, torch.Tensor) or W.dim() < 1 or not W.is_floating_point():
        raise ValueError("pysparse.prune.nm needs a floating-point tensor with at least 1 dimension")
    if m not in M_CHOICES:
        raise ValueError(f"pysparse.prune.nm: m must be one of {M_CHOICES}, got {m}")
    if not 0 < n < m:
        raise ValueError(f"pysparse.prune.nm: n must satisfy 0 < n < m = {m}, got {n}")
    K = W.shape[-1]
    if K % m:
        raise ValueError(f"pysparse.prune.nm: the last dimension ({K}) is not a multiple of m = {m}")
    if scores is not None:
        if not isinstance(scores, torch.Tensor):
            raise ValueError(f"pysparse.prune.nm: scores must be a tensor, got {type(scores).__name__}")
        try:
            torch.broadcast_to(scores, W.shape)
        except RuntimeError:
            raise ValueError(f"pysparse.prune.nm: scores of shape {tuple(scores.shape)} do not "
                             f"broadcast to W's shape {tuple(W.shape)}") from None
    return keep_largest(W, n, m, scores)
