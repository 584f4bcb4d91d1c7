"""Backward of pruned_ffn (pysparse/autograd.py) and training of SparseFFN.

Gradients w.r.t. x, every weight's stored values (or dense weight) and both biases against the
fp64 unfused computation on the same pruned weights: every weight format in each position
(dense, W2 stored transposed, CSR, BSR, N:M), every activation, gated and not, with and without
the activation threshold, fp32 and bf16; opcheck with gradients; SparseFFN trains; compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import BSR, CSR, SparseNM
from pysparse.nn import SparseFFN
from conftest import gen, train_losses

D, H = 32, 64


def _weight(kind: str, rows: int, cols: int, dtype, seed: int):
    W = torch.randn(rows, cols, generator=gen(seed)).to(dtype)
    if kind == "dense":
        return W
    if kind == "dense_t":
        return pysparse.transposed_w2(W)
    if kind == "csr":
        return CSR.from_dense(pysparse.prune.magnitude(W, 0.6))
    if kind == "bsr":
        return BSR.from_dense(pysparse.prune.blocks(W, 0.5, blocksize=(8, 8)), blocksize=(8, 8))
    return SparseNM.from_dense(W, 2, 4, prune=True)


def _trainable(w) -> torch.Tensor:
    t = w if isinstance(w, torch.Tensor) else w.values
    return t.requires_grad_()


def _dense(w) -> torch.Tensor:
    return (w if isinstance(w, torch.Tensor) else w.to_dense()).detach().double()


def _grad_as_dense(w, grad) -> torch.Tensor:
    """The gradient of a weight's trainable tensor placed at the weight's positions (M, K)."""
    if isinstance(w, torch.Tensor):
        return grad.double()
    if w.kind == "nm":
        return SparseNM(grad, w.mask, w.shape, w.n, w.m, check=False).to_dense().double()
    return type(w)(w.crow_indices, w.col_indices, grad, w.shape, check=False).to_dense().double()


CASES = [("csr", "csr", False), ("nm", "bsr", True), ("bsr", "dense_t", False), ("dense", "nm", True),
         ("csr", "dense", False), ("nm", "csr", False), ("bsr", "bsr", True)]


@pytest.mark.parametrize("k1,k2,gated", CASES)
@pytest.mark.parametrize("activation", pysparse.activations.NAMES)
@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_ffn_gradients(k1, k2, gated, activation, threshold, dtype):
    if k2 == "dense_t" and activation != "relu" and threshold == 0:
        k2 = "dense"  # the transposed layout is the ReLU / threshold one (any layout is accepted)
    seed = len(k1) * 7 + len(k2)
    w1, w2 = _weight(k1, H, D, dtype, seed), _weight(k2, D, H, dtype, seed + 1)
    w3 = _weight(k1, H, D, dtype, seed + 2) if gated else None
    b1, b2 = (torch.randn(n, generator=gen(seed + i)).to(dtype).requires_grad_() for i, n in ((3, H), (4, D)))
    weights = [w for w in (w1, w2, w3) if w is not None]
    params = [_trainable(w) for w in weights]
    x = torch.randn(3, 5, D, generator=gen(5)).to(dtype).requires_grad_()
    y = pysparse.pruned_ffn(x, w1, b1, w2, b2, activation=activation, w3=w3, threshold=threshold)
    g = torch.randn(y.shape, generator=gen(6)).to(dtype)
    y.backward(g)
    # fp64 reference, unfused, on the same weights; the threshold mask taken from the op's own
    # intermediate rounding is what both sides apply, so compare where no entry sits at it
    Ws = [_dense(w).requires_grad_() for w in weights]
    xr = x.detach().double().requires_grad_()
    b1r, b2r = (b.detach().double().requires_grad_() for b in (b1, b2))
    h = pysparse.activations.apply(activation, F.linear(xr, Ws[0], b1r))
    if gated:
        h = h * F.linear(xr, Ws[2])
    if threshold:
        h = h * (h.abs() > threshold)
    F.linear(h, Ws[1], b2r).backward(g.double())
    scale = 1e-4 if dtype == torch.float32 else 6e-2

    def close(got, want, what):
        err = float((got.double() - want).abs().max())
        assert err <= scale * float(want.abs().max()) + 1e-6, f"{what}: error {err:.3g}, max {float(want.abs().max()):.3g}"

    close(x.grad, xr.grad, "dx")
    close(b1.grad, b1r.grad, "db1")
    close(b2.grad, b2r.grad, "db2")
    for name, w, p, Wr in zip(("w1", "w2", "w3"), weights, params, Ws):
        got = _grad_as_dense(w, p.grad)
        kept = _dense(w) != 0
        close(got[kept], Wr.grad[kept], f"d{name}")
        if not isinstance(w, torch.Tensor):  # only stored positions carry a gradient
            assert p.grad.shape == w.values.shape


def test_only_what_requires_grad_is_computed():
    w1, w2 = _weight("csr", H, D, torch.float32, 1), _weight("nm", D, H, torch.float32, 2)
    x = torch.randn(4, D, requires_grad=True)
    pysparse.pruned_ffn(x, w1, None, w2, None, activation="gelu").sum().backward()
    assert x.grad is not None and w1.values.grad is None and w2.values.grad is None
    w1.values.requires_grad_()
    pysparse.pruned_ffn(torch.randn(4, D), w1, None, w2, None, activation="gelu").sum().backward()
    assert w1.values.grad is not None and w2.values.grad is None


def test_opcheck_with_gradients():
    w1, w2 = _weight("bsr", H, D, torch.float32, 1), _weight("csr", D, H, torch.float32, 2)
    w3 = _weight("bsr", H, D, torch.float32, 3)
    for w in (w1, w2, w3):
        w.values.requires_grad_()
    x = torch.randn(3, D, requires_grad=True)
    b1 = torch.randn(H, requires_grad=True)
    torch.library.opcheck(torch.ops.pysparse.pruned_ffn.default,
                          (x, "bsr", w1.tensors(), b1, "csr", w2.tensors(), None, "bsr", w3.tensors(), H, "silu", 0.0))


def _ffn(fmt):
    torch.manual_seed(0)
    up, down = torch.nn.Linear(D, H), torch.nn.Linear(H, D)
    return SparseFFN.from_linears(up, down, "gelu", format=fmt, sparsity=0.5 if fmt == "csr" else 0.0), up, down


@pytest.mark.parametrize("fmt", [None, "csr", "nm"])
def test_sparse_ffn_trains(fmt):
    """Its parameters are the stored values, dense weights and biases; 100 Adam steps lower the
    loss as the dense FFN with the same masks does (within 2%)."""
    ffn, _, _ = _ffn(fmt)
    names = {n for n, _ in ffn.named_parameters()}
    assert {"b1", "b2"} <= names and (names >= {"fc1.weight_values", "fc2.weight_values"} if fmt else names >= {"w1", "w2"})
    w1, w2, _ = ffn.weights
    W1, W2 = (w.detach().clone() if isinstance(w, torch.Tensor) else w.to_dense().detach().clone() for w in (w1, w2))
    ref = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Linear(H, D))
    with torch.no_grad():
        ref[0].weight.copy_(W1), ref[0].bias.copy_(ffn.b1), ref[2].weight.copy_(W2), ref[2].bias.copy_(ffn.b2)
    masks = [(ref[0].weight, W1 != 0), (ref[2].weight, W2 != 0)]
    g = gen(3)
    X = torch.randn(256, D, generator=g)
    Y = torch.tanh(X.roll(1, dims=1))
    losses = train_losses({"sparse": ffn, "dense": ref}, X, Y, masks if fmt else [], steps=100, lr=3e-3)
    assert abs(losses["sparse"] - losses["dense"]) <= 0.02 * losses["dense"], losses


@pytest.mark.compile
def test_compile_forward_and_backward():
    ffn, _, _ = _ffn("csr")
    x = torch.randn(6, D, requires_grad=True)

    def step(x):
        return ffn(x).square().sum()

    def grads():
        return [t.grad.clone() for t in (x, ffn.fc1.weight_values, ffn.fc2.weight_values, ffn.b1, ffn.b2)]

    eager = step(x)
    eager.backward()
    ref = grads()
    x.grad = None
    ffn.zero_grad()
    out = torch.compile(step, fullgraph=True)(x)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads(), ref):
        torch.testing.assert_close(a, b)
