"""The fused FFN kernel (pysparse/_triton/kernels/pruned_ffn.py) through its launcher, _triton.pruned_ffn.
Without a GPU it runs under TRITON_INTERPRET=1 on CPU tensors, in fp32 (the interpreter's bf16
tl.dot is wrong) and with large tiles; on a GPU the same tests run on CUDA tensors, each with one
fixed tile (no autotuning: every variant would compile six configs).

Tolerance (fp32): the reference is the unfused sequence in float64 on the same fp32 inputs. The
kernel accumulates both products in fp32, the second one split over hidden chunks whose
partial sums meet in any order (atomics), so an output element is off by fp32 summation error:
bounded by a small multiple of 2**-24 times the sum of the magnitudes of its terms. That scale is
`absref`: the same FFN on |x|, |W| and |b| with the activation's error gain bounded by 1 (as
for relu, and within a factor 1.13 for gelu and silu), times |W3 x| when gated, and errors of
h are carried through |W2|. The bound is conftest's TOL[float32].acc (1e-5, ~170 ulps) times
absref, plus one rounding of the output.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import BSR, CSR, SparseNM
from conftest import assert_close, gen, randn

pytest.importorskip("triton")

_triton = pytest.importorskip("pysparse._triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)
# The interpreter evaluates exp() in numpy, which warns where silu's e^-x saturates to inf (the
# result is still right: x / inf = -0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTS = {"none": lambda h: h, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}
D, HIDDEN = 40, 72  # neither a multiple of the tiles (64 hidden x 128 features, or 16 x 16)
TILE = {"BLOCK_H": 64, "BLOCK_D": 128}
SMALL = {"BLOCK_H": 16, "BLOCK_D": 16}  # 5 hidden chunks, 3 feature chunks with a tail


def reference_pruned_ffn(x, W1, b1, W2, b2, W3, activation, threshold):
    """(out, absref) in float64: the op's unfused definition, and the scale of the fp32
    accumulation error (see the module docstring). W3 None: not gated."""
    x, W1, W2 = x.double(), W1.double(), W2.double()
    b1 = b1.double() if b1 is not None else None
    b2 = b2.double() if b2 is not None else None
    h = ACTS[activation](F.linear(x, W1, b1))
    scale = F.linear(x.abs(), W1.abs(), b1.abs() if b1 is not None else None)
    if W3 is not None:
        h = h * F.linear(x, W3.double())
        scale = scale * F.linear(x.abs(), W3.double().abs())
    if threshold > 0:
        h = h.masked_fill(h.abs() <= threshold, 0)
    out = F.linear(h, W2, b2)
    absref = F.linear(scale, W2.abs(), b2.abs() if b2 is not None else None)
    return out, absref


def weights(seed, gated=True):
    g = gen(seed)
    W1, W2 = randn(HIDDEN, D, g=g), randn(D, HIDDEN, g=g)
    W3 = randn(HIDDEN, D, g=g) if gated else None
    return W1, W2, W3


def pack(fmt, W):
    """(format string, tensor list on DEVICE, the dense weight those tensors stand for)."""
    if fmt == "none":
        return "none", [], None
    if fmt == "dense":
        return fmt, [W.to(DEVICE)], W
    if fmt == "dense_t":
        return fmt, [W.t().contiguous().to(DEVICE)], W
    if fmt.startswith("nm:"):
        n, m = (int(p) for p in fmt[3:].split(":"))
        Wp = pysparse.prune.nm(W, n, m)
        A = SparseNM.from_dense(Wp, n, m).to(DEVICE)
        return fmt, [A.values, A.mask], Wp
    if fmt == "csr":
        Wp = pysparse.prune.magnitude(W, sparsity=0.7)
        A = CSR.from_dense(Wp).to(DEVICE)
    elif fmt == "bsr":
        Wp = pysparse.prune.blocks(W, sparsity=0.5, blocksize=(8, 8))
        A = BSR.from_dense(Wp, (8, 8)).to(DEVICE)
    else:
        raise ValueError(fmt)
    return fmt, [A.crow_indices, A.col_indices, A.values], Wp


def run_case(fmts, T, activation, threshold, *, biases=True, block=TILE, seed=0, x=None, b1=None):
    f1, f2, f3 = fmts
    W1, W2, W3 = weights(seed, gated=f3 != "none")
    f1, w1, W1 = pack(f1, W1)
    f2, w2, W2 = pack(f2, W2)
    f3, w3, W3 = pack(f3, W3)
    g = gen(seed + 1)
    if x is None:
        x = randn(T, D, g=g)
    if biases:
        b1 = randn(HIDDEN, g=g) if b1 is None else b1
        b2 = randn(D, g=g)
    else:
        b1 = b2 = None
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    out = _triton.pruned_ffn(dev(x), f1, w1, dev(b1), f2, w2, dev(b2), f3, w3, HIDDEN, activation,
                             threshold, block=block)
    ref, absref = reference_pruned_ffn(x, W1, b1, W2, b2, W3, activation, threshold)
    assert_close(out.cpu(), ref, absref, torch.float32, what=f"{fmts} T={T} {activation} thr={threshold}")
    return out


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("gated,threshold", [(False, 0.0), (True, 0.5)])
def test_activations(activation, gated, threshold):
    run_case(("dense", "dense", "dense" if gated else "none"), 3, activation, threshold)


# Every format in every slot, the pairs that change the kernel's addressing (N:M W2 chunks,
# dense_t strides) together, 2:4 and 4:8 side by side.
FORMATS = [
    ("dense", "dense_t", "none"),
    ("nm:2:4", "nm:2:4", "nm:2:4"),
    ("nm:4:8", "nm:4:8", "nm:4:8"),
    ("nm:2:4", "dense_t", "dense"),
    ("dense", "nm:4:8", "nm:2:4"),
    ("nm:4:8", "dense", "none"),
]


@pytest.mark.parametrize("fmts", FORMATS, ids="-".join)
@pytest.mark.parametrize("T", [1, 3, 16])
def test_formats(fmts, T):
    run_case(fmts, T, "silu", 0.0, biases=T != 3)


@pytest.mark.parametrize("fmts", [("nm:2:4", "nm:4:8", "nm:4:8"), ("nm:4:8", "dense_t", "nm:2:4"),
                                  ("dense", "dense", "dense")], ids="-".join)
@pytest.mark.parametrize("T", [1, 16])
def test_small_tiles_many_chunks(fmts, T):
    """Five hidden chunks meet in the accumulator; N:M W2 chunks start past column 0 and the
    feature loop has a tail."""
    run_case(fmts, T, "gelu", 0.3, block=SMALL)


@pytest.mark.parametrize("f2", ["dense", "dense_t", "nm:2:4"])
def test_dead_chunks_and_neurons(f2):
    """relu under a bias of -100 kills the first two 16-neuron chunks (the second product is
    skipped there) and every third neuron after (left out of W2's loads for dense_t and N:M)."""
    b1 = randn(HIDDEN, g=gen(7))
    b1[:32] = -100.0
    b1[32::3] = -100.0
    run_case(("dense", f2, "none"), 5, "relu", 0.0, block=SMALL, b1=b1)


def test_threshold_zeroes_everything():
    """Every h is under the threshold: the output is b2, exactly (no chunk adds anything)."""
    W1, W2, W3 = (W.to(DEVICE) for W in weights(0))
    b2 = randn(D, g=gen(2)).to(DEVICE)
    out = _triton.pruned_ffn(randn(4, D, g=gen(1)).to(DEVICE), "dense", [W1], None, "dense", [W2], b2,
                             "dense", [W3], HIDDEN, "gelu", 1e30, block=SMALL)
    torch.testing.assert_close(out, b2.expand(4, D), rtol=0, atol=0)


def test_leading_dims_and_strided_x():
    x = randn(D, 6, g=gen(11)).t()  # (6, D), stride (1, 6)
    run_case(("nm:2:4", "dense", "dense"), 6, "gelu_tanh", 0.0, x=x)
    W1, W2, W3 = weights(0)
    f1, w1, W1 = pack("nm:2:4", W1)
    x3 = x.reshape(2, 3, D)
    W3_cols = W3.t().contiguous().t()  # "dense" takes any strides
    out = _triton.pruned_ffn(x3.to(DEVICE), f1, w1, None, "dense", [W2.to(DEVICE)], None,
                             "dense", [W3_cols.to(DEVICE)], HIDDEN, "gelu_tanh", 0.0, block=TILE)
    assert out.shape == (2, 3, D) and out.dtype == torch.float32
    ref, absref = reference_pruned_ffn(x3, W1, None, W2, None, W3, "gelu_tanh", 0.0)
    assert_close(out.cpu(), ref, absref, torch.float32, what="leading dims")


def no_fused_kernel(monkeypatch):
    launcher = importlib.import_module("pysparse._triton.pruned_ffn")  # the module, not the function
    monkeypatch.setattr(launcher, "pruned_ffn_kernel", None)
    monkeypatch.setattr(launcher, "_ffn_autotuned", None)


def test_csr_and_bsr_fall_back_to_the_unfused_sequence(monkeypatch):
    no_fused_kernel(monkeypatch)
    run_case(("csr", "bsr", "csr"), 3, "silu", 0.1)
    run_case(("bsr", "csr", "none"), 1, "relu", 0.0, biases=False)


@pytest.mark.parametrize("fmts,activation", [(("dense", "dense_t", "dense"), "gelu_tanh"),
                                             (("nm:2:4", "nm:4:8", "none"), "gelu")],
                         ids=["dense", "nm"])
def test_many_tokens_take_the_unfused_sequence(fmts, activation, monkeypatch):
    no_fused_kernel(monkeypatch)
    run_case(fmts, _triton.FFN_MAX_FUSED_TOKENS + 6, activation, 0.2)


def test_several_token_tiles(monkeypatch):
    """Token tiles stop at 64: past that the grid has a second tile row (only reached when the
    fused cutoff is raised)."""
    monkeypatch.setattr(_triton, "FFN_MAX_FUSED_TOKENS", 1000)
    run_case(("nm:2:4", "dense_t", "dense"), 70, "silu", 0.2)


def test_zero_sizes():
    W1, W2, W3 = weights(0)
    x = torch.zeros(0, D, device=DEVICE)
    out = _triton.pruned_ffn(x, "dense", [W1.to(DEVICE)], None, "dense", [W2.to(DEVICE)], None,
                             "none", [], HIDDEN, "relu", 0.0)
    assert out.shape == (0, D)
    b2 = randn(D, g=gen(2)).to(DEVICE)
    out = _triton.pruned_ffn(randn(2, D, g=gen(1)).to(DEVICE), "dense", [torch.zeros(0, D, device=DEVICE)],
                             None, "dense", [torch.zeros(D, 0, device=DEVICE)], b2, "none", [], 0, "relu", 0.0)
    torch.testing.assert_close(out, b2.expand(2, D), rtol=0, atol=0)


@pytest.mark.parametrize("args,match", [
    (dict(f1="nm:3:5"), "N:M needs"),
    (dict(f1="dense_t"), "w1 format must be"),
    (dict(f2="coo"), "w2 format must be"),
    (dict(w2=[]), "takes 1 tensor"),
    (dict(f3="none"), "w3 holds"),
    (dict(hidden=HIDDEN + 1), "must be"),
    (dict(activation="tanh"), "activation must be"),
])
def test_bad_arguments(args, match):
    W1, W2, W3 = weights(0)
    call = dict(f1="dense", w1=[W1.to(DEVICE)], b1=None, f2="dense", w2=[W2.to(DEVICE)], b2=None,
                f3="dense", w3=[W3.to(DEVICE)], hidden=HIDDEN, activation="relu", threshold=0.0)
    call.update(args)
    with pytest.raises(ValueError, match=match):
        _triton.pruned_ffn(randn(2, D, g=gen(1)).to(DEVICE), **call)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 tl.dot, autotuning, dispatch)")
