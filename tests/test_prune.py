"""pysparse.prune.magnitude and pysparse.prune.blocks."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pysparse
from pysparse import BSR, CSR
from pysparse.prune import blocks, magnitude
from conftest import DTYPES, gen, randn

SPARSITIES = (0.0, 0.1, 0.25, 0.5, 0.9, 0.999, 1.0)


def _W(M, K, dtype=torch.float32, seed=0):
    """Gaussian weights with no zeros (so every zero of the result was pruned)."""
    W = randn(M, K, dtype=dtype, g=gen(seed))
    return torch.where(W == 0, torch.ones_like(W), W)


def _check_magnitude(W, P, n_pruned, mask_dims=None):
    assert P.shape == W.shape and P.dtype == W.dtype
    pruned = P == 0
    assert int(pruned.sum()) == n_pruned
    assert torch.equal(P[~pruned], W[~pruned])  # kept entries are untouched
    if 0 < n_pruned < W.numel():  # (per row, with mask_dims=1)
        kept_min = W.abs().float().masked_fill(pruned, float("inf")).amin(dim=mask_dims)
        pruned_max = W.abs().float().masked_fill(~pruned, -1.0).amax(dim=mask_dims)
        assert bool((kept_min >= pruned_max).all()), "a pruned entry is larger than a kept one"


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(7, 33), (127, 64), (768, 3072)])
def test_magnitude_exact_count_and_largest_kept(shape, sparsity):
    W = _W(*shape)
    P = magnitude(W, sparsity)
    _check_magnitude(W, P, round(sparsity * W.numel()))
    assert CSR.from_dense(P).nnz == W.numel() - round(sparsity * W.numel())


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_per_row(sparsity):
    W = _W(33, 127)
    P = magnitude(W, sparsity, per_row=True)
    per_row = round(sparsity * 127)
    assert (P == 0).sum(dim=1).tolist() == [per_row] * 33
    _check_magnitude(W, P, per_row * 33, mask_dims=1)  # the largest are kept within every row
    A = CSR.from_dense(P)
    assert A.crow_indices.diff().tolist() == [127 - per_row] * 33


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_magnitude_dtypes_and_input_untouched(dtype):
    W = _W(16, 48, dtype)
    before = W.clone()
    P = magnitude(W, 0.75)
    assert torch.equal(W, before) and P.dtype == dtype
    _check_magnitude(W, P, 576)


def test_magnitude_ties_still_give_exact_counts():
    W = torch.ones(8, 8)
    assert int((magnitude(W, 0.5) == 0).sum()) == 32
    assert (magnitude(W, 0.25, per_row=True) == 0).sum(dim=1).tolist() == [2] * 8
    assert torch.equal(magnitude(torch.zeros(0, 5), 0.5), torch.zeros(0, 5))


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 20), K=st.integers(1, 20), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       per_row=st.booleans())
def test_magnitude_property(M, K, sparsity, seed, per_row):
    W = _W(M, K, seed=seed)
    P = magnitude(W, sparsity, per_row=per_row)
    if per_row:
        assert (P == 0).sum(dim=1).tolist() == [round(sparsity * K)] * M
        _check_magnitude(W, P, M * round(sparsity * K), mask_dims=1)
    else:
        _check_magnitude(W, P, round(sparsity * M * K))


def _block_view(P, bs):
    M, K = P.shape
    return P.reshape(M // bs[0], bs[0], K // bs[1], bs[1]).transpose(1, 2)  # (Mb, Kb, bh, bw)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape,bs", [((32, 64), (4, 8)), ((21, 25), (3, 5)), ((768, 3072), (32, 32)), ((7, 33), (1, 1))])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_blocks_zero_whole_blocks(shape, bs, sparsity, norm):
    W = _W(*shape)
    P = blocks(W, sparsity, bs, norm=norm)
    assert P.shape == W.shape and P.dtype == W.dtype
    Pb, Wb = _block_view(P, bs), _block_view(W, bs)
    zero = (Pb == 0).flatten(2).all(2)
    n_blocks = zero.numel()
    assert int(zero.sum()) == round(sparsity * n_blocks)
    assert torch.equal(Pb[~zero], Wb[~zero])  # kept blocks are untouched, pruned ones wholly zero
    assert int((P == 0).sum()) == int(zero.sum()) * bs[0] * bs[1]
    score = Wb.abs().flatten(2).sum(2) if norm == "l1" else Wb.square().flatten(2).sum(2)
    if 0 < int(zero.sum()) < n_blocks:
        assert float(score[~zero].min()) >= float(score[zero].max())
    A = BSR.from_dense(P, bs)
    assert A.values.shape[0] == n_blocks - round(sparsity * n_blocks)


def test_blocks_norm_choice_matters():
    """Block a = [3, 0, 0, 0] and block b = [1, 1, 1, 1]: l1 keeps b (4 > 3), l2 keeps a (9 > 4)."""
    W = torch.tensor([[3.0, 0, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(blocks(W, 0.5, (2, 2), norm="l1"), torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]))
    assert torch.equal(blocks(W, 0.5, (2, 2), norm="l2"), torch.tensor([[3.0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(blocks(W, 0.5, (2, 2)), blocks(W, 0.5, (2, 2), norm="l2"))  # l2 is the default


def test_blocks_default_blocksize_and_dtypes():
    for dtype in DTYPES:
        W = _W(64, 96, dtype)
        P = blocks(W, 0.5)  # (32, 32): 6 blocks, 3 pruned
        assert P.dtype == dtype and int((P == 0).sum()) == 3 * 32 * 32


@pytest.mark.parametrize("fn", ["magnitude", "blocks"])
@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_bad_sparsity(fn, sparsity):
    f = getattr(pysparse.prune, fn)
    with pytest.raises(ValueError, match=rf"pysparse\.prune\.{fn}: sparsity must be a number in \[0, 1\], got {re.escape(repr(sparsity))}"):
        f(torch.ones(4, 4), sparsity) if fn == "magnitude" else f(torch.ones(4, 4), sparsity, (2, 2))


@pytest.mark.parametrize("fn", ["magnitude", "blocks"])
@pytest.mark.parametrize("W", [torch.ones(4, 4, dtype=torch.int64), [[1.0]], torch.tensor(1.0)], ids=["int", "list", "0-D"])
def test_bad_weight(fn, W):
    dims = "1 dimension" if fn == "magnitude" else "2 dimensions"
    with pytest.raises(ValueError, match=rf"pysparse\.prune\.{fn} needs a floating-point tensor with at least {dims}"):
        getattr(pysparse.prune, fn)(W, 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\], got '0.5'"):
        getattr(pysparse.prune, fn)(torch.ones(4, 4), "0.5")


def test_any_weight_shape_as_torch_prunes_it():
    """A conv weight (Cout, Cin, kh, kw) or a 1-D tensor prunes like torch.nn.utils.prune: globally
    over its entries, per output channel with per_row, blocked as its (Cout, Cin * kh * kw) matrix."""
    g = gen(21)
    W = torch.randn(8, 4, 3, 3, generator=g)
    out = pysparse.prune.magnitude(W, 0.75)
    assert out.shape == W.shape and int((out == 0).sum()) == round(0.75 * W.numel())
    assert torch.equal(out, pysparse.prune.magnitude(W.reshape(8, -1), 0.75).view_as(W))
    rows = pysparse.prune.magnitude(W, 0.5, per_row=True)
    assert ((rows.reshape(8, -1) == 0).sum(1) == 18).all()
    C = torch.randn(8, 4, 2, 2, generator=g)  # blocked as its (8, 16) matrix: 2 x 4 blocks of 4 x 4
    b = pysparse.prune.blocks(C, 0.5, 4)
    assert b.shape == C.shape and torch.equal(b, pysparse.prune.blocks(C.reshape(8, 16), 0.5, (4, 4)).view_as(C))
    assert int((b == 0).sum()) == 4 * 16
    v = torch.randn(10, generator=g)
    assert int((pysparse.prune.magnitude(v, 0.3) == 0).sum()) == 3


@pytest.mark.parametrize("bs", [(4, 4), (4, 5), (0, 1), (1, -1)])
def test_blocks_not_divisible(bs):
    with pytest.raises(ValueError, match=r"pysparse\.prune\.blocks: shape \(6, 10\) is not divisible by the block size "
                       + re.escape(str(bs))):
        blocks(torch.ones(6, 10), 0.5, bs)


def test_blocks_bad_norm():
    with pytest.raises(ValueError, match=r"pysparse\.prune\.blocks: norm must be 'l1' or 'l2', got 'linf'"):
        blocks(torch.ones(4, 4), 0.5, (2, 2), norm="linf")
