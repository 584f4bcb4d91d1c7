"""pysparse.nn.modules: SparseFFN (pruned_ffn) and MaskedAttention (masked_attention + cached BlockMask).

SparseFFN is checked against an fp64 torch reference built from weights pruned here with the
pysparse.prune functions (not read back from the module); MaskedAttention against
F.scaled_dot_product_attention with the equivalent dense mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse import BlockMask, prune
from pysparse.nn.modules import MaskedAttention, SparseFFN
from conftest import fp32_close, gen, save_load
from references import reference_pruned_ffn

D, HIDDEN = 64, 128
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}
# format -> (from_linears kwargs, pysparse.prune of one weight, expected format name)
FORMATS = {
    "dense": ({}, lambda W: W, "dense"),
    "csr": (dict(format="csr", sparsity=0.8), lambda W: prune.magnitude(W, 0.8), "csr"),
    "nm": (dict(format="nm"), lambda W: prune.nm(W, 2, 4), "2:4"),
    "bsr": (dict(format="bsr", sparsity=0.5, blocksize=(16, 32)),
            lambda W: prune.blocks(W, 0.5, blocksize=(16, 32)), "bsr"),
}
TOL = fp32_close(10)  # a block: two products and an activation


def linear(i, o, seed, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias)


def mlp(act="gelu", seed=0):
    return nn.Sequential(linear(D, HIDDEN, seed), ACTS[act](), nn.Dropout(0.1), linear(HIDDEN, D, seed + 1)).eval()


def inputs(seed=1):
    g = gen(seed)
    return [torch.randn(7, D, generator=g), torch.randn(2, 3, D, generator=g), torch.randn(1, D, generator=g)]


def check(ffn, ref_fn, xs):
    for x in xs:
        out = ffn(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out.double(), ref_fn(x), **TOL)


# ---------------------------------------------------------------------------------------------
# SparseFFN


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("act", list(ACTS))
def test_ffn_from_sequential(act, fmt):
    seq = mlp(act)
    kwargs, prune_fn, name = FORMATS[fmt]
    ffn = SparseFFN.from_module(seq, **kwargs)
    assert ffn.activation == act and not ffn.gated and ffn.hidden_features == HIDDEN
    w1, w2 = prune_fn(seq[0].weight.detach()), prune_fn(seq[3].weight.detach())
    # ReLU with a dense W2: stored transposed, the op's activation-skipping layout.
    assert ffn.formats == (name, "dense_t" if (act, fmt) == ("relu", "dense") else name, None)
    check(ffn, lambda x: reference_pruned_ffn(x, w1, seq[0].bias, w2, seq[3].bias, act), inputs())
    if fmt == "dense":
        with torch.no_grad():
            torch.testing.assert_close(ffn(inputs()[0]), seq(inputs()[0]), **TOL)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_ffn_neurons(fmt):
    seq = mlp("relu", seed=3)
    ffn = SparseFFN.from_module(seq, neurons=0.5, **FORMATS[fmt][0])
    assert ffn.hidden_features == HIDDEN // 2
    p = prune.ffn_neurons(seq[0].weight.detach(), seq[0].bias.detach(), seq[3].weight.detach(), 0.5, "l2")
    assert p.w1.shape == (HIDDEN // 2, D)
    prune_fn = FORMATS[fmt][1]
    check(ffn, lambda x: reference_pruned_ffn(x, prune_fn(p.w1), p.b1, prune_fn(p.w2), seq[3].bias, "relu"), inputs(2))


def llama_mlp(seed=5):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=HIDDEN, hidden_act="silu")).eval()


def test_ffn_from_llama_mlp():
    m = llama_mlp()
    ffn = SparseFFN.from_module(m)
    assert ffn.gated and ffn.activation == "silu" and ffn.formats == ("dense", "dense", "dense")
    assert torch.equal(ffn.w1, m.gate_proj.weight) and torch.equal(ffn.w3, m.up_proj.weight)  # act on the gate
    with torch.no_grad():
        for x in inputs(3):
            torch.testing.assert_close(ffn(x), m(x), **TOL)


def test_ffn_from_llama_mlp_nm_and_neurons():
    m = llama_mlp(6)
    g, u, d = (lin.weight.detach() for lin in (m.gate_proj, m.up_proj, m.down_proj))
    ffn = SparseFFN.from_module(m, format="nm")
    assert ffn.formats == ("2:4", "2:4", "2:4")
    nm = lambda W: prune.nm(W, 2, 4)  # noqa: E731
    check(ffn, lambda x: reference_pruned_ffn(x, nm(g), None, nm(d), None, "silu", w3=nm(u)), inputs(4))
    ffn = SparseFFN.from_module(m, neurons=0.25, criterion="l1")
    p = prune.ffn_neurons(g, None, d, 0.25, "l1", w3=u)
    assert ffn.hidden_features == 96
    check(ffn, lambda x: reference_pruned_ffn(x, p.w1, None, p.w2, None, "silu", w3=p.w3), inputs(4))


def test_ffn_hugging_face_activations_are_recognised():
    from transformers.activations import ACT2FN

    for hf, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                     ("silu", "silu"), ("relu", "relu")):
        seq = nn.Sequential(linear(D, HIDDEN, 0), ACT2FN[hf], linear(HIDDEN, D, 1))
        assert SparseFFN.from_module(seq).activation == ours, hf
    with pytest.raises(ValueError, match=r"activation QuickGELUActivation of Sequential is not ReLU, GELU"):
        SparseFFN.from_module(nn.Sequential(linear(D, HIDDEN, 0), ACT2FN["quick_gelu"], linear(HIDDEN, D, 1)))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ffn_state_dict_round_trip(fmt):
    kwargs = FORMATS[fmt][0]
    a = SparseFFN.from_module(mlp("relu", seed=7), **kwargs)
    b = SparseFFN.from_module(mlp("relu", seed=9), **kwargs)  # built the same way, other weights
    x = inputs(5)[0]
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(save_load(a.state_dict()))
    assert torch.equal(b(x), a(x))
    half = b.to(torch.bfloat16)
    torch.testing.assert_close(half(x.bfloat16()).float(), a(x), rtol=5e-2, atol=5e-2)


def test_ffn_compiles():
    x = inputs(6)[0]
    for kwargs in ({}, dict(format="csr", sparsity=0.8)):
        ffn = SparseFFN.from_module(mlp("gelu", seed=11), **kwargs)
        torch._dynamo.reset()
        f = torch.compile(ffn, fullgraph=True)
        torch.testing.assert_close(f(x), ffn(x))


def test_ffn_extra_repr():
    r = repr(SparseFFN.from_module(llama_mlp(), format="csr", sparsity=0.5))
    assert "in_features=64, hidden_features=128, activation=silu, gated=True, w1=csr, w2=csr, w3=csr" in r
    assert "SparseLinear" in r


@pytest.mark.parametrize("build,exc,msg", [
    (lambda: SparseFFN.from_module(nn.LSTM(4, 4)), ValueError, r"LSTM is not a recognised feed-forward block"),
    (lambda: SparseFFN.from_module(nn.Sequential(linear(D, HIDDEN, 0), nn.Tanh(), linear(HIDDEN, D, 1))),
     ValueError, r"activation Tanh of Sequential is not ReLU"),
    (lambda: SparseFFN.from_linears(nn.Conv1d(1, 1, 1), linear(HIDDEN, D, 1)), TypeError, r"up must be an nn.Linear, got Conv1d"),
    (lambda: SparseFFN.from_linears(linear(D, HIDDEN, 0), linear(HIDDEN, D, 1), format="coo"), ValueError,
     r"format must be None, 'csr', 'bsr' or 'nm', got 'coo'"),
    (lambda: SparseFFN.from_linears(linear(D, HIDDEN, 0), linear(HIDDEN, D, 1), sparsity=0.5), ValueError,
     r"sparsity needs format='csr' or 'bsr'"),
    (lambda: SparseFFN.from_linears(linear(D, HIDDEN, 0), linear(HIDDEN, D, 1), "silu", gate=linear(D, HIDDEN, 2)),
     ValueError, r"gated FFN cannot have a bias on up"),
    (lambda: SparseFFN.from_linears(linear(D, HIDDEN, 0), linear(HIDDEN + 1, D, 1)), ValueError,
     r"need up \(hidden, d\), down \(d, hidden\)"),
    (lambda: SparseFFN.from_linears(linear(D, HIDDEN, 0), linear(HIDDEN, D, 1), "tanh"), ValueError,
     r"activation must be one of"),
    (lambda: SparseFFN(torch.randn(HIDDEN, D), None, torch.randn(D, HIDDEN - 1), None), ValueError,
     r"w2 must have shape \(64, 128\) \(from w1's \(128, 64\)\), got \(64, 127\)"),
    (lambda: SparseFFN(torch.randn(HIDDEN, D), None, torch.randn(D, HIDDEN, dtype=torch.float64), None), TypeError,
     r"must share one dtype"),
    (lambda: SparseFFN(torch.randn(HIDDEN, D), None, "w2", None), TypeError, r"w2 must be a 2-D tensor, CSR, BSR or SparseNM, got str"),
    (lambda: SparseFFN.from_module(mlp())(torch.randn(3, D + 1)), ValueError, r"x must have shape \(\.\.\., 64\), got \(3, 65\)"),
])
def test_ffn_bad_input(build, exc, msg):
    with pytest.raises(exc, match=msg):
        build()


# ---------------------------------------------------------------------------------------------
# MaskedAttention


def qkv(B=2, H=3, Lq=97, Lk=None, E=32, dtype=torch.float32, seed=0):
    g = gen(seed)
    Lk = Lq if Lk is None else Lk
    return tuple(torch.randn(B, H, L, E, generator=g).to(dtype) for L in (Lq, Lk, Lk))


ATOL = fp32_close()


@pytest.mark.parametrize("Lq,Lk", [(97, 97), (1, 1), (150, 70), (40, 130)])
def test_attention_causal(Lq, Lk):
    q, k, v = qkv(Lq=Lq, Lk=Lk)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(MaskedAttention("causal")(q, k, v), ref, **ATOL)
    torch.testing.assert_close(MaskedAttention()(q, k, v, is_causal=True), ref, **ATOL)  # SDPA's flag
    torch.testing.assert_close(MaskedAttention("causal", block_size=(16, 32))(q, k, v), ref, **ATOL)
    torch.testing.assert_close(MaskedAttention()(q, k, v), F.scaled_dot_product_attention(q, k, v), **ATOL)


def test_attention_sliding_window():
    q, k, v = qkv(Lq=150, seed=1)
    i = torch.arange(150)
    dense = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 40)
    attn = MaskedAttention("sliding_window", window=40, block_size=(32, 32))
    torch.testing.assert_close(attn(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=dense), **ATOL)
    assert attn.sparsity > 0.5
    torch.testing.assert_close(attn(q, k, v, is_causal=True), attn(q, k, v), rtol=0, atol=0)  # already causal


def test_attention_key_padding_and_float_masks():
    B, L = 3, 100
    q, k, v = qkv(B=B, Lq=L, seed=2)
    lengths = torch.tensor([100, 37, 64])
    pad = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L), True = attend
    torch.testing.assert_close(MaskedAttention()(q, k, v, attn_mask=pad),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=pad), **ATOL)
    both = pad & torch.ones(L, L, dtype=torch.bool).tril()  # SDPA cannot take attn_mask and is_causal
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=both)
    torch.testing.assert_close(MaskedAttention("causal")(q, k, v, attn_mask=pad), ref, **ATOL)
    torch.testing.assert_close(MaskedAttention()(q, k, v, attn_mask=pad, is_causal=True), ref, **ATOL)
    bias = torch.randn(B, 1, 1, L, generator=gen(3)).masked_fill(~pad, float("-inf"))
    torch.testing.assert_close(MaskedAttention()(q, k, v, attn_mask=bias),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bias), **ATOL)
    full = torch.rand(B, 3, L, L, generator=gen(4)) < 0.5
    full[..., 0] = True  # every query keeps a key (SDPA gives NaN rows, we give zeros)
    torch.testing.assert_close(MaskedAttention()(q, k, v, attn_mask=full),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=full), **ATOL)


def test_attention_callable_mask_gqa_and_scale():
    g = gen(5)
    q, _, _ = qkv(H=4, Lq=70, seed=6)
    _, k, v = qkv(H=2, Lq=70, seed=7)
    allowed = torch.rand(70, 70, generator=g) < 0.3
    allowed.fill_diagonal_(True)
    attn = MaskedAttention(lambda Lq, Lk: BlockMask.from_dense_mask(allowed[:Lq, :Lk], (16, 16)))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attn(q, k, v, scale=0.3, enable_gqa=True), ref, **ATOL)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.tril(), enable_gqa=True)
    torch.testing.assert_close(attn(q, k, v, is_causal=True), ref, **ATOL)  # the callable's mask & causal
    assert len(attn.cache) == 2


def test_attention_cache():
    attn = MaskedAttention("causal", cache_size=3)
    assert attn.sparsity is None
    q, k, v = qkv(Lq=256, seed=8)
    attn(q, k, v)
    first = attn.cache[(256, 256, torch.device("cpu"), False)]
    attn(q * 2, k, v)
    assert len(attn.cache) == 1 and attn.cache[(256, 256, torch.device("cpu"), False)] is first  # not rebuilt
    assert attn.sparsity == pytest.approx(6 / 16)  # 4 x 4 tiles of 64, 6 above the diagonal
    attn(*qkv(Lq=100, seed=9))
    assert len(attn.cache) == 2 and (100, 100, torch.device("cpu"), False) in attn.cache
    attn(*qkv(Lq=1, Lk=5, seed=10))
    attn(*qkv(Lq=1, Lk=6, seed=10))  # decoding: a new key length each step; the oldest entry goes
    assert len(attn.cache) == 3 and (256, 256, torch.device("cpu"), False) not in attn.cache
    none = MaskedAttention()
    none(q, k, v)
    assert none.sparsity == 0.0 and none.cache[(256, 256, torch.device("cpu"), False)] is None
    assert "mask='causal'" in repr(attn) and "cached=3" in repr(attn)


def test_attention_bf16():
    q, k, v = qkv(Lq=130, E=64, seed=11)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for attn in (MaskedAttention("causal"), MaskedAttention("sliding_window", window=130)):
        out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("build,exc,msg", [
    (lambda: MaskedAttention("banded"), ValueError, r"mask must be None, 'causal', 'sliding_window' or a callable, got 'banded'"),
    (lambda: MaskedAttention("sliding_window"), ValueError, r"needs a window >= 1, got None"),
    (lambda: MaskedAttention("causal", window=4), ValueError, r"window applies to mask='sliding_window' only"),
    (lambda: MaskedAttention(block_size=(0, 16)), ValueError, r"block_size must be two positive ints"),
    (lambda: MaskedAttention()(*qkv(Lq=8), dropout_p=0.1), ValueError, r"dropout_p must be 0"),
    (lambda: MaskedAttention()(torch.randn(3, 8, 4), *qkv(Lq=8)[1:]), ValueError, r"query must be a 4-D tensor"),
    (lambda: MaskedAttention(lambda Lq, Lk: None)(*qkv(Lq=8)), TypeError, r"must return a BlockMask, got NoneType"),
    (lambda: MaskedAttention(lambda Lq, Lk: BlockMask.causal(9))(*qkv(Lq=8)), ValueError,
     r"returned a BlockMask for 9x9, asked for 8x8"),
])
def test_attention_bad_input(build, exc, msg):
    with pytest.raises(exc, match=msg):
        build()
