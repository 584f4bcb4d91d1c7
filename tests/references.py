"""The references the tests compare pysparse against: the dense math of each op in float64 (on the
already-rounded inputs), written once. Tolerances are conftest.TOL's; `UNIT` (the unit roundoff
per dtype) is derived from it here for the error budgets of attention and the fused FFN."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from pysparse import activations
from conftest import TOL

# u = 2**-p of a p-bit significand; TOL.out is 2u (one rounding, with a factor 2 of margin).
UNIT = {dtype: tol.out / 2 for dtype, tol in TOL.items()}


def reference_spmm(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A @ X from the dense A (any format), in float64; X may be a batch (..., K, n)."""
    return W.double() @ X.double()


def reference_linear(x: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: str = "none") -> torch.Tensor:
    """act(x @ A.T + bias) from the dense A, in float64."""
    y = x.double() @ W.double().T
    if bias is not None:
        y = y + bias.double()
    return activations.apply(activation, y)


def reference_masked_attention(q, k, v, allowed, scale=None, bias=None) -> torch.Tensor:
    """softmax(q k^T scale + bias) v over the allowed keys, in float64, on the CPU.

    allowed: bool broadcastable to (B, H, Lq, Lk); fewer k/v heads than q heads are repeated
    (grouped-query attention). A bias of -inf excludes its key whatever the score; a row with no
    allowed key gives zeros (SDPA since torch 2.5); a NaN or +inf score at an allowed key makes
    its row NaN, as in SDPA (amax propagates NaN; inf - inf is NaN)."""
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    B, H, Lq = q.shape[:3]
    Lk = k.shape[2]
    if Lk == 0:
        return torch.zeros(B, H, Lq, v.shape[3], dtype=torch.float64)
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    allowed = allowed.cpu().bool().expand(B, H, Lq, Lk)
    if bias is not None:
        bias = bias.cpu().double().expand(B, H, Lq, Lk)
        allowed = allowed & (bias != -math.inf)
        s = s + torch.where(bias == -math.inf, 0.0, bias)
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(m == -math.inf, 0.0, m)).masked_fill(~allowed, 0.0)
    den = p.sum(-1, keepdim=True)
    return torch.where(m == -math.inf, 0.0, (p @ v) / torch.where(den == 0, 1.0, den))


def reference_pruned_ffn(x, w1, b1, w2, b2, activation, w3=None, threshold=0.0, dtype=torch.float64):
    """The unfused FFN, W2 g(x) + b2 with g = act(W1 x + b1) [* W3 x] [zeroed where |g| <=
    threshold], in `dtype` (float64 for the reference; the input dtype for torch's own error)."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    h = activations.apply(activation, F.linear(c(x), c(w1), c(b1)))
    if w3 is not None:
        h = h * F.linear(c(x), c(w3))
    if threshold:
        h = torch.where(h.abs() <= threshold, torch.zeros_like(h), h)
    return F.linear(h, c(w2), c(b2))
