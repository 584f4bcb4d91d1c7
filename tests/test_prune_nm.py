"""pysparse.prune.nm: N:M semi-structured pruning (the pruning half of the 2:4 issue)."""
from __future__ import annotations

import pytest
import torch

from pysparse.prune import nm
from conftest import DTYPES, gen, randn


def _W(*shape, dtype=torch.float32, seed=0):
    W = randn(*shape, dtype=dtype, g=gen(seed))
    return torch.where(W == 0, torch.ones_like(W), W)  # every zero of the result was pruned


def _check_groups(W, P, n, m, scores=None):
    assert P.shape == W.shape and P.dtype == W.dtype
    g = P.reshape(*W.shape[:-1], -1, m)
    assert bool(((g != 0).sum(-1) == n).all()), "each group must keep exactly n entries"
    kept = g != 0
    assert torch.equal(P[P != 0], W[P != 0])  # kept entries untouched
    s = (W.abs() if scores is None else torch.broadcast_to(scores, W.shape)).float()
    s = s.reshape(*W.shape[:-1], -1, m)
    kept_min = s.masked_fill(~kept, float("inf")).amin(-1)
    pruned_max = s.masked_fill(kept, -float("inf")).amax(-1)
    assert bool((kept_min >= pruned_max).all()), "a pruned entry outscored a kept one"


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8), (4, 16), (8, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[1] for d in DTYPES])
def test_keeps_exactly_n_largest_per_group(n, m, dtype):
    W = _W(33, 64, dtype=dtype)
    _check_groups(W, nm(W, n, m), n, m)


def test_default_is_2_of_4_and_higher_dims():
    W = _W(3, 5, 32)
    P = nm(W)
    _check_groups(W, P, 2, 4)
    assert torch.equal(nm(W.reshape(15, 32)).reshape(3, 5, 32), P)


def test_scores_choose_instead_of_magnitude():
    W = _W(16, 32)
    x_norm = torch.rand(32, generator=gen(1)) * 10  # per-input-channel activation norm (Wanda)
    scores = W.abs() * x_norm
    P = nm(W, 2, 4, scores=scores)
    _check_groups(W, P, 2, 4, scores=scores)
    # reversed importance keeps exactly the complement of the magnitude choice for 2:4
    Q = nm(W, 2, 4, scores=-W.abs())
    assert torch.equal((Q != 0), (nm(W, 2, 4) == 0))


def test_ties_still_keep_exactly_n():
    W = torch.ones(4, 16)
    P = nm(W, 2, 4)
    assert bool(((P.reshape(4, 4, 4) != 0).sum(-1) == 2).all())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n=2, m=5), r"m must be one of \(4, 8, 16\), got 5"),
    (dict(n=0, m=4), r"n must satisfy 0 < n < m = 4, got 0"),
    (dict(n=4, m=4), r"n must satisfy 0 < n < m = 4, got 4"),
    (dict(n=2, m=8, W=torch.randn(4, 12)), r"the last dimension \(12\) is not a multiple of m = 8"),
    (dict(W=torch.ones(4, 8, dtype=torch.int32)), r"needs a floating-point tensor"),
    (dict(scores=torch.rand(3)), r"scores of shape \(3,\) do not broadcast to W's shape \(4, 8\)"),
    (dict(scores=[1.0] * 8), r"scores must be a tensor, got list"),
])
def test_bad_input(kwargs, msg):
    W = kwargs.pop("W", torch.randn(4, 8))
    with pytest.raises(ValueError, match=msg):
        nm(W, **kwargs)
