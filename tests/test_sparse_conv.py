"""pysparse.nn.SparseConv2d: a drop-in nn.Conv2d over the sparse formats."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pysparse import prune
from pysparse.nn import conv as conv_mod
from pysparse.nn.conv import SparseConv2d
from conftest import assert_close, gen, save_load

# (in, out, kernel, stride, padding, dilation, groups): every path of forward
GEOMETRIES = {
    "1x1": (16, 24, 1, 1, 0, 1, 1),
    "1x1_stride2": (16, 24, 1, 2, 0, 1, 1),
    "1x1_groups4": (16, 24, 1, 1, 0, 1, 4),
    "1x1_padded": (16, 24, 1, 1, 1, 1, 1),
    "3x3_pad1": (8, 12, 3, 1, 1, 1, 1),
    "3x3_pad1_stride2": (8, 12, 3, 2, 1, 1, 1),
    "3x3_dilation2": (8, 12, 3, 1, 2, 2, 1),
    "3x3_groups2": (8, 16, 3, 1, 1, 1, 2),
    "depthwise": (8, 16, 3, 1, 1, 1, 8),
    "5x5_nopad": (4, 8, 5, 1, 0, 1, 1),
    "3x5_stride2x1": (8, 12, (3, 5), (2, 1), (1, 2), 1, 1),
    "4x4_same": (8, 12, 4, 1, "same", 1, 1),
    "3x3_valid": (8, 12, 3, 1, "valid", 1, 1),
}
FORMATS = {"csr90": ("csr", dict(sparsity=0.9)), "csr50": ("csr", dict(sparsity=0.5)),
           "nm24": ("nm", dict(n=2, m=4)), "bsr": ("bsr", dict(sparsity=0.5, blocksize=(4, 4)))}


def make_conv(geom, bias=True, seed=0, dtype=torch.float32):
    cin, cout, k, s, p, d, g = GEOMETRIES[geom]
    torch.manual_seed(seed)
    return torch.nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias).to(dtype).eval()


def supported(conv, fmt, kw):
    K = conv.weight[0].numel()
    if fmt == "nm":
        return K % kw["m"] == 0
    if fmt == "bsr":
        bh, bw = kw["blocksize"]
        return (conv.out_channels // conv.groups) % bh == 0 and K % bw == 0
    return True


def reference(sc, x):
    """fp64 conv2d with the module's pruned weights, and the same on |inputs| (error scale)."""
    W, b = sc.dense_weight().double(), None if sc.bias is None else sc.bias.double()
    conv = sc.to_conv()
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    ref = F.conv2d(x.double(), W, b, *args)
    absref = F.conv2d(x.double().abs(), W.abs(), None if b is None else b.abs(), *args)
    return ref, absref


@pytest.mark.parametrize("geom", list(GEOMETRIES))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matches_conv2d_with_the_pruned_weights(geom, fmt):
    name, kw = FORMATS[fmt]
    conv = make_conv(geom, bias=fmt != "csr50")
    if not supported(conv, name, kw):
        pytest.skip(f"{name} does not fit this layer's {conv.weight.shape[0]}x{conv.weight[0].numel()} matrix")
    before = conv.weight.detach().clone()
    sc = SparseConv2d.from_conv(conv, name, **kw)
    assert torch.equal(conv.weight, before)  # the original is left alone
    dense = sc.to_conv()
    for n in (1, 3):
        x = torch.randn(n, conv.in_channels, 11, 14, generator=gen(n))
        ref, absref = reference(sc, x)
        for layout in ("nchw", "channels_last"):
            xin = x if layout == "nchw" else x.contiguous(memory_format=torch.channels_last)
            y = sc(xin)
            assert_close(y, ref, absref, torch.float32, what=f"{geom} {fmt} batch {n} {layout}")
            with torch.no_grad():
                y_conv = dense(xin)
            torch.testing.assert_close(y, y_conv, rtol=1e-4, atol=1e-4)
            assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                   else torch.contiguous_format)


