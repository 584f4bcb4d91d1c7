"""Backward of the BSR and N:M ops and of the modules built on them (pysparse/autograd.py).

Gradients of bsr_linear / bsr_spmm / nm_linear (every fused activation) / nm_spmm w.r.t. the
dense operand, the stored values and the bias against the fp64 dense computation on the same
pattern (every dtype and ISA, block shapes, N:M ratios, odd shapes, batches), within the forward's
error budget; opcheck with autograd; SparseLinear and SparseConv2d train in every format (their
gradients against nn.Linear / nn.Conv2d on the pruned weights, the dense fall-back, a short
training against masked dense training); torch.compile of forward + backward; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import BSR, SparseNM
from pysparse.autograd import nm_pattern
from pysparse.nn import SparseConv2d, SparseLinear
from conftest import TOL, assert_close, gen, randn, train_losses

ops = torch.ops.pysparse


def _bsr(M, K, blocksize, dtype, seed, index_dtype=None):
    g = gen(seed)
    bh, bw = blocksize
    keep = torch.rand(M // bh, K // bw, generator=g) < 0.4
    keep[0] = False  # an empty block row
    W = torch.randn(M, K, generator=g) * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    W = W.to(dtype)
    return W, BSR.from_dense(W, blocksize=blocksize, index_dtype=index_dtype)


def _nm(M, K, n, m, dtype, seed):
    A = SparseNM.from_dense(torch.randn(M, K, generator=gen(seed)).to(dtype), n, m, prune=True)
    return A.to_dense(), A


def _dense_grads(W, x, b, g, activation="none"):
    """fp64 gradients (dx, dW, db) of act(x W^T + b) and their magnitudes' bound (|.| products)."""
    Wd = W.double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    pysparse.activations.apply(activation, F.linear(xd, Wd, bd)).backward(g.double())
    return xd.grad, Wd.grad, None if bd is None else bd.grad


def _abs_bounds(W, x, g):
    g2, x2 = g.double().abs().reshape(-1, W.shape[0]), x.double().abs().reshape(-1, W.shape[1])
    return (g2 @ W.double().abs()).reshape(x.shape), g2.t() @ x2, g2.sum(0)


def _block_entries(A: BSR, dense: torch.Tensor) -> torch.Tensor:
    """The (nnzb, bh, bw) blocks of a dense (M, K) tensor at A's stored blocks."""
    bh, bw = A.blocksize
    M, K = A.shape
    rows = torch.repeat_interleave(torch.arange(M // bh), A.crow_indices.diff().long())
    blocks = dense.reshape(M // bh, bh, K // bw, bw).transpose(1, 2)
    return blocks[rows, A.col_indices.long()]


# ---------------------------------------------------------------------------------------------
# The ops' gradients

@pytest.mark.parametrize("M,K,blocksize,xshape", [(16, 24, (4, 8), (5,)), (64, 96, (16, 16), (2, 9)),
                                                  (8, 8, (8, 8), (1,)), (6, 9, (3, 3), (3, 7)),
                                                  (64, 64, (32, 32), (33,))])
@pytest.mark.parametrize("bias", [False, True])
def test_bsr_linear_gradients(isa, dtype, M, K, blocksize, xshape, bias):
    W, A = _bsr(M, K, blocksize, dtype, M + K)
    x = randn(*xshape, K, dtype=dtype, g=gen(1)).requires_grad_()
    b = randn(M, dtype=dtype, g=gen(2)).requires_grad_() if bias else None
    v = A.values.clone().requires_grad_()
    y = ops.bsr_linear(x, A.crow_indices, A.col_indices, v, [M, K], b)
    g = randn(*y.shape, dtype=dtype, g=gen(3))
    y.backward(g)
    dx, dW, db = _dense_grads(W, x, b, g)
    adx, adW, adb = _abs_bounds(W, x, g)
    assert_close(x.grad, dx, adx, dtype, what="dx")
    assert_close(v.grad, _block_entries(A, dW), _block_entries(A, adW), dtype, what="dvalues")
    if bias:
        assert_close(b.grad, db, adb, dtype, what="dbias")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dshape", [(48, 5), (2, 48, 9), (1, 48, 1)])
def test_bsr_spmm_gradients(isa, dtype, index_dtype, dshape):
    M, K = 32, 48
    W, A = _bsr(M, K, (8, 4), dtype, 7, index_dtype)
    X = randn(*dshape, dtype=dtype, g=gen(8)).requires_grad_()
    v = A.values.clone().requires_grad_()
    Y = ops.bsr_spmm(A.crow_indices, A.col_indices, v, [M, K], X)
    G = randn(*Y.shape, dtype=dtype, g=gen(9))
    Y.backward(G)
    Wd, Gd, Xd = W.double(), G.double(), X.detach().double()
    assert_close(X.grad, Wd.t() @ Gd, Wd.t().abs() @ Gd.abs(), dtype, what="dX")
    dW = (Gd @ Xd.transpose(-1, -2)).reshape(-1, M, K).sum(0)
    dWabs = (Gd.abs() @ Xd.abs().transpose(-1, -2)).reshape(-1, M, K).sum(0)
    assert_close(v.grad, _block_entries(A, dW), _block_entries(A, dWabs), dtype, what="dvalues")


def test_bsr_values_gradient_in_chunks(monkeypatch):
    """Many blocks: the batched block products run in chunks (bounded scratch), same result."""
    W, A = _bsr(64, 64, (4, 4), torch.float32, 3)
    x, g = torch.randn(50, 64, generator=gen(4)), torch.randn(50, 64, generator=gen(5))

    def dvalues():
        v = A.values.clone().requires_grad_()
        ops.bsr_linear(x, A.crow_indices, A.col_indices, v, [64, 64], None).backward(g)
        return v.grad

    whole = dvalues()
    monkeypatch.setattr(pysparse.autograd, "_BMM_BYTES", 50 * 8 * 4 * 3)  # 3 blocks per chunk
    torch.testing.assert_close(dvalues(), whole)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 16)])
