"""The GPU launchers' memo of checked index tensors: csrc/include/checked_indices.h (the CUDA CSR
launcher's, built here into a small test extension) and pysparse/_checked.py (the Triton
launchers', exercised through them under TRITON_INTERPRET=1). A matrix's indices are checked on
its first product and again after any in-place write; the checks raise the CPU kernels'
sentences; a write that bypasses the version counter can change numbers but never send a kernel
read out of bounds."""
from __future__ import annotations

import gc
import os

import pytest
import torch

import pysparse
from pysparse import _checked
from conftest import gen, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The C++ memo

_MEMO_SRC = r"""
#include <torch/extension.h>
#include "checked_indices.h"
static pysparse::CheckedIndices memo(3);  // a small capacity, to see eviction
bool found(at::Tensor a, at::Tensor b, int64_t p) { return memo.find(a, b, p).has_value(); }
at::Tensor derived(at::Tensor a, at::Tensor b, int64_t p) { return *memo.find(a, b, p); }
void remember(at::Tensor a, at::Tensor b, int64_t p, at::Tensor d) { memo.remember(a, b, p, d); }
int64_t size() { return memo.size(); }
"""


@pytest.fixture(scope="module")
def memo(tmp_path_factory):
    from torch.utils.cpp_extension import load_inline
    return load_inline("pysparse_memo_test", _MEMO_SRC, functions=["found", "derived", "remember", "size"],
                       extra_include_paths=[os.path.join(ROOT, "csrc", "include")], extra_cflags=["-O1"],
                       build_directory=str(tmp_path_factory.mktemp("memo")))


@pytest.mark.slow  # builds a C++ extension on first use
def test_cpp_memo_remembers_until_a_write(memo):
    a, b = torch.arange(5), torch.arange(3)
    assert not memo.found(a, b, 7)
    memo.remember(a, b, 7, torch.tensor([4, 2]))
    assert memo.found(a, b, 7)
    assert torch.equal(memo.derived(a, b, 7), torch.tensor([4, 2]))
    assert not memo.found(a, b, 8)                      # another parameter (the column count)
    assert not memo.found(a.clone(), b, 7)              # equal values, another tensor
    assert not memo.found(a[1:], b, 7)                  # a view is another tensor
    b[0] = 1                                            # an in-place write bumps the version
    assert not memo.found(a, b, 7)
    memo.remember(a, b, 7, torch.tensor([1]))
    assert memo.found(a, b, 7) and torch.equal(memo.derived(a, b, 7), torch.tensor([1]))
    a.resize_(50)                                       # new storage
    assert not memo.found(a, b, 7)


@pytest.mark.slow  # builds a C++ extension on first use
def test_cpp_memo_forgets_dead_tensors_and_the_oldest(memo):
    keep = [(torch.arange(4), torch.arange(2)) for _ in range(3)]
    for x, y in keep:
        memo.remember(x, y, 0, torch.empty(0))
    assert memo.size() == 3 and all(memo.found(x, y, 0) for x, y in keep)
    x, y = torch.arange(4), torch.arange(2)
    memo.remember(x, y, 0, torch.empty(0))              # full: the oldest goes
    assert memo.size() == 3 and not memo.found(*keep[0], 0) and memo.found(x, y, 0)
    del x, y
    gc.collect()
    z = (torch.arange(4), torch.arange(2))
    memo.remember(*z, 0, torch.empty(0))                # the dead entry goes first
    assert memo.size() == 3 and memo.found(*keep[1], 0) and memo.found(*keep[2], 0) and memo.found(*z, 0)


@pytest.mark.slow  # builds a C++ extension on first use
def test_cpp_memo_never_keeps_inference_tensors(memo):
    with torch.inference_mode():
        a = torch.arange(5)
    b = torch.arange(3)
    memo.remember(a, b, 1, torch.empty(0))
    assert not memo.found(a, b, 1)


# ---------------------------------------------------------------------------------------------
# The Python memo

def _counter():
    calls = []
    return calls, lambda: calls.append(1)


def test_python_memo_checks_once_per_version():
    a, b = torch.arange(5), torch.arange(3)
    calls, check = _counter()
    for _ in range(3):
        _checked.once((a, b), "p", check)
    assert len(calls) == 1
    _checked.once((a, b), "q", check)                   # another parameter
    _checked.once((a.clone(), b), "p", check)           # another tensor
    assert len(calls) == 3
    a.add_(1)
    _checked.once((a, b), "p", check)
    _checked.once((a, b), "p", check)
    assert len(calls) == 4


