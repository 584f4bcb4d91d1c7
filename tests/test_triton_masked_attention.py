"""The Triton block-sparse attention kernel (pysparse/_triton/kernels/masked_attention.py) through its
launcher pysparse._triton.masked_attention, against an fp64 reference of the op's semantics.
Without a GPU it runs under TRITON_INTERPRET=1 on CPU tensors, in fp32 (the interpreter's bf16
tl.dot is wrong) and with few programs (they run one after another); on a GPU the same tests run
on CUDA tensors.

Tolerance: rtol = atol = 2e-5 against fp64 on the same fp32 inputs. The scores are fp32 dot
products of D <= 128 standard-normal terms scaled by 1/sqrt(D) (|s| of order 1, error of order
sqrt(D) * 2**-24 * |s| ~ 1e-6 relative to each softmax weight); exp2 of the log2(e)-prescaled
score adds a few ulps; the output is a convex combination of at most 130 values |v| < 5 summed in
fp32 (random-walk error ~ sqrt(130) * 2**-24 * 5 ~ 3e-6). The measured worst case over these
tests is 3.4e-6 (D = 80, scale 0.3), so 2e-5 leaves a 6x margin while still catching any wrong
weight (a masking or scaling error moves outputs by 1e-2 or more).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import fp32_close, gen, randn
from references import reference_masked_attention as shared_reference

pytest.importorskip("triton")

_triton = pytest.importorskip("pysparse._triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)
NO_BAND = 2**62
TOL = fp32_close(2)  # softmax and two products


def reference_masked_attention(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo,
                               band_hi, kv_len, scale, head_mask):
    """The raw op's arguments as a dense (B, H, Lq, Lk) allowed mask, then the shared fp64
    reference."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    i = torch.arange(Lq).view(Lq, 1)
    j = torch.arange(Lk).view(1, Lk)
    partial_ok = ((j - i >= band_lo) & (j - i <= band_hi)).expand(B, H, Lq, Lk)
    if elem_mask is not None:
        partial_ok = partial_ok & elem_mask.cpu().bool().expand(B, H, Lq, Lk)
    if kv_len is not None:
        partial_ok = partial_ok & (j < kv_len.cpu().view(B, 1, 1, 1))
    if block_kind is None:
        kind = torch.ones(B, H, Lq, Lk, dtype=torch.int8)
    else:
        kind = (block_kind.cpu().repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)
                [:, :, :Lq, :Lk].expand(B, H, Lq, Lk))
    allowed = (kind == 2) | ((kind == 1) & partial_ok)
    out = shared_reference(q, k, v, allowed, scale, bias)
    if head_mask is not None:
        out = out * head_mask.cpu().view(1, H, 1, 1)
    return out