@pytest.mark.parametrize("activation", pysparse.activations.NAMES)
@pytest.mark.parametrize("xshape", [(5,), (2, 9)])
def test_nm_linear_gradients(isa, dtype, nm, activation, xshape):
    n, m = nm
    M, K = 13, 4 * m
    W, A = _nm(M, K, n, m, dtype, M + K + n)
    x = randn(*xshape, K, dtype=dtype, g=gen(1)).requires_grad_()
    b = randn(M, dtype=dtype, g=gen(2)).requires_grad_()
    v = A.values.clone().requires_grad_()
    y = ops.nm_linear(x, v, A.mask, [M, K], n, m, b, activation)
    g = randn(*y.shape, dtype=dtype, g=gen(3))
    y.backward(g)
    dx, dW, db = _dense_grads(W, x, b, g, activation)
    gscale, rounding = g, 1.0
    if activation not in ("none", "relu"):
        # The gradient at z = x W^T + b is g act'(z) with z (recomputed) and the product each
        # rounded to the dtype, as torch's unfused bf16 sequence rounds them: act' <= 1.13 and
        # |act''| <= 1, so its error is up to 2 eps |g| (1 + |z|), eps the dtype's rounding.
        absz = F.linear(x.detach().double().abs(), W.double().abs(), b.detach().double().abs())
        gscale = g.double().abs() * (1 + absz)
        rounding = max(1.0, 2 * TOL[dtype].out / TOL[dtype].acc)
    adx, adW, adb = (t * rounding for t in _abs_bounds(W, x, gscale))
    kept = A.kept_mask()
    assert_close(x.grad, dx, adx, dtype, what="dx")
    assert_close(v.grad, dW[kept].view(v.shape), adW[kept].view(v.shape), dtype, what="dvalues")
    assert_close(b.grad, db, adb, dtype, what="dbias")


@pytest.mark.parametrize("dshape", [(32, 5), (2, 32, 9), (1, 32, 1)])
def test_nm_spmm_gradients(isa, dtype, dshape):
    M, K = 20, 32
    W, A = _nm(M, K, 2, 4, dtype, 11)
    X = randn(*dshape, dtype=dtype, g=gen(8)).requires_grad_()
    v = A.values.clone().requires_grad_()
    Y = ops.nm_spmm(v, A.mask, [M, K], 2, 4, X)
    G = randn(*Y.shape, dtype=dtype, g=gen(9))
    Y.backward(G)
    Wd, Gd, Xd = W.double(), G.double(), X.detach().double()
    assert_close(X.grad, Wd.t() @ Gd, Wd.t().abs() @ Gd.abs(), dtype, what="dX")
    kept = A.kept_mask()
    dW = (Gd @ Xd.transpose(-1, -2)).reshape(-1, M, K).sum(0)
    dWabs = (Gd.abs() @ Xd.abs().transpose(-1, -2)).reshape(-1, M, K).sum(0)
    assert_close(v.grad, dW[kept].view(v.shape), dWabs[kept].view(v.shape), dtype, what="dvalues")