def test_python_memo_does_not_remember_a_failed_check():
    a = torch.arange(5)

    def fail():
        raise RuntimeError("bad")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="bad"):
            _checked.once((a,), "fail", fail)


def test_python_memo_never_keeps_inference_tensors():
    with torch.inference_mode():
        a = torch.arange(5)
    calls, check = _counter()
    _checked.once((a,), "inf", check)
    _checked.once((a,), "inf", check)
    assert len(calls) == 2


def test_python_memo_capacity(monkeypatch):
    monkeypatch.setattr(_checked, "_memo", {})
    monkeypatch.setattr(_checked, "_CAPACITY", 3)
    calls, check = _counter()
    keep = [torch.arange(4) for _ in range(3)]
    for t in keep:
        _checked.once((t,), 0, check)
    dead = torch.arange(4)
    _checked.once((dead,), 0, check)                    # full: the oldest goes
    assert len(_checked._memo) == 3
    _checked.once((keep[0],), 0, check)
    assert len(calls) == 5
    del dead
    gc.collect()
    _checked.once((torch.arange(4),), 0, check)         # the dead entry goes, the rest stay
    before = len(calls)
    _checked.once((keep[0],), 0, check)
    _checked.once((keep[2],), 0, check)
    assert len(calls) == before


# ---------------------------------------------------------------------------------------------
# Through the Triton launchers (interpreter on the CPU, or a GPU)

_triton = None
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    try:
        import pysparse._triton as _triton
    except ImportError:
        pass
needs_triton = pytest.mark.skipif(_triton is None, reason="needs triton and a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_t = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731

# The CPU kernels' sentences (tests/test_bsr_spmm.py RAW_BAD), for the same tampering.
BSR_BAD = {
    "crow[0] != 0": (dict(crow=_t(1, 1, 2)), r"^pysparse: row pointers must start at 0, got 1$"),
    "crow[-1] != nnzb": (dict(crow=_t(0, 1, 1)), r"^pysparse: the last row pointer \(1\) must equal the number of blocks \(2\)$"),
    "decreasing crow": (dict(crow=_t(0, 3, 2)),
                        r"^pysparse: (row pointers must be non-decreasing, but entry 2 \(2\) is below entry 1 \(3\)"
                        r"|the last row pointer)"),
    "negative block column": (dict(col=_t(3, -1)), r"^pysparse: a column index is out of range for a matrix with 4 block columns$"),
    "block column past K": (dict(col=_t(4, 0)), r"^pysparse: a column index is out of range for a matrix with 4 block columns$"),
}


def _bsr_args(**over):
    a = dict(crow=_t(0, 1, 2), col=_t(3, 0), values=torch.ones(2, 16, 16, device=DEVICE), shape=[32, 64],
             dense=torch.ones(64, 2, device=DEVICE))
    a.update(over)
    return a


@needs_triton
@pytest.mark.parametrize("case", list(BSR_BAD))
@pytest.mark.parametrize("op", ["bsr_spmm", "bsr_linear"])
def test_triton_bsr_raises_the_cpu_sentences(op, case):
    over, msg = BSR_BAD[case]
    a = _bsr_args(**over)
    for device in ("cpu", DEVICE):  # the same sentence from the CPU kernel and from the launcher
        t = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        with pytest.raises(RuntimeError, match=msg):
            if op == "bsr_spmm" and device == DEVICE:
                _triton.bsr_spmm(t["crow"], t["col"], t["values"], t["shape"], t["dense"])
            elif device == DEVICE:
                _triton.bsr_linear(t["dense"].t(), t["crow"], t["col"], t["values"], t["shape"])
            elif op == "bsr_spmm":
                pysparse.ops.bsr_spmm(t["crow"], t["col"], t["values"], t["shape"], t["dense"])
            else:
                pysparse.ops.bsr_linear(t["dense"].t(), t["crow"], t["col"], t["values"], t["shape"])


@needs_triton
def test_triton_bsr_checks_again_after_a_write_and_clamps_what_it_cannot_see():
    W = pysparse.prune.blocks(randn(64, 128, g=gen(1)), 0.5, blocksize=(16, 16))
    A = pysparse.BSR.from_dense(W, blocksize=(16, 16)).to(DEVICE)
    X = randn(128, 8, g=gen(2)).to(DEVICE)
    args = (A.crow_indices, A.col_indices, A.values, A.shape)
    torch.testing.assert_close(_triton.bsr_spmm(*args, X).cpu(), W @ X.cpu(), rtol=1e-5, atol=1e-5)
    A.col_indices[0] = 99                                   # in place: seen, checked again
    with pytest.raises(RuntimeError, match="column index is out of range for a matrix with 8 block columns"):
        _triton.bsr_spmm(*args, X)
    A.col_indices[0] = 0
    _triton.bsr_spmm(*args, X)
    # Behind the version counter's back: not checked, but clamped into the matrix (block column 7)
    # and into the stored blocks, never read out of bounds.
    A.col_indices.data[0] = 10_000
    A.crow_indices.data[-1] = 10_000
    out = _triton.bsr_spmm(*args, X).cpu()
    assert torch.isfinite(out).all()
    crow, col, vals, Xc = A.crow_indices.cpu(), A.col_indices.clamp(max=7).cpu(), A.values.cpu(), X.cpu()
    expected = torch.zeros(64, 8)
    for r in range(4):  # blocks summed as the kernel does (block 0 may now share a column)
        for p in range(int(crow[r]), min(int(crow[r + 1]), col.numel())):
            expected[16 * r:16 * r + 16] += vals[p] @ Xc[16 * int(col[p]):16 * int(col[p]) + 16]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_nm_checks_the_mask_once_and_clamps_what_it_cannot_see():
    W = pysparse.prune.nm(randn(32, 64, g=gen(3)), 2, 4)
    A = pysparse.SparseNM.from_dense(W, 2, 4).to(DEVICE)
    x = randn(5, 64, g=gen(4)).to(DEVICE)
    args = (A.values, A.mask, list(A.shape), 2, 4)
    torch.testing.assert_close(_triton.nm_linear(x, *args).cpu(), x.cpu() @ W.t(), rtol=1e-5, atol=1e-5)
    mask = A.mask.clone()
    mask[5, 0] |= 0b0100                                    # three kept positions in row 5's first group
    for fn in (lambda: _triton.nm_linear(x, A.values, mask, list(A.shape), 2, 4),
               lambda: torch.ops.pysparse.nm_linear(x.cpu(), A.values.cpu(), mask.cpu(), list(A.shape), 2, 4, None)):
        with pytest.raises(RuntimeError, match=r"^pysparse: N:M mask row 5 has a group of 4 columns that does not "
                                               r"mark exactly 2 positions \(or marks a column past 64\)$"):
            fn()
    # every group of the last row full: ranks run past the row's values, which the kernel clamps
    A.mask.data[-1] = 0xFF
    out = _triton.nm_linear(x, *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :-1].cpu(), x.cpu() @ W[:-1].t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs)")