def block_kinds(allowed: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """int8 kinds of a dense allowed mask (..., Lq, Lk): 2 where every in-range element of the
    block is allowed, 0 where none is, 1 otherwise."""
    Lq, Lk = allowed.shape[-2:]
    QB, KB = -(-Lq // block_q), -(-Lk // block_k)
    pad = (0, KB * block_k - Lk, 0, QB * block_q - Lq)
    shape = (*allowed.shape[:-2], QB, block_q, KB, block_k)
    a = allowed.to(torch.uint8)
    # Out-of-range padding must neither make a block partial nor make an empty one active.
    every = F.pad(a, pad, value=1).view(shape).amin(dim=(-3, -1)) == 1
    some = F.pad(a, pad, value=0).view(shape).amax(dim=(-3, -1)) == 1
    return torch.where(every, 2, torch.where(some, 1, 0)).to(torch.int8)


def band_allowed(Lq, Lk, lo, hi):
    d = torch.arange(Lk).view(1, Lk) - torch.arange(Lq).view(Lq, 1)
    return ((d >= lo) & (d <= hi)).view(1, 1, Lq, Lk)


def qkv(B, H, Hkv, Lq, Lk, D, seed):
    g = gen(seed)
    return randn(B, H, Lq, D, g=g), randn(B, Hkv, Lk, D, g=g), randn(B, Hkv, Lk, D, g=g)


def run(q, k, v, block_kind=None, block_q=32, block_k=32, elem_mask=None, bias=None,
        band_lo=-NO_BAND, band_hi=NO_BAND, kv_len=None, scale=None, head_mask=None):
    """The kernel's output (checked against the reference) on DEVICE."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = _triton.masked_attention(dev(q), dev(k), dev(v), dev(block_kind), block_q, block_k,
                                   dev(elem_mask), dev(bias), band_lo, band_hi, dev(kv_len), scale,
                                   dev(head_mask))
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == DEVICE
    ref = reference_masked_attention(q, k, v, block_kind, block_q, block_k, elem_mask, bias,
                                     band_lo, band_hi, kv_len, scale, head_mask)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL)
    return out.cpu()


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 130), (97, 130), (130, 97)])
def test_no_mask_matches_sdpa(Lq, Lk):
    q, k, v = qkv(1, 2, 2, Lq, Lk, 64, seed=Lq + Lk)
    out = run(q, k, v, block_q=64, block_k=32)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), sdpa, **TOL)


@pytest.mark.parametrize("D", [1, 32, 64, 80, 128, 256])
def test_head_dims(D):
    q, k, v = qkv(1, 2, 1, 97, 97, D, seed=D)
    run(q, k, v, block_q=64, block_k=64)


def test_all_full_blocks_ignore_the_element_constraints():
    """Full blocks evaluate no mask, band or key length, but still stop at Lk."""
    q, k, v = qkv(1, 2, 2, 97, 97, 32, seed=3)
    kind = torch.full((1, 1, 2, 4), 2, dtype=torch.int8)
    nothing = torch.zeros(1, 1, 97, 97, dtype=torch.bool)
    out = run(q, k, v, kind, 64, 32, elem_mask=nothing, band_lo=5, band_hi=-5,
              kv_len=torch.tensor([0]))
    torch.testing.assert_close(out.double(), run(q, k, v, block_q=64, block_k=32).double(), **TOL)


@pytest.mark.parametrize("Lq,Lk,bq,bk", [(130, 130, 32, 32), (97, 130, 16, 32), (130, 97, 32, 16)])
def test_causal(Lq, Lk, bq, bk):
    q, k, v = qkv(1, 2, 2, Lq, Lk, 64, seed=Lq * bq + bk)
    kind = block_kinds(band_allowed(Lq, Lk, -NO_BAND, 0), bq, bk)
    assert set(kind.unique().tolist()) == {0, 1, 2}
    out = run(q, k, v, kind, bq, bk, band_hi=0)
    if Lq == Lk:
        sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        torch.testing.assert_close(out.double(), sdpa, **TOL)


def test_sliding_window():
    w = 40
    q, k, v = qkv(1, 2, 2, 130, 130, 64, seed=11)
    kind = block_kinds(band_allowed(130, 130, -(w - 1), 0), 16, 16)
    assert (kind == 0).any() and (kind == 2).any()
    run(q, k, v, kind, 16, 16, band_lo=-(w - 1), band_hi=0)


def test_key_padding_and_an_empty_batch():
    Lq, Lk = 97, 130
    kv_len = torch.tensor([57, 0, 130])
    q, k, v = qkv(3, 2, 2, Lq, Lk, 32, seed=12)
    allowed = (torch.arange(Lk).view(1, 1, 1, Lk) < kv_len.view(3, 1, 1, 1)).expand(3, 1, Lq, Lk)
    kind = block_kinds(allowed, 32, 32)
    out = run(q, k, v, kind, 32, 32, kv_len=kv_len)
    assert (out[1] == 0).all()
    run(q, k, v, None, 32, 32, kv_len=kv_len)


def random_block_mask(B, H, Lq, Lk, bq, bk, g):
    """A bool mask whose blocks are randomly empty, all True or random inside."""
    QB, KB = -(-Lq // bq), -(-Lk // bk)
    which = torch.randint(0, 3, (B, H, QB, KB), generator=g)
    per_elem = which.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :Lq, :Lk]
    inner = torch.rand(B, H, Lq, Lk, generator=g) < 0.5
    return (per_elem == 2) | ((per_elem == 1) & inner)


@pytest.mark.parametrize("Lq,Lk", [(97, 130), (130, 97)])
def test_random_element_mask_with_consistent_kinds(Lq, Lk):
    B, H, bq, bk = 2, 2, 16, 32
    mask = random_block_mask(B, H, Lq, Lk, bq, bk, gen(Lq))
    kind = block_kinds(mask, bq, bk)
    assert set(kind.unique().tolist()) == {0, 1, 2}
    q, k, v = qkv(B, H, H, Lq, Lk, 64, seed=Lq + 1)
    out = run(q, k, v, kind, bq, bk, elem_mask=mask)
    out_all_partial = run(q, k, v, None, bq, bk, elem_mask=mask)
    torch.testing.assert_close(out, out_all_partial, **TOL)


def test_bias_with_minus_inf():
    Lq, Lk = 97, 130
    g = gen(21)
    q, k, v = qkv(1, 2, 2, Lq, Lk, 64, seed=22)
    bias = randn(1, 2, Lq, Lk, g=g)
    bias[torch.rand(bias.shape, generator=g) < 0.3] = float("-inf")
    bias[0, 1, 5] = float("-inf")  # a row whose every score is -inf: zeros
    kind = block_kinds(band_allowed(Lq, Lk, -NO_BAND, 0), 32, 32)
    out = run(q, k, v, kind, 32, 32, bias=bias, band_hi=0)
    assert (out[0, 1, 5] == 0).all() and not out.isnan().any()
    run(q, k, v, None, 32, 32, bias=bias[:, :1].double())  # broadcast over heads, fp64 bias


def test_fully_masked_rows_are_zero():
    Lq, Lk = 97, 97
    mask = torch.rand(1, 2, Lq, Lk, generator=gen(31)) < 0.3
    mask[0, 0, 10:20] = False
    mask[0, 1, 96] = False
    q, k, v = qkv(1, 2, 2, Lq, Lk, 32, seed=32)
    out = run(q, k, v, block_kinds(mask, 32, 32), 32, 32, elem_mask=mask)
    assert (out[0, 0, 10:20] == 0).all() and (out[0, 1, 96] == 0).all()
    assert out[0, 0, 9].abs().sum() > 0


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    q, k, v = qkv(2, 4, Hkv, 97, 97, 32, seed=40 + Hkv)
    kind = block_kinds(band_allowed(97, 97, -NO_BAND, 0), 32, 32)
    run(q, k, v, kind, 32, 32, band_hi=0)


def test_head_mask():
    q, k, v = qkv(2, 4, 2, 97, 97, 32, seed=50)
    head_mask = torch.tensor([True, False, True, False])
    out = run(q, k, v, None, 32, 32, head_mask=head_mask)
    assert (out[:, 1] == 0).all() and (out[:, 3] == 0).all() and (out[:, 0] != 0).any()


def test_non_contiguous_inputs():
    B, L, H, D = 2, 97, 2, 64
    g = gen(60)
    q = randn(B, L, H, D, g=g).transpose(1, 2)  # (B, H, L, D) with the heads interleaved
    k = randn(B, L, H, D, g=g).transpose(1, 2)
    v = randn(B, H, D, L, g=g).transpose(-1, -2)  # head dim strided, sequence contiguous
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    kind = block_kinds(band_allowed(L, L, -NO_BAND, 0), 32, 32)
    run(q, k, v, kind, 32, 32, band_hi=0)


def test_broadcast_kinds_and_mask():
    B, H, Lq, Lk, bq, bk = 2, 3, 97, 130, 32, 32
    mask = random_block_mask(1, 1, Lq, Lk, bq, bk, gen(70))
    kind = block_kinds(mask, bq, bk)
    assert kind.shape == (1, 1, 4, 5)
    q, k, v = qkv(B, H, H, Lq, Lk, 32, seed=71)
    run(q, k, v, kind, bq, bk, elem_mask=mask)
    mask_per_batch = random_block_mask(B, 1, Lq, Lk, bq, bk, gen(72))  # (B, 1, Lq, Lk), kinds too
    run(q, k, v, block_kinds(mask_per_batch, bq, bk), bq, bk, elem_mask=mask_per_batch)


def test_everything_at_once():
    """Mask, band, key padding, bias and head mask together, with kinds from their conjunction."""
    B, H, Hkv, Lq, Lk, bq, bk = 2, 4, 2, 130, 97, 32, 16
    g = gen(80)
    mask = torch.rand(1, H, Lq, Lk, generator=g) < 0.8
    kv_len = torch.tensor([97, 70])
    allowed = (mask & band_allowed(Lq, Lk, -60, 10)
               & (torch.arange(Lk).view(1, 1, 1, Lk) < kv_len.view(B, 1, 1, 1)))
    kind = block_kinds(allowed, bq, bk)
    bias = randn(B, 1, Lq, Lk, g=g)
    q, k, v = qkv(B, H, Hkv, Lq, Lk, 80, seed=81)
    run(q, k, v, kind, bq, bk, elem_mask=mask, bias=bias, band_lo=-60, band_hi=10, kv_len=kv_len,
        scale=0.3, head_mask=torch.tensor([True, True, False, True]))


def test_block_kinds_helper():
    allowed = band_allowed(5, 5, -NO_BAND, 0)[0, 0]
    kind = block_kinds(allowed, 2, 2)
    assert kind.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 2]]  # last row: only (4, 0..4), all allowed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 tl.dot)")
def test_bf16_on_gpu():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(2, 4, 2, 300, 300, 128, seed=90))
    kind = block_kinds(band_allowed(300, 300, -NO_BAND, 0), 64, 64)
    out = _triton.masked_attention(q.cuda(), k.cuda(), v.cuda(), kind.cuda(), 64, 64, None, None,
                                   -NO_BAND, 0, None, 128 ** -0.5, None)
    ref = reference_masked_attention(q, k, v, kind, 64, 64, None, None, -NO_BAND, 0, None,
                                     128 ** -0.5, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-2, atol=2e-2)