@pytest.mark.parametrize("fmts", [("dense", "dense", "dense"), ("nm:2:4", "nm:2:4", "nm:2:4")], ids="-".join)
def test_op_dispatches_cuda_bf16_here(fmts):
    if not hasattr(torch.ops.pysparse, "pruned_ffn"):
        pytest.skip("this build has no pysparse::pruned_ffn schema")
    d, hidden = 256, 768
    g = gen(21)
    Ws = [randn(hidden, d, g=g), randn(d, hidden, g=g), randn(hidden, d, g=g)]
    packed = [pack(f, (W / 16).to(torch.bfloat16)) for f, W in zip(fmts, (Ws[0], Ws[1], Ws[2]))]
    x = randn(4, d, g=g).to(torch.bfloat16).cuda()
    b1, b2 = (randn(n, g=g).to(torch.bfloat16).cuda() for n in (hidden, d))
    out = torch.ops.pysparse.pruned_ffn(x, packed[0][0], packed[0][1], b1, packed[1][0], packed[1][1], b2,
                                        packed[2][0], packed[2][1], hidden, "silu", 0.0)
    ref, _ = reference_pruned_ffn(x.cpu(), packed[0][2], b1.cpu(), packed[1][2], b2.cpu(), packed[2][2],
                                  "silu", 0.0)
    assert out.dtype == torch.bfloat16
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("fmt,tamper,match", [
    ("csr", lambda t: t[1].__setitem__(3, 10_000), r"^pysparse: a column index is out of range for a matrix with 40 columns$"),
    ("bsr", lambda t: t[0].__setitem__(1, 100), r"^pysparse: row pointers must be non-decreasing, but entry 2"),
    ("nm:2:4", lambda t: t[1].__setitem__((0, 0), 0xFF),
     r"^pysparse: N:M mask row 0 has a group of 4 columns that does not mark exactly 2 positions"),
])
def test_bad_indices_raise_the_cpu_sentences(fmt, tamper, match):
    """The launcher checks each sparse weight's indices (once per tensor version) before the
    kernels read them, with the sentences of the CPU op."""
    W1, W2, W3 = weights(0)
    f1, w1, _ = pack(fmt, W1)
    tamper(w1)
    call = dict(f1=f1, w1=w1, b1=None, f2="dense", w2=[W2.to(DEVICE)], b2=None, f3="none", w3=[], hidden=HIDDEN,
                activation="relu", threshold=0.0)
    with pytest.raises(RuntimeError, match=match):
        _triton.pruned_ffn(randn(2, D, g=gen(1)).to(DEVICE), **call)
    cpu = [t.cpu() for t in w1]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pysparse.pruned_ffn(randn(2, D, g=gen(1)), f1, cpu, None, "dense", [W2], None, "none", [],
                                      HIDDEN, "relu", 0.0)
