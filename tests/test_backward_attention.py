"""Backward of masked_attention: the fused CPU kernel (masked_attention_backward) and the
gathered-tile path other devices run (pysparse/_attention_grad.py), both on CPU. q, k and v
gradients against the fp64 softmax attention on the same allowed keys, for every kind of mask
(band, causal, sliding window, key padding, element mask, additive bias with -inf, none),
grouped-query heads, head_mask, odd lengths and block sizes, fp32 / bf16 / fp16; every ISA and
thread count of the fused kernel; chunked and two-pass gathered paths; opcheck; compile; bad
input."""
from __future__ import annotations

import math

import pytest
import torch

import pysparse
from pysparse import _attention_grad
from conftest import gen, num_threads


@pytest.fixture(params=["fused", "gathered"])
def path(request, monkeypatch):
    """Each test runs on the fused CPU kernel and on the gathered-tile path."""
    monkeypatch.setattr(_attention_grad, "_FUSED_CPU", request.param == "fused")
    return request.param


def _reference(q, k, v, allowed, scale, bias=None):
    """softmax(q k^T scale + bias) v over `allowed` in fp64, differentiable (rows with no allowed
    key give zeros)."""
    B, H, Lq, _ = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    allowed = allowed.expand(B, H, Lq, k.shape[2])
    if bias is not None:
        b = bias.double().expand_as(s)
        allowed = allowed & (b != -math.inf)
        s = s + torch.where(b == -math.inf, 0.0, b)
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    p = torch.exp(s - torch.where(m == -math.inf, 0.0, m)).masked_fill(~allowed, 0.0)
    den = p.sum(-1, keepdim=True)
    return (p @ v) / torch.where(den == 0, 1.0, den)


