"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that also updates the kept weights.

    H = pysparse.prune.hessian(X)                          # X: the layer's inputs (tokens, in)
    W_pruned = pysparse.prune.sparsegpt(W, H, 0.7)          # 70% unstructured
    W_24 = pysparse.prune.sparsegpt(W, H, n=2, m=4)          # 2:4
    W_blk = pysparse.prune.sparsegpt(W, H, 0.5, blocksize=(4, 8))

Layer-wise optimal brain surgeon with the calibration Hessian H = X^T X of the layer's inputs:
the columns (input features) are visited left to right; each column's pruned weights are set
to zero and the error this makes on the layer's output is compensated by updating the columns
not yet visited (w_rest -= (w_i - q_i) / [H^-1]_ii * [H^-1]_{i, rest}, with the inverse Hessian's
upper Cholesky factor, so each column costs one rank-1 update). The mask is chosen a batch of
``lazy`` columns at a time from w^2 / [H^-1]_ii^2 (the OBS saliency), the updates inside a batch
are applied lazily and the rest of the matrix gets one GEMM per batch. ``damp`` (a fraction of
the mean diagonal) regularises H; inputs that are always zero (a dead column of H) have their
weights pruned first and need no compensation.

Unstructured: the ``sparsity`` fraction of each batch's weights (over all rows) is pruned, so
every batch of columns ends at the same sparsity. N:M: in every group of m consecutive inputs of
a row, the m - n least salient are pruned (``n`` kept, pysparse's convention). Blocks: whole
``blocksize`` blocks by their summed saliency, the ``sparsity`` fraction of each batch's blocks
(the batch is a multiple of the block width).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .nm import M_CHOICES


def _error(msg: str) -> ValueError:
    return ValueError("pysparse.prune.sparsegpt: " + msg)


def hessian(inputs: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """X^T X (in fp64) of a layer's inputs X (..., in): what sparsegpt takes. Pass ``out`` to add
    this batch to a running sum (the Hessian of several batches is their sum)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or not inputs.is_floating_point():
        raise ValueError("pysparse.prune.hessian: inputs must be a floating-point tensor (..., in)")
    X = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    H = X.t() @ X
    if out is None:
        return H
    if tuple(out.shape) != tuple(H.shape):
        raise ValueError(f"pysparse.prune.hessian: out has shape {tuple(out.shape)}, this batch's is {tuple(H.shape)}")
    return out.add_(H.to(out.dtype))


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: Optional[float] = None, *, n: Optional[int] = None,
              m: Optional[int] = None, blocksize: Optional[Tuple[int, int]] = None, damp: float = 0.01,
              lazy: int = 128) -> torch.Tensor:
    """W (out, in) pruned by SparseGPT with the input Hessian H (in, in) (``hessian(X)``): a new
    tensor in W's dtype with zeros at the pruned positions and the kept weights updated.

    Give ``sparsity`` (unstructured, or with ``blocksize=(bh, bw)`` whole blocks), or ``n`` and
    ``m`` (n kept in every m consecutive inputs). ``damp``: H += damp * mean(diag H) * I.
    ``lazy``: columns per batch (a multiple of m or bw is used)."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise _error("W must be a 2-D floating-point tensor (out, in)")
    rows, cols = W.shape
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (cols, cols):
        raise _error(f"H must be the ({cols}, {cols}) input Hessian of W's {cols} inputs (pysparse.prune.hessian), got "
                     + (str(tuple(H.shape)) if isinstance(H, torch.Tensor) else type(H).__name__))
    nm = n is not None or m is not None
    if nm:
        if sparsity is not None or blocksize is not None:
            raise _error("give either n and m, or sparsity (with blocksize for blocks)")
        if m not in M_CHOICES or isinstance(n, bool) or not isinstance(n, int) or not 0 < n < m:
            raise _error(f"n:m needs m in {M_CHOICES} and an integer 0 < n < m, got n={n!r}, m={m!r}")
        if cols % m:
            raise _error(f"W's {cols} inputs are not a multiple of m = {m}")
    else:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
            raise _error(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if blocksize is not None:
            if (not isinstance(blocksize, (tuple, list)) or len(blocksize) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocksize)):
                raise _error(f"blocksize must be two positive integers, got {blocksize!r}")
            if rows % blocksize[0] or cols % blocksize[1]:
                raise _error(f"W's shape {(rows, cols)} is not divisible by the block size {tuple(blocksize)}")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp > 0 or not math.isfinite(damp):
        raise _error(f"damp must be a positive number, got {damp!r}")
    if isinstance(lazy, bool) or not isinstance(lazy, int) or lazy < 1:
        raise _error(f"lazy must be a positive integer, got {lazy!r}")
    unit = m if nm else (blocksize[1] if blocksize is not None else 1)
    lazy = max(unit, lazy // unit * unit)

    Wf = W.detach().to(torch.float64).clone()
    Hd = H.detach().to(device=W.device, dtype=torch.float64).clone()
    if not bool(torch.isfinite(Hd).all()):
        raise _error("H holds NaN or Inf")
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    Hd += torch.eye(cols, dtype=torch.float64, device=Hd.device) * (damp * float(torch.diagonal(Hd).mean()))
    try:
        L = torch.linalg.cholesky(Hd)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:
        raise _error("H + damp is not positive definite; raise damp") from None

    keep = torch.ones_like(Wf, dtype=torch.bool)
    for c0 in range(0, cols, lazy):
        c1 = min(cols, c0 + lazy)
        W1 = Wf[:, c0:c1].clone()
        Hi = Hinv[c0:c1, c0:c1]
        d = torch.diagonal(Hi)
        err = torch.zeros_like(W1)
        salience = W1.square() / d.square()
        prune = _batch_mask(salience, sparsity, blocksize) if not nm else None
        for i in range(c1 - c0):
            if nm and i % m == 0:  # this group's m - n least salient
                group = salience[:, i:i + m]
                prune_group = torch.zeros_like(group, dtype=torch.bool)
                prune_group.scatter_(1, torch.topk(group, m - n, dim=1, largest=False).indices, True)
                if prune is None:
                    prune = torch.zeros_like(W1, dtype=torch.bool)
                prune[:, i:i + m] = prune_group
            w = W1[:, i]
            q = torch.where(prune[:, i], 0.0, w)
            e = (w - q) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * Hi[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        keep[:, c0:c1] = ~prune
        Wf[:, c0:c1] = W1
        Wf[:, c1:] -= err @ Hinv[c0:c1, c1:]
    Wf[~keep] = 0.0
    return Wf.to(W.dtype)


def _batch_mask(salience: torch.Tensor, sparsity: float, blocksize) -> torch.Tensor:
    """True where a batch's weights are pruned (unstructured or blocks), from their saliences."""
    if blocksize is None:
        k = int(round(float(sparsity) * salience.numel()))
        prune = torch.zeros(salience.numel(), dtype=torch.bool, device=salience.device)
        if k:
            prune[torch.topk(salience.reshape(-1), k, largest=False).indices] = True
        return prune.view_as(salience)
    bh, bw = blocksize
    R, C = salience.shape
    scores = salience.reshape(R // bh, bh, C // bw, bw).sum(dim=(1, 3))
    k = int(round(float(sparsity) * scores.numel()))
    drop = torch.zeros(scores.numel(), dtype=torch.bool, device=salience.device)
    if k:
        drop[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return drop.view(R // bh, C // bw).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