def test_nm_pattern_is_the_kept_positions_and_is_cached():
    W, A = _nm(9, 48, 3, 8, torch.float32, 1)
    mask = A.mask.clone()
    crow, col = nm_pattern(mask, 9, 48, 3, 8)
    assert nm_pattern(mask, 9, 48, 3, 8)[1] is col
    rows = torch.repeat_interleave(torch.arange(9), crow.diff().long())
    dense = torch.zeros(9, 48).index_put_((rows, col.long()), A.values.reshape(-1))
    torch.testing.assert_close(dense, W)
    mask[0, 0] = 0  # written in place: no longer valid, rebuilt, and refused
    with pytest.raises(ValueError, match="the N:M mask marks"):
        nm_pattern(mask, 9, 48, 3, 8)


def test_mask_or_values_changed_between_forward_and_backward():
    W, A = _nm(8, 16, 2, 4, torch.float32, 2)
    mask, v = A.mask.clone(), A.values.clone().requires_grad_()
    y = ops.nm_linear(torch.randn(3, 16), v, mask, [8, 16], 2, 4, None, "gelu")
    mask.fill_(0b0011_0011)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    W, B = _bsr(16, 16, (4, 4), torch.float32, 3)
    col = B.col_indices.clone()
    y = ops.bsr_linear(torch.randn(3, 16), B.crow_indices, col, B.values.clone().requires_grad_(), [16, 16], None)
    col.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_threads_do_not_change_gradients():
    _, A = _bsr(128, 96, (8, 8), torch.float32, 4)
    _, N = _nm(96, 128, 2, 4, torch.float32, 5)
    x = torch.randn(64, 96, generator=gen(6))
    xn = torch.randn(64, 128, generator=gen(7))

    def grads():
        v, xx = A.values.clone().requires_grad_(), x.clone().requires_grad_()
        ops.bsr_linear(xx, A.crow_indices, A.col_indices, v, [128, 96], None).square().sum().backward()
        vn, xxn = N.values.clone().requires_grad_(), xn.clone().requires_grad_()
        ops.nm_linear(xxn, vn, N.mask, [96, 128], 2, 4, None, "silu").square().sum().backward()
        return v.grad, xx.grad, vn.grad, xxn.grad

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(max(2, prev))
        many = grads()
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_opcheck_with_gradients():
    _, A = _bsr(16, 24, (4, 8), torch.float32, 5)
    v = A.values.clone().requires_grad_()
    x, b = torch.randn(3, 24, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.library.opcheck(ops.bsr_linear.default, (x, A.crow_indices, A.col_indices, v, [16, 24], b))
    torch.library.opcheck(ops.bsr_spmm.default, (A.crow_indices, A.col_indices, v, [16, 24],
                                                 torch.randn(24, 5, requires_grad=True)))
    _, N = _nm(12, 16, 2, 4, torch.float32, 6)
    vn = N.values.clone().requires_grad_()
    for act in ("none", "relu", "gelu_tanh"):
        torch.library.opcheck(ops.nm_linear.default, (torch.randn(3, 16, requires_grad=True), vn, N.mask, [12, 16],
                                                      2, 4, torch.randn(12, requires_grad=True), act))
    torch.library.opcheck(ops.nm_spmm.default, (vn, N.mask, [12, 16], 2, 4, torch.randn(16, 5, requires_grad=True)))


# ---------------------------------------------------------------------------------------------
# Modules

LINEAR_FORMATS = {"bsr": dict(sparsity=0.5, blocksize=(8, 8)), "nm": dict(n=2, m=4)}


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_sparse_linear_gradients_match_nn_linear_and_the_dense_fallback(fmt):
    kw = LINEAR_FORMATS.get(fmt, dict(sparsity=0.7))
    lin = torch.nn.Linear(48, 32)
    sl = SparseLinear.from_linear(lin, fmt, **kw)
    ref = sl.to_linear()
    x = torch.randn(2, 7, 48, generator=gen(1))
    got = {}
    for kernel in ("sparse", "dense"):
        sl.train_kernel = kernel
        sl.zero_grad()
        xi = x.clone().requires_grad_()
        sl(xi).square().sum().backward()
        got[kernel] = (xi.grad, sl.weight_values.grad.clone(), sl.bias.grad.clone())
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    dW = ref.weight.grad
    if fmt == "nm":
        want_v = dW[sl.weight.kept_mask()].view(sl.weight_values.shape)
    elif fmt == "bsr":
        want_v = _block_entries(sl.weight, dW)
    else:
        want_v = dW[sl.weight.to_dense() != 0]
    for kernel, (dx, dv, db) in got.items():
        torch.testing.assert_close(dx, xr.grad, rtol=1e-4, atol=1e-4, msg=f"{kernel} dx")
        torch.testing.assert_close(dv, want_v, rtol=1e-4, atol=1e-4, msg=f"{kernel} dvalues")
        torch.testing.assert_close(db, ref.bias.grad, rtol=1e-4, atol=1e-4, msg=f"{kernel} dbias")


def _mlp(fmt: str, sparse: bool):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    if sparse:
        for i in (0, 2):
            net[i] = SparseLinear.from_linear(net[i], fmt, **LINEAR_FORMATS[fmt])
            net[i].train_kernel = "sparse"
    return net


@pytest.mark.parametrize("fmt", ["bsr", "nm"])
def test_sparse_mlp_trains_like_the_masked_dense_one(fmt):
    """200 Adam steps on a synthetic regression: the BSR / 2:4 model and the dense model with
    the same masks re-applied after every step reach the same loss (within 2%)."""
    g = gen(11)
    X = torch.randn(512, 32, generator=g)
    y = X[:, :8].sin() + 0.1 * torch.randn(512, 8, generator=g)
    sparse, dense = _mlp(fmt, True), _mlp(fmt, False)
    masks = []
    for i in (0, 2):
        with torch.no_grad():
            dense[i].weight.copy_(sparse[i].weight.to_dense())
            dense[i].bias.copy_(sparse[i].bias)
        masks.append((dense[i].weight, sparse[i].weight.to_dense() != 0))
    losses = train_losses({"sparse": sparse, "dense": dense}, X, y, masks, steps=200, lr=1e-2)
    with torch.no_grad():
        untrained = float(F.mse_loss(_mlp(fmt, True)(X), y))
    assert losses["sparse"] < 0.5 * untrained
    assert abs(losses["sparse"] - losses["dense"]) <= 0.02 * losses["dense"], losses
    if fmt == "nm":  # still 2:4 after training
        SparseNM.from_dense(sparse[0].weight.to_dense(), 2, 4)


CONV_CASES = [("csr", (8, 12, 3, 1, 1, 1, 1)), ("csr", (16, 24, 1, 1, 0, 1, 1)), ("csr", (8, 16, 3, 2, 1, 1, 2)),
              ("bsr", (8, 16, 3, 1, 1, 1, 1)), ("nm", (8, 12, 3, 1, 1, 1, 1)), ("nm", (16, 24, 1, 1, 0, 1, 4)),
              ("csr", (8, 16, 3, 1, 1, 1, 8))]


@pytest.mark.parametrize("fmt,geom", CONV_CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_conv_gradients_match_nn_conv2d(fmt, geom, mode, channels_last):
    cin, cout, k, s, p, d, groups = geom
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(cin, cout, k, s, p, d, groups)
    kw = {"csr": dict(sparsity=0.6), "bsr": dict(sparsity=0.5, blocksize=(4, 8)), "nm": {}}[fmt]
    sc = SparseConv2d.from_conv(conv, fmt, **kw)
    sc.train(mode == "train")
    ref = sc.to_conv()
    x = torch.randn(2, cin, 9, 10, generator=gen(4))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = sc(xs)
    g = torch.randn(y.shape, generator=gen(5))
    y.backward(g)
    ref(xr).backward(g)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sc.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    # the values' gradients, scattered back into the weight's shape, are the dense gradient at
    # the kept positions and nothing else
    dW = ref.weight.grad
    weights = [prm for name, prm in sc.named_parameters() if name != "bias"]
    with torch.no_grad():
        for prm in weights:  # the pattern: every stored value (or unpruned weight) set to 1
            prm.copy_(prm != 0 if sc.depthwise else torch.ones_like(prm))
        kept = sc.dense_weight() != 0
        for prm in weights:
            prm.copy_(prm.grad)
        got = sc.dense_weight()
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(got[kept], dW[kept], rtol=1e-4, atol=1e-4)
    assert not got[~kept].any()


@pytest.mark.compile
@pytest.mark.parametrize("fmt", ["bsr", "nm"])
def test_compile_forward_and_backward(fmt):
    sl = SparseLinear.from_linear(torch.nn.Linear(48, 32), fmt, **LINEAR_FORMATS[fmt])
    sl.train_kernel = "sparse"
    sc = SparseConv2d.from_conv(torch.nn.Conv2d(8, 12, 3, padding=1), "nm")
    x = torch.randn(5, 48, requires_grad=True)
    xc = torch.randn(2, 8, 6, 6, requires_grad=True)

    def step(x, xc):
        return sl(x).square().sum() + sc(xc).square().sum()

    def grads():
        return [t.grad.clone() for t in (x, xc, sl.weight_values, sl.bias, sc.weight_values, sc.bias)]

    eager = step(x, xc)
    eager.backward()
    ref = grads()
    for t in (x, xc):
        t.grad = None
    sl.zero_grad()
    sc.zero_grad()
    out = torch.compile(step, fullgraph=True)(x, xc)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads(), ref):
        torch.testing.assert_close(a, b)