def test_pruning_criteria_and_to_conv_round_trip():
    conv = make_conv("3x3_pad1", seed=1)
    sc = SparseConv2d.from_conv(conv, "csr", sparsity=0.9)
    back = sc.to_conv()
    for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(back, a) == getattr(conv, a), a
    W, W0 = back.weight.detach(), conv.weight.detach()
    assert (W == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    kept = W != 0
    assert torch.equal(W[kept], W0[kept]) and W0[kept].abs().min() >= W0[~kept].abs().max()  # magnitude
    assert torch.equal(back.bias, conv.bias) and sc.density == pytest.approx(0.1, abs=0.01)
    assert torch.equal(SparseConv2d.from_conv(back, "csr").dense_weight(), W)  # sparsity 0 keeps the zeros

    nm = SparseConv2d.from_conv(conv, "nm", n=2, m=4).to_conv().weight.detach().reshape(12, -1, 4)
    assert torch.all((nm != 0).sum(-1) == 2)
    # activation-aware scores in the conv weight's shape: |w| times a per-input-channel norm
    scores = W0.abs() * torch.rand(8, 1, 1, generator=gen(1))
    aw = SparseConv2d.from_conv(conv, "nm", scores=scores).to_conv().weight.detach()
    assert torch.equal(aw.reshape(12, -1), prune.nm(W0.reshape(12, -1), 2, 4, scores=scores.reshape(12, -1)))
    blk = SparseConv2d.from_conv(make_conv("1x1"), "bsr", sparsity=0.5)  # auto block: 8x8 fits 24x16
    assert blk.sparse_weights[0].blocksize == (8, 8) and blk.density == pytest.approx(0.5)
    assert [SparseConv2d.from_conv(conv, f, **FORMATS[k][1]).format_name for f, k in
            (("csr", "csr90"), ("nm", "nm24"), ("bsr", "bsr"))] == ["csr", "2:4", "bsr"]
    dw = SparseConv2d.from_conv(make_conv("depthwise"), "csr", sparsity=0.5)
    assert dw.format_name == "dense" and dw.density == pytest.approx(0.5, abs=0.01)
    assert "format=csr" in repr(sc) and "kernel_size=(3, 3)" in repr(sc)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_state_dict_round_trip_and_dtype(fmt):
    name, kw = FORMATS[fmt]
    geom = "1x1_groups4" if fmt == "nm24" else "3x3_groups2"
    a = SparseConv2d.from_conv(make_conv(geom, seed=2), name, **kw)
    b = SparseConv2d.from_conv(make_conv(geom, seed=3), name, **kw)  # built the same way, other weights
    x = torch.randn(2, a.in_channels, 9, 10, generator=gen(3))
    sd = save_load(a.state_dict())
    assert any(k.startswith("weight1_") for k in sd)  # one matrix per group
    b.load_state_dict(sd)
    assert torch.equal(b(x), a(x))
    half = SparseConv2d.from_conv(make_conv(geom, seed=2), name, **kw).to(torch.bfloat16)
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), a(x), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("geom", ["1x1", "1x1_stride2", "3x3_pad1", "3x3_groups2"])
@pytest.mark.parametrize("dtype,u", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_16_bit_matches_the_fp64_reference(geom, dtype, u):
    conv = make_conv(geom, seed=4).to(dtype)
    sc = SparseConv2d.from_conv(conv, "csr", sparsity=0.8)
    for n in (1, 2):
        x = torch.randn(n, conv.in_channels, 8, 9, generator=gen(4)).to(dtype)
        ref, absref = reference(sc, x)
        y = sc(x)
        assert y.dtype == dtype
        # the product is rounded to the dtype (unit roundoff u), then again with the bias added
        bound = u * (absref + ref.abs()) + 1e-5 * absref
        assert bool(((y.double() - ref).abs() <= bound).all()), (geom, n)
        torch.testing.assert_close(y, sc.to_conv()(x).detach(), rtol=3e-2, atol=1e-2)


@pytest.mark.parametrize("geom", ["3x3_pad1_stride2", "3x3_groups2", "3x5_stride2x1"])
@pytest.mark.parametrize("rows", [1, 3])
def test_im2col_chunks_of_output_rows(monkeypatch, geom, rows):
    """The im2col budget shrunk so that small inputs run in chunks of 1 or 3 output rows."""
    sc = SparseConv2d.from_conv(make_conv(geom, seed=5), "csr", sparsity=0.5)
    x = torch.randn(2, sc.in_channels, 13, 11, generator=gen(5))
    ref, absref = reference(sc, x)
    Wo = ref.shape[-1]
    monkeypatch.setattr(conv_mod, "_IM2COL_BYTES", sc._kg * Wo * 4 * rows)
    assert_close(sc(x), ref, absref, torch.float32, what="batch of 2")
    assert_close(sc(x[0]), ref[0], absref[0], torch.float32, what="unbatched")
    assert_close(sc(x[:1]), ref[:1], absref[:1], torch.float32, what="batch of 1")


@pytest.mark.parametrize("geom", ["1x1", "1x1_groups4", "3x3_pad1"])
def test_batches_of_zero_one_and_three(geom):
    sc = SparseConv2d.from_conv(make_conv(geom, seed=7), "csr", sparsity=0.9)
    for n in (0, 1, 3):
        x = torch.randn(n, sc.in_channels, 6, 7, generator=gen(7))
        ref, absref = reference(sc, x)
        assert_close(sc(x), ref, absref, torch.float32, what=f"batch of {n}")


@pytest.mark.parametrize("geom,fmt", [("1x1", "csr"), ("3x3_pad1", "csr"), ("3x3_groups2", "nm"),
                                      ("3x5_stride2x1", "csr")])
def test_compile_fullgraph(geom, fmt):
    """k x k layers compile through F.unfold and one batched product per group."""
    conv = make_conv(geom, seed=6)
    sc = SparseConv2d.from_conv(conv, fmt, **({"sparsity": 0.9} if fmt == "csr" else {}))
    x = torch.randn(2, conv.in_channels, 7, 9, generator=gen(6))
    torch.testing.assert_close(torch.compile(sc, fullgraph=True)(x), sc(x))


def test_im2col_buffer_is_shared_safely_across_layers_dtypes_and_threads():
    """The per-thread im2col buffer: layers of different shapes and dtypes interleaved, and two
    threads each running all the layers at once, give bit for bit what each layer gave alone."""
    import threading
    layers = [SparseConv2d.from_conv(make_conv(g, seed=s, dtype=dt), "csr", sparsity=0.5)
              for s, (g, dt) in enumerate([("3x3_pad1", torch.float32), ("5x5_nopad", torch.float32),
                                           ("3x3_groups2", torch.bfloat16), ("3x3_dilation2", torch.float32)])]
    inputs = [torch.randn(2, sc.in_channels, 11, 13, generator=gen(i)).to(sc.bias.dtype) for i, sc in enumerate(layers)]
    with torch.no_grad():  # inference: the chunked path (grad mode is per thread, as in run)
        alone = [sc(x) for sc, x in zip(layers, inputs)]
    failures = []

    @torch.no_grad()
    def run(order):
        for _ in range(3):
            for i in order:
                if not torch.equal(layers[i](inputs[i]), alone[i]):
                    failures.append(f"layer {i} in order {order}")

    threads = [threading.Thread(target=run, args=(o,)) for o in ([0, 1, 2, 3], [3, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run([2, 0, 3, 1])
    assert not failures, failures
    # a forward that autograd records (an eval-mode layer whose input requires grad: the chunked
    # path) gets fresh chunks, so the shared buffer stays out of the graph
    layers[0].eval()
    layers[0](inputs[0].clone().requires_grad_()).sum().backward()
    assert all(not b.requires_grad for b in conv_mod._WORKSPACE.bufs.values())


def test_im2col_buffer_made_under_inference_mode_serves_later_calls(monkeypatch):
    """A buffer first made (or grown) inside torch.inference_mode must stay writable outside it."""
    monkeypatch.setattr(conv_mod, "_WORKSPACE", __import__("threading").local())
    sc = SparseConv2d.from_conv(make_conv("3x3_pad1", seed=3), "csr", sparsity=0.5)
    x = torch.randn(2, 8, 10, 10, generator=gen(3))
    with torch.inference_mode():
        want = sc(x)
    with torch.no_grad():
        assert torch.equal(sc(x), want)
    assert torch.equal(sc(x), want)
    with torch.inference_mode():  # grows the buffer inside inference_mode
        sc(torch.randn(2, 8, 40, 40, generator=gen(4)))
    assert torch.equal(sc(x), want)


def test_jit_trace_of_a_kxk_layer():
    sc = SparseConv2d.from_conv(make_conv("3x3_pad1", seed=5), "csr", sparsity=0.5).eval()
    x = torch.randn(2, 8, 10, 10, generator=gen(5))
    traced = torch.jit.trace(sc, x)  # checks that two traces agree
    torch.testing.assert_close(traced(x), sc(x))


def test_bad_input():
    sc = SparseConv2d.from_conv(make_conv("3x3_pad1"), "csr", sparsity=0.5)
    with pytest.raises(ValueError, match=r"^SparseConv2d: expected 8 input channels, got input of shape \(1, 7, 5, 5\)$"):
        sc(torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match=r"input must be a 3-D \(C, H, W\) or 4-D \(N, C, H, W\) tensor, got shape \(8, 5\)"):
        sc(torch.randn(8, 5))
    with pytest.raises(TypeError, match=r"input is torch.float64 but the weights are torch.float32"):
        sc(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(padded\) is smaller than the dilated kernel"):
        SparseConv2d.from_conv(make_conv("5x5_nopad"), "csr")(torch.randn(1, 4, 3, 3))
    reflect = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"^SparseConv2d supports padding_mode='zeros' only, got 'reflect'$"):
        SparseConv2d.from_conv(reflect)
    with pytest.raises(ValueError, match=r"pysparse.prune.nm: the last dimension \(9\) is not a multiple of m = 4"):
        SparseConv2d.from_conv(torch.nn.Conv2d(1, 4, 3), "nm")
    with pytest.raises(TypeError, match=r"needs an nn.Conv2d, got Linear"):
        SparseConv2d.from_conv(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"format must be 'csr', 'bsr' or 'nm', got 'coo'"):
        SparseConv2d.from_conv(make_conv("1x1"), "coo")
    with pytest.raises(ValueError, match=r"scores apply to format='nm' only"):
        SparseConv2d.from_conv(make_conv("1x1"), "csr", scores=torch.ones(24, 16))
    with pytest.raises(ValueError, match=r"no block of \(32, 16, 8, 4\) divides each group's 6x54 weight"):
        SparseConv2d.from_conv(torch.nn.Conv2d(6, 6, 3), "bsr", sparsity=0.5)
    with pytest.raises(ValueError, match=r"not divisible by the block size \(5, 5\)"):
        SparseConv2d.from_conv(make_conv("1x1"), "bsr", blocksize=(5, 5))
