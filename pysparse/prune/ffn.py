"""Structured (neuron) pruning of feed-forward blocks: drop whole intermediate neurons, which
leaves smaller *dense* weights that run faster anywhere."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch


class PrunedFFN(NamedTuple):
    """Weights after neuron pruning. With keep_shape=False they are sliced to the kept neurons
    (w1 (k, d), b1 (k,), w2 (d, k), w3 (k, d)); with keep_shape=True they keep their shapes and
    the dropped neurons' rows/columns are zero. ``kept``: ascending indices of the kept neurons."""
    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    w3: Optional[torch.Tensor]
    kept: torch.Tensor


def neuron_norms(w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor] = None, p: int = 2) -> torch.Tensor:
    """Per intermediate neuron j: ||W1[j, :]||_p + ||W2[:, j]||_p (+ ||W3[j, :]||_p), in fp64."""
    with torch.no_grad():
        score = w1.double().norm(p=p, dim=1) + w2.double().norm(p=p, dim=0)
        if w3 is not None:
            score = score + w3.double().norm(p=p, dim=1)
    return score


def ffn_neurons(w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, ratio: float,
                criterion: Union[str, torch.Tensor] = "l1", *, w3: Optional[torch.Tensor] = None,
                keep_shape: bool = False) -> PrunedFFN:
    """Drop the fraction ``ratio`` of intermediate neurons of y = W2 act(W1 x + b1) [* W3 x].

    w1 (h, d), w2 (d, h), w3 (h, d) in nn.Linear layout. Importance of neuron j:
    "l1": ||W1[j, :]||_1 + ||W2[:, j]||_1 (+ ||W3[j, :]||_1); "l2": the same with L2 norms; or a
    tensor of h scores (e.g. mean |activation| over calibration data, or a Taylor estimate).
    The round(h * (1 - ratio)) most important neurons are kept (at least one), in their original
    order, so the pruned block computes the original one minus the dropped neurons' terms.
    """
    if w1.dim() != 2 or w2.dim() != 2 or w2.shape != (w1.shape[1], w1.shape[0]):
        raise ValueError(f"pysparse.prune.ffn_neurons: need w1 (h, d) and w2 (d, h), got {tuple(w1.shape)} "
                         f"and {tuple(w2.shape)}")
    h = w1.shape[0]
    if w3 is not None and w3.shape != w1.shape:
        raise ValueError(f"pysparse.prune.ffn_neurons: w3 must have w1's shape {tuple(w1.shape)}, got {tuple(w3.shape)}")
    if b1 is not None and b1.shape != (h,):
        raise ValueError(f"pysparse.prune.ffn_neurons: b1 must have shape ({h},), got {tuple(b1.shape)}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"pysparse.prune.ffn_neurons: ratio must be in [0, 1), got {ratio}")
    if isinstance(criterion, torch.Tensor):
        if criterion.shape != (h,):
            raise ValueError(f"pysparse.prune.ffn_neurons: scores must have shape ({h},), got {tuple(criterion.shape)}")
        score = criterion.detach().double().to(w1.device)
    elif criterion in ("l1", "l2"):
        score = neuron_norms(w1, w2, w3, p=1 if criterion == "l1" else 2)
    else:
        raise ValueError(f"pysparse.prune.ffn_neurons: criterion must be 'l1', 'l2' or a tensor of scores, got {criterion!r}")
    keep = max(1, round(h * (1.0 - float(ratio))))
    kept = torch.sort(torch.topk(score, keep, sorted=False).indices).values
    with torch.no_grad():
        if keep_shape:
            on = torch.zeros(h, dtype=torch.bool, device=w1.device)
            on[kept] = True
            z = lambda t, dim: t * on.view(-1, 1).to(t.dtype) if dim == 0 else t * on.view(1, -1).to(t.dtype)  # noqa: E731
            return PrunedFFN(z(w1, 0), None if b1 is None else b1 * on.to(b1.dtype), z(w2, 1),
                             None if w3 is None else z(w3, 0), kept)
        return PrunedFFN(w1[kept].clone(), None if b1 is None else b1[kept].clone(), w2[:, kept].clone(),
                         None if w3 is None else w3[kept].clone(), kept)