@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_gpu_products_check_once_then_capture_in_a_graph(fmt):
    """After its first product a matrix multiplies without a host sync, so the product can be
    captured in a CUDA graph; a matrix never used before cannot be checked inside a capture."""
    def make(seed):
        W = randn(256, 128, g=gen(seed)).half()
        if fmt == "csr":
            return pysparse.CSR.from_dense(pysparse.prune.magnitude(W, 0.9)).to("cuda")
        if fmt == "bsr":
            return pysparse.BSR.from_dense(pysparse.prune.blocks(W, 0.75, blocksize=(32, 32)), blocksize=(32, 32)).to("cuda")
        return pysparse.SparseNM.from_dense(pysparse.prune.nm(W, 2, 4), 2, 4).to("cuda")
    A = make(5)
    x = randn(16, 128, g=gen(6)).half().cuda()
    ref = pysparse.linear(x, A)  # checks A's indices
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pysparse.linear(x, A)
    x.copy_(randn(16, 128, g=gen(7)).half())
    graph.replay()
    torch.testing.assert_close(out, pysparse.linear(x, A))
    assert not torch.equal(out, ref)
    fresh = make(8)  # built outside the capture (its host-to-device copies could not be captured)
    with pytest.raises(RuntimeError, match="checked on its first product, which cannot happen during CUDA graph "
                                           "capture: run the op once before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pysparse.linear(x, fresh)
    with torch.inference_mode():
        frozen = make(9)  # no version counter: checked on every product, so never inside a capture
    pysparse.linear(x, frozen)
    with pytest.raises(RuntimeError, match="made under torch.inference_mode.. has no version counter"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pysparse.linear(x, frozen)