def _case(mask: str, B, H, Hkv, Lq, Lk, D, block, dtype, seed=0):
    g = gen(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D + 3, generator=g).to(dtype).requires_grad_()
    kw, allowed, bias = {}, torch.ones(1, 1, Lq, Lk, dtype=torch.bool), None
    if mask == "causal":
        kw["is_causal"] = True
        allowed = allowed & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None])
    elif mask == "sliding":
        kw["block_mask"] = bm = pysparse.BlockMask.sliding_window(Lq, 9, Lk=Lk, block_size=block)
        allowed = bm.to_dense()
    elif mask == "padding":
        lengths = torch.tensor([Lk - 5] + [3] * (B - 1))
        kw["block_mask"] = bm = pysparse.BlockMask.key_padding(lengths, Lq, Lk, block_size=block)
        allowed = bm.to_dense()
    elif mask == "elements":
        am = torch.rand(1, H, Lq, Lk, generator=g) < 0.3
        kw["attn_mask"], allowed = am, am
    elif mask == "bias":
        am = torch.randn(B, 1, Lq, Lk, generator=g)
        am[..., ::3] = -math.inf
        kw["attn_mask"], bias = am.to(dtype), am.to(dtype)
    elif mask == "tiles":  # whole tiles skipped at random, as a block-sparse pattern
        bq, bk = block
        tiles = torch.rand(-(-Lq // bq), -(-Lk // bk), generator=g) < 0.3
        dense = tiles.repeat_interleave(bq, 0)[:Lq].repeat_interleave(bk, 1)[:, :Lk]
        kw["block_mask"] = pysparse.BlockMask.from_dense_mask(dense, block)
        allowed = dense
    return q, k, v, kw, allowed, bias


def _check(q, k, v, kw, allowed, bias, head_mask=None):
    out = pysparse.masked_attention(q, k, v, head_mask=head_mask, **kw)
    g = torch.randn(out.shape, generator=gen(9)).to(out.dtype)
    out.backward(g)
    if head_mask is not None:
        allowed = allowed & head_mask.view(1, -1, 1, 1)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    _reference(qd, kd, vd, allowed, 1 / math.sqrt(q.shape[-1]), bias).backward(g.double())
    tol = 1e-5 if q.dtype == torch.float32 else 3e-2
    for name, t, ref in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
        err = float((t.grad.double() - ref.grad).abs().max())
        assert err <= tol * max(1.0, float(ref.grad.abs().max())), f"{name}: error {err:.3g}"


@pytest.mark.parametrize("mask", ["none", "causal", "sliding", "padding", "elements", "bias", "tiles"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 50, 16, (16, 16)), (1, 2, 1, 130, 70, 8, (64, 32)),
                                   (1, 3, 3, 5, 9, 4, (64, 64))])
def test_gradients_match_the_fp64_softmax(mask, shape, path):
    B, H, Hkv, Lq, Lk, D, block = shape
    _check(*_case(mask, B, H, Hkv, Lq, Lk, D, block, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs(dtype, path):
    _check(*_case("causal", 1, 2, 1, 40, 40, 16, (16, 16), dtype))


def test_head_mask_and_rows_without_keys_get_no_gradient(path):
    q, k, v, kw, allowed, bias = _case("padding", 2, 4, 2, 20, 24, 8, (8, 8), torch.float32)
    hm = torch.tensor([True, False, True, True])
    _check(q, k, v, kw, allowed, bias, head_mask=hm)
    assert not q.grad[:, 1].any()


def test_chunks_and_two_passes_give_the_same_gradients(monkeypatch):
    monkeypatch.setattr(_attention_grad, "_FUSED_CPU", False)
    q, k, v, kw, _, _ = _case("tiles", 2, 4, 2, 70, 90, 16, (16, 16), torch.float32)

    def grads():
        for t in (q, k, v):
            t.grad = None
        pysparse.masked_attention(q, k, v, **kw).square().sum().backward()
        return [t.grad.clone() for t in (q, k, v)]

    one = grads()
    monkeypatch.setattr(_attention_grad, "_CHUNK_BYTES", 1)  # one tile per chunk
    monkeypatch.setattr(_attention_grad, "_KEEP_BYTES", 0)  # scores computed twice
    for a, b in zip(grads(), one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", pysparse._C.cpu_isa_supported())
@pytest.mark.parametrize("mask", ["causal", "elements", "tiles"])
def test_fused_kernel_on_every_isa(isa, mask):
    pysparse.set_cpu_isa(isa)
    try:
        _check(*_case(mask, 2, 4, 2, 45, 70, 20, (16, 32), torch.float32, seed=3))
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("heads", [(1, 1), (2, 8)])
def test_fused_kernel_thread_counts(threads, heads):
    """Key blocks split into parts (each with its own dQ) when there are few heads: the same
    gradients for any thread count."""
    B, (Hkv, H) = 1, heads
    q, k, v, kw, _, _ = _case("causal", B, H, Hkv, 150, 150, 16, (32, 32), torch.float32, seed=4)

    def grads(n):
        for t in (q, k, v):
            t.grad = None
        with num_threads(n):
            pysparse.masked_attention(q, k, v, **kw).square().sum().backward()
        return [t.grad.clone() for t in (q, k, v)]

    for a, b in zip(grads(threads), grads(2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bias_gradient_is_refused():
    q, k, v, kw, _, _ = _case("bias", 1, 2, 2, 8, 8, 4, (4, 4), torch.float32)
    kw["attn_mask"] = kw["attn_mask"].clone().requires_grad_()
    out = pysparse.masked_attention(q, k, v, **kw)
    with pytest.raises(RuntimeError, match="no gradient for a float attn_mask"):
        out.sum().backward()


def test_opcheck_with_gradients():
    q, k, v, kw, _, _ = _case("sliding", 1, 2, 1, 24, 24, 8, (8, 8), torch.float32)
    bm = kw["block_mask"]
    lo, hi = bm.band
    torch.library.opcheck(torch.ops.pysparse.masked_attention.default,
                          (q, k, v, bm.kind, 8, 8, None, None, int(lo), int(hi), None, 0.3, None))


def test_compile_forward_and_backward():
    q, k, v, kw, _, _ = _case("causal", 1, 2, 1, 32, 32, 8, (16, 16), torch.float32)

    def step(q, k, v):
        return pysparse.masked_attention(q, k, v, **kw).square().sum()

    eager = step(q, k, v)
    eager.backward()
    ref = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = torch.compile(step, fullgraph=True)(q, k, v)
    out.backward()
    torch.testing.assert_close(out, eager)
    for t, r in zip((q, k, v), ref):
        torch.testing.assert_close(t.grad, r)
