"""pysparse.pruned_ffn (the fused FFN op) and pysparse.prune.ffn_neurons.

Error budget: in each dtype, our max error against the fp64 unfused reference is at most twice
that of the unfused torch sequence in the same dtype on the same weights (F.linear -> act ->
F.linear, which also rounds the intermediate to the dtype), plus one rounding of the output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import BSR, CSR, SparseNM
from conftest import DTYPES, SUPPORTED_ISAS, gen
from references import UNIT, reference_pruned_ffn

FORMATS = ["dense", "dense_t", "csr", "bsr", "nm24", "nm48"]


def weights(d, h, fmt, dtype, seed=0, gated=False):
    """Dense pruned weights (for the reference) and their formats (for the op)."""
    g = gen(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)  # noqa: E731
    dense = [mk(h, d), mk(d, h), mk(h, d) if gated else None]
    if fmt.startswith("nm"):
        n, m = (2, 4) if fmt == "nm24" else (4, 8)
        dense = [None if w is None else pysparse.prune.nm(w, n, m) for w in dense]
        conv = lambda w: SparseNM.from_dense(w, n, m)  # noqa: E731
    elif fmt in ("csr", "bsr"):
        dense = [None if w is None else pysparse.prune.magnitude(w, 0.8) for w in dense]
        conv = CSR.from_dense if fmt == "csr" else (lambda w: BSR.from_dense(w, blocksize=(8, 8)))
    else:
        conv = lambda w: w  # noqa: E731
    fmts = [None if w is None else conv(w) for w in dense]
    if fmt == "dense_t":
        fmts[1] = pysparse.transposed_w2(dense[1])
    return dense, fmts


def check_budget(out, x, dense, b1, b2, act, dtype, threshold=0.0, what=""):
    w1, w2, w3 = dense
    ref = reference_pruned_ffn(x, w1, b1, w2, b2, act, w3, threshold)
    torch_out = reference_pruned_ffn(x, w1, b1, w2, b2, act, w3, threshold, dtype=dtype)
    ours_err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    floor = UNIT[dtype] * ref.abs().max().item() + 1e-6 * (dtype == torch.float32)
    assert ours_err <= 2 * torch_err + floor, f"{what}: error {ours_err:.3g} vs unfused torch {torch_err:.3g}"
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_unfused_reference(isa, dtype, fmt):
    pysparse.set_cpu_isa(isa)
    try:
        for gated, act in ((False, "gelu"), (True, "silu"), (False, "relu")):
            d, h = 40, 72  # neither a multiple of a vector nor of the 64-column skip chunk
            dense, (w1, w2, w3) = weights(d, h, fmt, dtype, seed=int(gated), gated=gated)
            g = gen(5)
            b1, b2 = torch.randn(h, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
            # 1 token (decode, the skip path for dense_t + relu), 7, and 70 (two token tiles)
            for shape in ((1, d), (7, d), (2, 35, d), (d,)):
                x = torch.randn(*shape, generator=g).to(dtype)
                out = pysparse.pruned_ffn(x, w1, b1, w2, b2, activation=act, w3=w3)
                check_budget(out, x, dense, b1, b2, act, dtype, what=f"{isa} {fmt} {act} gated={gated} {shape}")
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("act", list(pysparse.activations.NAMES))
def test_every_activation_and_no_biases(act):
    d, h = 48, 96
    for fmt in ("dense", "nm24", "csr"):
        dense, (w1, w2, w3) = weights(d, h, fmt, torch.float32, seed=3, gated=True)
        x = torch.randn(5, d, generator=gen(4))
        for gate in (None, w3):
            out = pysparse.pruned_ffn(x, w1, None, w2, None, activation=act, w3=gate)
            check_budget(out, x, [dense[0], dense[1], None if gate is None else dense[2]], None, None, act,
                         torch.float32, what=f"{fmt} {act}")


@pytest.mark.parametrize("fmt", ["dense_t", "dense", "csr"])
def test_threshold_and_relu_sparsity(fmt):
    # ~90% of the ReLU outputs are zero (negative bias); with W2 stored transposed and 1..8 tokens
    # the kernel reads only the rows of W2^T at nonzero activations.
    d, h = 64, 512
    dense, (w1, w2, _) = weights(d, h, fmt, torch.float32, seed=6)
    b1 = torch.full((h,), -2.0)  # pre-activations have std ~1.6
    x = torch.randn(3, d, generator=gen(7))
    hidden = F.relu(x @ dense[0].T + b1)
    assert 0.8 < (hidden == 0).float().mean() < 0.97
    for thr in (0.0, 0.05):
        for xs in (x[:1], x):
            out = pysparse.pruned_ffn(xs, w1, b1, w2, None, activation="relu", threshold=thr)
            check_budget(out, xs, dense, b1, None, "relu", torch.float32, threshold=thr, what=f"{fmt} thr={thr}")
    # silu + threshold (CATS): entries with |h| <= t are dropped exactly as the reference does
    out = pysparse.pruned_ffn(x, w1, None, w2, None, activation="silu", threshold=0.1)
    check_budget(out, x, dense, None, None, "silu", torch.float32, threshold=0.1, what="silu threshold")


def test_all_zero_activations_give_the_bias():
    d, h = 32, 64
    w1, w2 = torch.randn(h, d), pysparse.transposed_w2(torch.randn(d, h))
    b2 = torch.randn(d)
    out = pysparse.pruned_ffn(torch.randn(1, d), w1, torch.full((h,), -1e4), w2, b2, activation="relu")
    torch.testing.assert_close(out[0], b2, rtol=0, atol=0)


def test_opcheck_and_compile():
    d, h = 32, 64
    dense, (w1, w2, w3) = weights(d, h, "nm24", torch.float32, seed=8, gated=True)
    x = torch.randn(4, d, generator=gen(9))
    b1, b2 = torch.randn(h, generator=gen(10)), torch.randn(d, generator=gen(11))
    args = (x, "nm:2:4", [w1.values, w1.mask], b1, "dense_t", [dense[1].t().contiguous()], b2,
            "dense", [dense[2]], h, "gelu_tanh", 0.01)
    torch.library.opcheck(torch.ops.pysparse.pruned_ffn.default, args)
    f = torch.compile(lambda x: pysparse.pruned_ffn(x, w1, b1, w2, b2, activation="silu", w3=w3) * 2, fullgraph=True)
    torch.testing.assert_close(f(x), pysparse.pruned_ffn(x, w1, b1, w2, b2, activation="silu", w3=w3) * 2)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(w1=torch.randn(64, 31)), ValueError, r"w1 must have shape \(64, 32\), got \(64, 31\)"),
    (dict(w2=torch.randn(64, 32)), ValueError, r"w2 must have shape \(32, 64\), got \(64, 32\)"),
    (dict(w3=torch.randn(63, 32)), ValueError, r"w3 must have shape \(64, 32\)"),
    (dict(b1=torch.randn(63)), ValueError, r"b1 must have shape \(64,\)"),
    (dict(activation="tanh"), ValueError, r"activation must be one of"),
    (dict(threshold=-1.0), ValueError, r"threshold must be >= 0"),
    (dict(w1="dense"), TypeError, r"w1 must be a tensor, CSR, BSR or SparseNM, got str"),
    (dict(x=torch.randn(2, 32, dtype=torch.float64)), TypeError, r"x must be float32, bfloat16 or float16"),
    (dict(w2=torch.randn(32, 64, dtype=torch.bfloat16)), TypeError, r"w2 dtype torch.bfloat16 differs from x's dtype torch.float32"),
])
def test_bad_input(kwargs, exc, msg):
    g = gen(12)
    args = dict(x=torch.randn(2, 32, generator=g), w1=torch.randn(64, 32, generator=g), b1=None,
                w2=torch.randn(32, 64, generator=g), b2=None, activation="gelu", w3=None, threshold=0.0)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        pysparse.pruned_ffn(args.pop("x"), args.pop("w1"), args.pop("b1"), args.pop("w2"), args.pop("b2"), **args)


def test_raw_op_rejects_unknown_formats():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"w1 format must be dense, csr, bsr or nm:N:M, got 'coo'"):
        torch.ops.pysparse.pruned_ffn(x, "coo", [torch.randn(4, 8)], None, "dense", [torch.randn(8, 4)], None,
                                      "none", [], 4, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"w1 in format 'csr' takes 3 tensors, got 1"):
        torch.ops.pysparse.pruned_ffn(x, "csr", [torch.randn(4, 8)], None, "dense", [torch.randn(8, 4)], None,
                                      "none", [], 4, "relu", 0.0)


# ---- neuron pruning -------------------------------------------------------------------------

def test_ffn_neurons_l1_l2_scores_and_keep_shape():
    d, h = 16, 40
    g = gen(13)
    w1, w2, w3, b1 = torch.randn(h, d, generator=g), torch.randn(d, h, generator=g), torch.randn(h, d, generator=g), torch.randn(h, generator=g)
    for crit in ("l1", "l2"):
        p = 1 if crit == "l1" else 2
        score = w1.norm(p=p, dim=1) + w2.norm(p=p, dim=0) + w3.norm(p=p, dim=1)
        r = pysparse.prune.ffn_neurons(w1, b1, w2, 0.3, crit, w3=w3)
        want = torch.sort(torch.topk(score, 28).indices).values
        assert torch.equal(r.kept, want)
        assert r.w1.shape == (28, d) and r.w2.shape == (d, 28) and r.w3.shape == (28, d) and r.b1.shape == (28,)
        assert torch.equal(r.w1, w1[want]) and torch.equal(r.w2, w2[:, want])
    # pruning at ratio 0 changes nothing; pruned == keep_shape on the same input
    x = torch.randn(3, d, generator=g)
    r0 = pysparse.prune.ffn_neurons(w1, b1, w2, 0.0, w3=w3)
    full = pysparse.pruned_ffn(x, w1, b1, w2, None, activation="silu", w3=w3)
    torch.testing.assert_close(pysparse.pruned_ffn(x, r0.w1, r0.b1, r0.w2, None, activation="silu", w3=r0.w3), full)
    scores = torch.arange(h, dtype=torch.float32)  # keeps the last neurons
    small = pysparse.prune.ffn_neurons(w1, b1, w2, 0.5, scores, w3=w3)
    same = pysparse.prune.ffn_neurons(w1, b1, w2, 0.5, scores, w3=w3, keep_shape=True)
    assert torch.equal(small.kept, torch.arange(20, 40)) and same.w1.shape == w1.shape
    assert torch.all(same.w1[:20] == 0) and torch.all(same.w2[:, :20] == 0)
    a = pysparse.pruned_ffn(x, small.w1, small.b1, small.w2, None, activation="silu", w3=small.w3)
    b = pysparse.pruned_ffn(x, same.w1, same.b1, same.w2, None, activation="silu", w3=same.w3)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ffn_neurons_bad_input():
    w1, w2 = torch.randn(8, 4), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"need w1 \(h, d\) and w2 \(d, h\)"):
        pysparse.prune.ffn_neurons(w1, None, w1, 0.5)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        pysparse.prune.ffn_neurons(w1, None, w2, 1.0)
    with pytest.raises(ValueError, match=r"criterion must be 'l1', 'l2' or a tensor"):
        pysparse.prune.ffn_neurons(w1, None, w2, 0.5, "taylor")
    with pytest.raises(ValueError, match=r"scores must have shape \(8,\)"):
        pysparse.prune.ffn_neurons(w1, None, w2, 0.5, torch.ones(7))


def test_raw_op_runs_dense_weights_too():
    # pruned_ffn calls torch directly for all-dense weights; the op itself must still be right.
    d, h = 40, 72
    dense, (w1, w2, w3) = weights(d, h, "dense", torch.float32, seed=14, gated=True)
    x = torch.randn(70, d, generator=gen(15))
    b1 = torch.randn(h, generator=gen(16))
    out = torch.ops.pysparse.pruned_ffn(x, "dense", [w1], b1, "dense", [w2], None, "dense", [w3], h, "gelu_tanh", 0.0)
    check_budget(out, x, dense, b1, None, "gelu_tanh", torch.float32, what="raw dense")


@pytest.mark.parametrize("fmt", ["nm24", "dense_t"])
def test_several_token_tiles(fmt):
    # Tiles hold at most 8 MB of intermediate: hidden = 33000 makes them 64 tokens, so 150 tokens
    # run as 64 + 64 + 22.
    d, h = 8, 33000
    dense, (w1, w2, _) = weights(d, h, fmt, torch.float32, seed=17)
    x = torch.randn(150, d, generator=gen(18))
    b2 = torch.randn(d, generator=gen(19))
    out = pysparse.pruned_ffn(x, w1, None, w2, b2, activation="relu")
    check_budget(out, x, dense, None, b2, "relu", torch.float32, what=f"{fmt} tiles")
