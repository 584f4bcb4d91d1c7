"""pysparse.masked_attention and BlockMask on CPU, against an fp64 math reference.

Error budget (FlashAttention's rule): in each dtype, our max error against the fp64 reference
is at most twice that of torch's own SDPA in the same dtype with the same mask, plus one
rounding of the output (u * max |ref|, which SDPA may happen to avoid on tiny cases).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import BlockMask, masked_attention
from conftest import DTYPES, SUPPORTED_ISAS, gen
from references import UNIT, reference_masked_attention

def qkv(B, H, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = gen(seed)
    return tuple(torch.randn(*s, generator=g).to(dtype) for s in ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))


def masks(kind, B, Lq, Lk, block):
    """(BlockMask or None, dense bool mask (B|1, 1, Lq, Lk) it stands for)."""
    g = gen(hash(kind) % 1000)
    if kind == "none":
        return None, torch.ones(1, 1, Lq, Lk, dtype=torch.bool)
    if kind == "causal":
        bm = BlockMask.causal(Lq, Lk, block_size=block)
    elif kind == "sliding":
        bm = BlockMask.sliding_window(Lq, 40, Lk=Lk, block_size=block)
    elif kind == "padding":
        bm = BlockMask.key_padding(torch.randint(1, Lk + 1, (B,), generator=g), Lq, Lk, block_size=block)
    elif kind == "combined":
        bm = (BlockMask.causal(Lq, Lk, block_size=block) |
              BlockMask.from_dense_mask(torch.rand(Lq, Lk, generator=g) < 0.05, block)) & \
            BlockMask.key_padding(torch.randint(1, Lk + 1, (B,), generator=g), Lq, Lk, block_size=block)
    elif kind == "random_blocks":  # ~80% of tiles empty, the rest random at 30% density
        QB, KB = -(-Lq // block[0]), -(-Lk // block[1])
        tiles = torch.rand(B, 1, QB, KB, generator=g) < 0.2
        dense = tiles.repeat_interleave(block[0], 2)[:, :, :Lq].repeat_interleave(block[1], 3)[..., :Lk]
        bm = BlockMask.from_dense_mask(dense & (torch.rand(B, 1, Lq, Lk, generator=g) < 0.3), block)
    else:
        raise AssertionError(kind)
    return bm, bm.to_dense()


SHAPES = [  # (B, H, Hkv, Lq, Lk, D): odd lengths, one query, GQA, Lq != Lk, head dims 32..128
    (2, 4, 2, 97, 97, 64),
    (1, 2, 2, 1, 1, 32),
    (1, 2, 1, 300, 300, 128),
    (2, 3, 3, 130, 97, 80),
]
MASKS = ["none", "causal", "sliding", "padding", "combined", "random_blocks"]


def check_budget(out, ref, sdpa, dtype, what):
    live = ~torch.isnan(sdpa).any(-1, keepdim=True)  # SDPA's NaN rows are the all-masked ones
    ours_err = ((out.double() - ref).abs() * live).max().item()
    sdpa_err = ((sdpa.double() - ref).abs() * live).nan_to_num(0).max().item()
    floor = UNIT[dtype] * ref.abs().max().item()
    assert ours_err <= 2 * sdpa_err + floor, f"{what}: error {ours_err:.3g} vs SDPA's {sdpa_err:.3g}"
    assert torch.all(out[~live.expand_as(out)] == 0), f"{what}: rows with no allowed key must be zero"


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", MASKS)
def test_matches_fp64_within_twice_sdpa_error(isa, dtype, kind):
    pysparse.set_cpu_isa(isa)
    try:
        for i, (B, H, Hkv, Lq, Lk, D) in enumerate(SHAPES):
            q, k, v = qkv(B, H, Hkv, Lq, Lk, D, dtype, seed=i)
            bm, allowed = masks(kind, B, Lq, Lk, (32, 64) if i % 2 else (64, 64))
            out = masked_attention(q, k, v, block_mask=bm)
            assert out.dtype == dtype and out.shape == (B, H, Lq, D)
            ref = reference_masked_attention(q, k, v, allowed)
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
            check_budget(out, ref, sdpa, dtype, f"{isa} {dtype} {kind} {SHAPES[i]}")
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_sdpa_arguments(dtype):
    B, H, L, D = 2, 4, 97, 64
    q, k, v = qkv(B, H, H, L, L, D, dtype, seed=3)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    # is_causal
    check_budget(masked_attention(q, k, v, is_causal=True), reference_masked_attention(q, k, v, causal),
                 F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype, "is_causal")
    # bool attn_mask of shape (B, 1, L, L)
    am = torch.rand(B, 1, L, L, generator=gen(4)) < 0.3
    check_budget(masked_attention(q, k, v, attn_mask=am), reference_masked_attention(q, k, v, am),
                 F.scaled_dot_product_attention(q, k, v, attn_mask=am), dtype, "bool attn_mask")
    # float attn_mask (L, L) with -inf entries and whole -inf tiles, custom scale
    fm = torch.randn(L, L, generator=gen(5)).to(dtype)
    fm[:, 64:] = -math.inf
    ref = reference_masked_attention(q, k, v, torch.ones(L, L, dtype=torch.bool), scale=0.3, bias=fm)
    check_budget(masked_attention(q, k, v, attn_mask=fm, scale=0.3), ref,
                 F.scaled_dot_product_attention(q, k, v, attn_mask=fm, scale=0.3), dtype, "float attn_mask")


def test_block_mask_and_attn_mask_and_causal_combine():
    B, H, L, D = 2, 2, 130, 32
    q, k, v = qkv(B, H, H, L, L, D, seed=6)
    bm = BlockMask.key_padding(torch.tensor([130, 50]), L)
    am = torch.rand(L, L, generator=gen(7)) < 0.5
    allowed = bm.to_dense() & am & torch.ones(L, L, dtype=torch.bool).tril()
    out = masked_attention(q, k, v, block_mask=bm, attn_mask=am, is_causal=True)
    torch.testing.assert_close(out.double(), reference_masked_attention(q, k, v, allowed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("float_mask", [False, True])
def test_key_padding_mask_broadcasts_over_queries_with_causal(float_mask):
    # (B, 1, 1, Lk) is how encoders pass padding; combined with is_causal it must still broadcast.
    q, k, v = (torch.randn(2, 4, 70, 16, generator=gen(i)) for i in range(3))
    keep = torch.ones(2, 1, 1, 70, dtype=torch.bool)
    keep[1, ..., 50:] = False
    causal = torch.ones(70, 70, dtype=torch.bool).tril()
    am = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) if float_mask else keep
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep & causal)
    torch.testing.assert_close(masked_attention(q, k, v, attn_mask=am, is_causal=True), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked_attention(q, k, v, attn_mask=am), F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                               rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
    B, H, L, D = 2, 2, 70, 32
    q, k, v = qkv(B, H, H, L, L, D, seed=8)
    out = masked_attention(q, k, v, block_mask=BlockMask.key_padding(torch.tensor([0, 5]), L))
    assert torch.all(out[0] == 0) and not torch.isnan(out).any()
    am = torch.ones(L, L, dtype=torch.bool)
    am[3] = False
    out = masked_attention(q, k, v, attn_mask=am)
    assert torch.all(out[:, :, 3] == 0) and not torch.isnan(out).any()
    fm = torch.zeros(L, L)
    fm[9] = -math.inf
    assert torch.all(masked_attention(q, k, v, attn_mask=fm)[:, :, 9] == 0)


def test_skipped_tiles_are_never_read():
    # NaN keys and values in a tile the mask skips: touching them would poison the output.
    B, H, L, D = 1, 2, 128, 64
    q, k, v = qkv(B, H, H, L, L, D, seed=9)
    k[:, :, 64:] = float("nan")
    v[:, :, 64:] = float("nan")
    out = masked_attention(q, k, v, block_mask=BlockMask.causal(L, block_size=(64, 64)) &
                           BlockMask.key_padding(torch.tensor([64]), L, block_size=(64, 64)))
    assert not torch.isnan(out).any()


def test_head_mask_skips_heads_and_leaves_zeros():
    B, H, L, D = 2, 4, 97, 64
    q, k, v = qkv(B, H, 2, L, L, D, seed=10)
    hm = torch.tensor([True, False, True, False])
    k_poison = k.clone()
    out = masked_attention(q, k_poison, v, is_causal=True, head_mask=hm)
    full = masked_attention(q, k, v, is_causal=True)
    assert torch.all(out[:, ~hm] == 0)
    torch.testing.assert_close(out[:, hm], full[:, hm], rtol=0, atol=0)
    # kv head 1 serves query heads 2 and 3; with both pruned its keys are not even packed
    hm2 = torch.tensor([True, True, False, False])
    k_poison[:, 1] = float("nan")
    assert not torch.isnan(masked_attention(q, k_poison, v, head_mask=hm2)).any()


def test_non_contiguous_and_block_sizes_agree():
    B, L, H, D = 2, 100, 3, 48
    g = gen(11)
    x = [torch.randn(B, L, H, D, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)  # (B, H, L, D) views with the head dim contiguous
    assert not q.is_contiguous()
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    ref = reference_masked_attention(q, k, v, allowed)
    for block in ((16, 16), (64, 64), (48, 80), (128, 32), (1, 7)):
        out = masked_attention(q, k, v, block_mask=BlockMask.causal(L, block_size=block))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"block {block}")


def test_opcheck_and_compile():
    B, H, L, D = 1, 2, 70, 32
    q, k, v = qkv(B, H, H, L, L, D, seed=12)
    bm = BlockMask.causal(L) & BlockMask.from_dense_mask(torch.rand(L, L, generator=gen(13)) < 0.7)
    args = (q, k, v, bm.kind, 64, 64, bm.elem_mask, torch.randn(1, 1, L, L, generator=gen(14)),
            -(2 ** 62), 0, torch.tensor([60]), 0.2, torch.tensor([True, False]))
    torch.library.opcheck(torch.ops.pysparse.masked_attention.default, args)
    f = torch.compile(lambda q, k, v, bm: masked_attention(q, k, v, block_mask=bm) * 2, fullgraph=True)
    torch.testing.assert_close(f(q, k, v, bm), masked_attention(q, k, v, block_mask=bm) * 2)
    g = torch.compile(lambda q, k, v: masked_attention(q, k, v, is_causal=True), fullgraph=True)
    torch.testing.assert_close(g(q, k, v), masked_attention(q, k, v, is_causal=True))


# ---- BlockMask ------------------------------------------------------------------------------

def test_block_kinds_from_dense_mask():
    m = torch.zeros(8, 12, dtype=torch.bool)
    m[:4, :4] = True          # tile (0, 0) full
    m[5, 9] = True            # tile (1, 2) partial
    m[:4, 4] = True           # tile (0, 1) partial
    bm = BlockMask.from_dense_mask(m, (4, 4))
    assert bm.kind.tolist() == [[[[2, 1, 0], [0, 0, 1]]]]
    assert torch.equal(bm.to_dense()[0, 0], m)
    assert bm.sparsity == pytest.approx(3 / 6)
    tail = BlockMask.from_dense_mask(torch.ones(5, 5, dtype=torch.bool), (4, 4))  # ragged last tiles
    assert tail.kind.tolist() == [[[[2, 2], [2, 2]]]]


@pytest.mark.parametrize("Lq,Lk,block", [(97, 97, (32, 32)), (64, 130, (16, 64)), (130, 64, (64, 16)), (1, 1, (64, 64))])
def test_band_kinds_are_exact(Lq, Lk, block):
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    for bm, rule in [(BlockMask.causal(Lq, Lk, block_size=block), j <= i),
                     (BlockMask.sliding_window(Lq, 20, Lk=Lk, block_size=block), (j <= i) & (j > i - 20)),
                     (BlockMask.sliding_window(Lq, 20, Lk=Lk, causal=False, block_size=block), (j - i).abs() < 20)]:
        assert torch.equal(bm.to_dense()[0, 0], rule)
        assert torch.equal(bm.kind, BlockMask.from_dense_mask(rule, block).kind)  # tightest kinds


def test_and_or_match_dense_logic():
    L, block = 97, (32, 32)
    a = BlockMask.sliding_window(L, 30, block_size=block)
    b = BlockMask.key_padding(torch.tensor([97, 40, 3]), L, block_size=block)
    c = BlockMask.from_dense_mask(torch.rand(3, 1, L, L, generator=gen(15)) < 0.1, block)
    for x, y in ((a, b), (a, c), (b, c)):
        assert torch.equal((x & y).to_dense(), x.to_dense() & y.to_dense())
        assert torch.equal((x | y).to_dense(), x.to_dense() | y.to_dense())
    with pytest.raises(ValueError, match=r"same lengths and block size"):
        a & BlockMask.causal(L, block_size=(64, 64))


def test_from_flex():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    L = 200

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 70)

    fbm = flex.create_block_mask(mask_mod, 1, 1, L, L, device="cpu", BLOCK_SIZE=64)
    bm = BlockMask.from_flex(fbm)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    assert bm.block_size == (64, 64)
    assert torch.equal(bm.to_dense()[0, 0], (j <= i) & (i - j < 70))
    assert torch.equal(bm.kind[0, 0] == 0, BlockMask.from_dense_mask((j <= i) & (i - j < 70), (64, 64)).kind[0, 0] == 0)
    q, k, v = qkv(1, 2, 2, L, L, 32, seed=16)
    torch.testing.assert_close(masked_attention(q, k, v, block_mask=bm).double(),
                               reference_masked_attention(q, k, v, bm.to_dense()), rtol=1e-5, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("change,exc,msg", [
    (dict(q=(2, 4, 10)), ValueError, r"q must be a 4-D tensor \(B, H, L, D\), got \(2, 4, 10\)"),
    (dict(k_dtype=torch.float64), TypeError, r"q, k and v must share a dtype"),
    (dict(q_dtype=torch.float64, k_dtype=torch.float64, v_dtype=torch.float64), TypeError,
     r"q must be float32, bfloat16 or float16"),
    (dict(k=(2, 3, 10, 16), v=(2, 3, 10, 16)), RuntimeError, r"4 query heads must be a multiple of the 3 key/value heads"),
    (dict(k=(2, 2, 10, 8)), RuntimeError, r"q and k must share the head dim, got 16 and 8"),
    (dict(v=(2, 2, 11, 16)), RuntimeError, r"k and v must have the same heads and length"),
    (dict(k=(1, 2, 10, 16), v=(1, 2, 10, 16)), RuntimeError, r"q, k and v must share the batch size"),
    (dict(attn_mask=torch.ones(3, 10, 10, dtype=torch.bool)), ValueError, r"does not broadcast to \(2, 4, 10, 10\)"),
    (dict(attn_mask=torch.ones(10, 10, dtype=torch.int32)), ValueError, r"attn_mask must be bool or float"),
    (dict(block_mask=BlockMask.causal(12)), ValueError, r"block_mask is for 12x12 but q and k give 10x10"),
    (dict(block_mask="causal"), TypeError, r"block_mask must be a pysparse.BlockMask"),
    (dict(head_mask=torch.ones(3, dtype=torch.bool)), ValueError, r"head_mask must be bool of shape \(4,\)"),
])
def test_bad_input(change, exc, msg):
    g = gen(17)
    shapes = dict(q=(2, 4, 10, 16), k=(2, 2, 10, 16), v=(2, 2, 10, 16))
    t = {n: torch.randn(*change.get(n, s), generator=g).to(change.get(f"{n}_dtype", torch.float32))
         for n, s in shapes.items()}
    kw = {n: change[n] for n in ("attn_mask", "block_mask", "head_mask") if n in change}
    with pytest.raises(exc, match=msg):
        masked_attention(t["q"], t["k"], t["v"], **kw)


def test_raw_op_rejects_a_wrong_block_grid():
    q, k, v = qkv(1, 2, 2, 100, 100, 32)
    kind = torch.ones(1, 1, 2, 3, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"block_kind must have shape \(1 or 1, 2 or 1, 2, 2\) for 100x100 in 64x64"):
        torch.ops.pysparse.masked_attention(q, k, v, kind, 64, 64, None, None, -(2 ** 62), 2 ** 62, None, 1.0, None)
    with pytest.raises(RuntimeError, match=r"elem_mask of shape \[1, 1, 100, 99\] does not broadcast"):
        torch.ops.pysparse.masked_attention(q, k, v, None, 64, 64, torch.ones(1, 1, 100, 99, dtype=torch.bool),
                                            None, -(2 ** 62), 2 ** 62, None, 1.0, None)


def test_block_mask_constructor_errors():
    with pytest.raises(ValueError, match=r"kind must be int8 of shape \(B\|1, H\|1, 2, 2\)"):
        BlockMask(torch.ones(1, 1, 2, 3, dtype=torch.int8), (64, 64), (100, 100))
    with pytest.raises(ValueError, match=r"from_dense_mask needs a bool mask"):
        BlockMask.from_dense_mask(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"window must be >= 1"):
        BlockMask.sliding_window(10, 0)
    with pytest.raises(ValueError, match=r"lengths must be a 1-D integer tensor"):
        BlockMask.key_padding(torch.ones(2, 2), 10)
