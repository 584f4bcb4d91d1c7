"""The fused feed-forward block: ``pruned_ffn``.

    y = pysparse.pruned_ffn(x, w1, b1, w2, b2, activation="gelu")                 # BERT-style
    y = pysparse.pruned_ffn(x, w_gate, None, w_down, None, activation="silu", w3=w_up)  # SwiGLU

Each weight may be a dense tensor (e.g. neuron-pruned to a smaller hidden size with
``pysparse.prune.ffn_neurons``), a CSR, BSR or N:M (2:4) format. For ReLU (or ``threshold > 0``)
at decode sizes, pass W2 *transposed in memory* to skip the rows of W2 that meet zero
activations: ``w2 = w2t.t()`` with ``w2t`` (hidden, d) contiguous (see ``transposed_w2``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import activations
from ._loader import _C  # noqa: F401  (loads the library that defines the op)
from .formats import Format


@torch.library.register_fake("pysparse::pruned_ffn")
def _pruned_ffn_fake(x, f1, w1, b1, f2, w2, b2, f3, w3, hidden, activation, threshold):
    torch._check(activation in activations.NAMES, lambda: f"pysparse: activation must be one of {activations.NAMES}")
    return torch.empty_like(x)


def _encode(w, name: str, rows: int, cols: int, x: torch.Tensor, allow_t: bool = False) -> Tuple[str, List[torch.Tensor]]:
    """(format tag, tensors) of one weight in nn.Linear layout (rows, cols)."""
    if isinstance(w, torch.Tensor):
        if w.dim() != 2 or tuple(w.shape) != (rows, cols):
            raise ValueError(f"pysparse.pruned_ffn: {name} must have shape ({rows}, {cols}), got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"pysparse.pruned_ffn: {name} dtype {w.dtype} differs from x's dtype {x.dtype}")
        if allow_t and w.stride(0) == 1 and w.stride(1) == rows and rows > 1:
            return "dense_t", [w.t()]  # stored transposed: the activation-sparse layout
        return "dense", [w]
    if isinstance(w, Format):
        if tuple(w.shape) != (rows, cols):
            raise ValueError(f"pysparse.pruned_ffn: {name} must have shape ({rows}, {cols}), got {tuple(w.shape)}")
        return (f"nm:{w.n}:{w.m}" if w.kind == "nm" else w.kind), w.tensors()
    raise TypeError(f"pysparse.pruned_ffn: {name} must be a tensor, CSR, BSR or SparseNM, got {type(w).__name__}")


def transposed_w2(w2: torch.Tensor) -> torch.Tensor:
    """W2 (d, hidden) with the same values stored transposed (a (d, hidden) view of a contiguous
    (hidden, d) tensor): the layout in which pruned_ffn skips zero activations."""
    return w2.t().contiguous().t()


def pruned_ffn(x: torch.Tensor, w1, b1: Optional[torch.Tensor], w2, b2: Optional[torch.Tensor], *,
               activation: str = "gelu", w3=None, threshold: float = 0.0) -> torch.Tensor:
    """W2 act(W1 x + b1) + b2, or with w3 the gated W2 (act(W1 x + b1) * (W3 x)) + b2, fused.

    x (..., d); w1 and w3 (hidden, d), w2 (d, hidden), nn.Linear layout, each a dense tensor or a
    pysparse CSR / BSR / SparseNM; b1 (hidden,), b2 (d,) or None. activation: none, relu, gelu
    (erf), gelu_tanh or silu. threshold > 0 zeroes intermediate entries with |h| <= threshold
    before the second product (CATS-style activation sparsity: an approximation, exact only when
    those entries are already 0, as after a ReLU). Tokens run in tiles whose intermediate stays in
    cache; with a ReLU or a threshold, a few tokens, and a dense w2 stored transposed
    (``transposed_w2``), only the rows of W2^T at nonzero activations are read.
    fp32, bf16, fp16 (fp32 accumulation inside each product; the intermediate is rounded to x's
    dtype, as the unfused torch sequence does).
    """
    activations.check(activation, "pysparse.pruned_ffn")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("pysparse.pruned_ffn: x must be a tensor of shape (..., d)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"pysparse.pruned_ffn: x must be float32, bfloat16 or float16, got {x.dtype}")
    d = x.shape[-1]
    if not isinstance(w1, (torch.Tensor, Format)):
        raise TypeError(f"pysparse.pruned_ffn: w1 must be a tensor, CSR, BSR or SparseNM, got {type(w1).__name__}")
    hidden = w1.shape[0]
    f1, t1 = _encode(w1, "w1", hidden, d, x)
    f2, t2 = _encode(w2, "w2", d, hidden, x, allow_t=True)
    f3, t3 = ("none", []) if w3 is None else _encode(w3, "w3", hidden, d, x)
    for name, b, n in (("b1", b1, hidden), ("b2", b2, d)):
        if b is not None and (b.dim() != 1 or b.shape[0] != n):
            raise ValueError(f"pysparse.pruned_ffn: {name} must have shape ({n},), got {tuple(b.shape)}")
    if threshold < 0:
        raise ValueError(f"pysparse.pruned_ffn: threshold must be >= 0, got {threshold}")
    if f1 == "dense" and f2 == "dense" and f3 in ("dense", "none") and not threshold and x.device.type == "cpu":
        # All-dense weights, nothing to skip: the op would run exactly these three torch calls on
        # all tokens (one tile; see csrc/cpu/pruned_ffn.cpp). Calling them here saves the custom
        # op's dispatch (~4 us, 9% of a MiniLM decode step).
        h = activations.apply(activation, torch.nn.functional.linear(x, w1, b1))
        if w3 is not None:
            h = h * torch.nn.functional.linear(x, w3)
        return torch.nn.functional.linear(h, w2, b2)
    return torch.ops.pysparse.pruned_ffn(x, f1, t1, b1, f2, t2, b2, f3, t3, hidden, activation, float(threshold))
