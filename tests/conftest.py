"""Shared fixtures and helpers for the pysparse tests.

* ``isa``: every CPU kernel set this machine supports (scalar always), restored to "auto" after.
* ``TOL[dtype]``: the one tolerance table. Accumulation is fp32 for every dtype, so the error of
  an output element against an fp64 reference computed from the *already rounded* inputs is
  (fp32 accumulation error, bounded relative to sum |a| |x| of that element) + (one rounding of
  the output to its dtype, relative to |ref|). See ``check_close``.
* Random sparse matrices, dense operands in several memory layouts, and a module that keeps a
  sparse format's tensors as buffers (state_dict / torch.compile tests).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
from typing import List, Optional, Tuple

import os
import tempfile

# sparsify's kernel-choice cache goes to a throwaway folder, never the user's ~/.cache.
os.environ.setdefault("PYSPARSE_CACHE_DIR", tempfile.mkdtemp(prefix="pysparse-test-cache-"))

# Triton kernels run on CPU tensors under the interpreter where no GPU exists; it has to be set
# before triton is first imported (torch.compile may import it).
import torch as _torch_for_env
if not _torch_for_env.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import pysparse

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# CSR's index_dtype= choices: None (int32 row pointers, int16 columns when K <= 32768), int16
# (the same, or an error), int32, int64.
CSR_INDEX_DTYPES = (None, torch.int16, torch.int32, torch.int64)
SUPPORTED_ISAS = tuple(pysparse._C.cpu_isa_supported())

# Widths of the dense operand around every place the kernels change code path: n == 1 (gemv),
# panel widths 8 (AVX2 vector, AVX-512 narrow vector), 16, 32 and 64 (NV = 1, 2, 4 vectors), and
# more than one panel. Scalar panels are 1, 2 and 4 wide.
WIDTHS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130)


@dataclasses.dataclass(frozen=True)
class Tol:
    acc: float  # fp32 accumulation, relative to sum_k |a_mk| |x_kn| (+ |bias_m|)
    out: float  # rounding of the result to the output dtype, relative to |ref|


# out = 2u, u = 2**-p the unit roundoff of a p-bit significand (fp32 24, fp16 11, bf16 8): round
# to nearest costs at most u |ref|; the factor 2 covers an fp32 sum that lands next to a rounding
# boundary. acc: measured worst case over the samples is ~2e-7 (fp32 sums of up to 3072 terms).
TOL = {
    torch.float32: Tol(acc=1e-5, out=2.0**-23),
    torch.bfloat16: Tol(acc=1e-5, out=2.0**-7),
    torch.float16: Tol(acc=1e-5, out=2.0**-10),
}


def fp32_close(factor: float = 1.0) -> dict:
    """rtol/atol for torch.testing.assert_close on fp32 results where the per-element bound of
    check_close is more than a test needs: TOL[float32].acc for one op, `factor` times it for a
    chain of them (a model block) or two kernels compared with each other."""
    t = factor * TOL[torch.float32].acc
    return dict(rtol=t, atol=t)


# Smallest fp16 subnormal: below that, "relative to |ref|" is meaningless.
_TINY = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-24}


def check_close(out: torch.Tensor, ref: torch.Tensor, absref: torch.Tensor, dtype: torch.dtype,
                *, factor: float = 1.0) -> Optional[str]:
    """None when out (in `dtype`) matches the fp64 reference within TOL[dtype], else why not.

    absref is the same computation on |inputs| (the scale of the fp32 accumulation error).
    factor widens the bound, e.g. 2 when comparing two kernels that each meet it.
    """
    if out.dtype != dtype:
        return f"output dtype {out.dtype}, expected {dtype}"
    if tuple(out.shape) != tuple(ref.shape):
        return f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if out.numel() == 0:
        return None
    t = TOL[dtype]
    err = (out.double() - ref).abs()
    bound = factor * (t.acc * absref + t.out * ref.abs() + _TINY[dtype])
    bad = ~(err <= bound)  # also catches NaN
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten())[0])
        return (f"{int(bad.sum())} of {out.numel()} elements off; first at flat index {i}: "
                f"got {out.flatten()[i].item()!r}, reference {ref.flatten()[i].item()!r}, "
                f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}")
    return None


def assert_close(out, ref, absref, dtype, *, factor=1.0, what=""):
    msg = check_close(out, ref, absref, dtype, factor=factor)
    assert msg is None, f"{what}: {msg}"


def report(failures: List[str]) -> None:
    """Fail once, listing every failing sample (rather than stopping at the first)."""
    assert not failures, f"{len(failures)} sample(s) failed:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Samples shared by the op test files (each file has its own reference_<op> and sample_inputs)


@dataclasses.dataclass(eq=False)
class Sample:
    op: str                        # "spmm" (A @ X) or "linear" (x @ A.T + bias)
    name: str
    W: torch.Tensor                # the dense matrix A (M, K), already in the sample's dtype
    dense: torch.Tensor            # spmm: X (K, n); linear: x (..., K)
    bias: Optional[torch.Tensor] = None
    fmt_kwargs: dict = dataclasses.field(default_factory=dict)  # for <Format>.from_dense
    _ref: Optional[tuple] = dataclasses.field(default=None, repr=False)

    def fmt(self, cls):
        return cls.from_dense(self.W, **self.fmt_kwargs)

    def run(self, cls) -> torch.Tensor:
        A = self.fmt(cls)
        return pysparse.spmm(A, self.dense) if self.op == "spmm" else pysparse.linear(self.dense, A, self.bias)

    def reference(self, reference_spmm, reference_linear):
        """(ref, absref): the fp64 result, and the same on |inputs| (the scale of the fp32
        accumulation error). Computed once per sample."""
        if self._ref is None:
            with single_thread():  # fp64 matmuls on a busy 2-core machine: 1 thread is ~50x faster
                self._ref = self._compute_reference(reference_spmm, reference_linear)
        return self._ref

    def _compute_reference(self, reference_spmm, reference_linear):
        if self.op == "spmm":
            return reference_spmm(self.W, self.dense), reference_spmm(self.W.abs(), self.dense.abs())
        absbias = self.bias.abs() if self.bias is not None else None
        return (reference_linear(self.dense, self.W, self.bias),
                reference_linear(self.dense.abs(), self.W.abs(), absbias))


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread():
    return num_threads(1)


def run_samples(samples, cls, op):
    """{sample name: (sample, output or the exception it raised)} for one op."""
    dup = [k for k, c in collections.Counter(s.name for s in samples).items() if c > 1]
    assert not dup, f"sample names must be unique: {dup}"
    results = {}
    for s in samples:
        if s.op == op:
            try:
                results[s.name] = (s, s.run(cls))
            except Exception as e:  # noqa: BLE001  (report every sample, not just the first)
                results[s.name] = (s, e)
    return results


def _raised(name, e):
    return f"[{name}] raised {type(e).__name__}: {str(e).splitlines()[0]}"


def check_against_reference(samples, cls, op, dtype, refs) -> None:
    """Every sample of `op` matches its fp64 reference within TOL[dtype]."""
    failures = []
    for name, (s, out) in run_samples(samples, cls, op).items():
        if isinstance(out, Exception):
            failures.append(_raised(name, out))
        elif (msg := check_close(out, *s.reference(*refs), dtype)):
            failures.append(f"[{name}] {msg}")
    report(failures)


def check_threads_agree(samples, cls, op, dtype, refs) -> None:
    """Row partitions and panel groups change with the thread count; results must not (beyond
    the bound two kernels that each meet the reference bound can differ by)."""
    outs = {}
    for n in (1, 3):
        with num_threads(n):
            outs[n] = run_samples(samples, cls, op)
    failures = []
    for key, (s, out) in outs[3].items():
        base = outs[1][key][1]
        if isinstance(out, Exception) or isinstance(base, Exception):
            if type(out) is not type(base):
                failures.append(f"[3 vs 1 threads, {key}] {out!r} vs {base!r}")
        elif (msg := check_close(out, base.double(), s.reference(*refs)[1], dtype, factor=2.0)):
            failures.append(f"[3 vs 1 threads, {key}] {msg}")
    report(failures)


def check_isas_agree(samples, cls, op, dtype, refs) -> None:
    """Every ISA's result is the scalar kernels' result up to fp32 summation order (and one
    output rounding for 16-bit types): twice the reference bound."""
    outs = {}
    try:
        for name in SUPPORTED_ISAS:
            pysparse.set_cpu_isa(name)
            outs[name] = run_samples(samples, cls, op)
    finally:
        pysparse.set_cpu_isa("auto")
    failures = []
    for name in SUPPORTED_ISAS[1:]:
        for key, (s, out) in outs[name].items():
            base = outs["scalar"][key][1]
            if isinstance(out, Exception) or isinstance(base, Exception):
                if type(out) is not type(base):
                    failures.append(f"[{name} vs scalar, {key}] {out!r} vs {base!r}")
            elif (msg := check_close(out, base.double(), s.reference(*refs)[1], dtype, factor=2.0)):
                failures.append(f"[{name} vs scalar, {key}] {msg}")
    report(failures)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Run the test on one CPU kernel set; afterwards the best one ("auto") is back in use."""
    assert pysparse.set_cpu_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        pysparse.set_cpu_isa("auto")


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


# ---------------------------------------------------------------------------------------------
# Random operands (deterministic: every helper takes a torch.Generator)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, g: torch.Generator, device="cpu") -> torch.Tensor:
    """Standard normal values, rounded once to `dtype` (the reference uses the rounded values)."""
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def random_sparse(M: int, K: int, density: float, dtype, g: torch.Generator, *,
                  empty_rows: bool = True, device="cpu") -> torch.Tensor:
    """Dense (M, K) with about `density` nonzeros; every 5th row (first row included) empty."""
    mask = torch.rand(M, K, generator=g) < density
    if empty_rows:
        mask[::5] = False
        if M > 3:
            mask[M // 2:M // 2 + 2] = False  # a run of empty rows in the middle
    W = randn(M, K, g=g) * mask
    return W.to(dtype=dtype, device=device)


def random_block_sparse(M: int, K: int, blocksize: Tuple[int, int], density: float, dtype,
                        g: torch.Generator, *, empty_rows: bool = True, device="cpu") -> torch.Tensor:
    """Dense (M, K) whose nonzeros sit in about `density` of the (bh, bw) blocks. Every 3rd block
    row is empty, and a tenth of the entries inside kept blocks are zero (stored explicitly)."""
    bh, bw = blocksize
    Mb, Kb = M // bh, K // bw
    keep = torch.rand(Mb, Kb, generator=g) < density
    if empty_rows:
        keep[::3] = False
    full = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    inner = torch.rand(M, K, generator=g) >= 0.1
    W = randn(M, K, g=g) * (full & inner)
    return W.to(dtype=dtype, device=device)


LAYOUTS = ("contiguous", "transposed", "col_step", "row_step", "expanded")


def dense_operand(K: int, n: int, dtype, g: torch.Generator, layout: str = "contiguous",
                  device="cpu") -> torch.Tensor:
    """A (K, n) tensor in one of LAYOUTS:
    contiguous; transposed (column-major, from a (n, K) tensor); col_step / row_step (every
    second column / row of a larger tensor); expanded (a stride-0 broadcast of one column)."""
    if layout == "contiguous":
        X = randn(K, n, dtype=dtype, g=g)
    elif layout == "transposed":
        X = randn(n, K, dtype=dtype, g=g).t()
    elif layout == "col_step":
        X = randn(K, 2 * n, dtype=dtype, g=g)[:, ::2]
    elif layout == "row_step":
        X = randn(2 * K, n, dtype=dtype, g=g)[::2]
    elif layout == "expanded":
        X = randn(K, 1, dtype=dtype, g=g).expand(K, n)
    else:
        raise ValueError(layout)
    assert X.shape == (K, n)
    return X.to(device)


# ---------------------------------------------------------------------------------------------
# A module that keeps a format's tensors as buffers (what pysparse.nn will look like)


class SparseLinearModule(torch.nn.Module):
    """y = x @ A.T + bias with A's tensors (format.state_dict() names) registered as buffers."""

    def __init__(self, A, bias: Optional[torch.Tensor] = None):
        super().__init__()
        for name, t in A.state_dict().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self.fmt = type(A)
        self.out_features, self.in_features = A.shape

    @classmethod
    def from_state_dict(cls, fmt, sd):
        return cls(fmt.from_state_dict(sd), sd.get("bias"))

    def forward(self, x):
        A = self.fmt(self.crow_indices, self.col_indices, self.values,
                     (self.out_features, self.in_features), check=False)
        return pysparse.linear(x, A, self.bias)


def save_load(obj):
    """torch.save into memory and back with weights_only=True (plain tensors only)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# Markers, for `make test-fast` (the edit loop: pytest -m "not slow and not compile and not emu and
# not interp and not fuzz", under a minute) while `make test` runs everything.
MARKERS = {
    "fuzz": "hypothesis-generated inputs run in a child process (tests/test_fuzz.py)",
    "slow": "a test of several seconds: the demo, examples, subprocesses that build or import anew",
    "compile": "calls torch.compile or torch.library.opcheck (seconds of tracing each)",
    "emu": "runs CUDA device code on the CPU emulator (tests/cuda_emu, built with g++ on first use)",
    "interp": "runs Triton kernels under TRITON_INTERPRET=1 (tests/test_triton_*.py)",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def train_losses(nets, X, Y, masks, *, steps: int, lr: float) -> dict:
    """{name: final MSE} after `steps` Adam steps of each net in `nets` ({name: module}) on
    (X, Y); the net named "dense" gets `masks` ((weight, keep) pairs) re-applied after every step:
    masked dense training, the reference a sparse model's training is compared with."""
    import torch.nn.functional as F
    losses = {}
    for name, net in nets.items():
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(net(X), Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if name == "dense":
                with torch.no_grad():
                    for w, keep in masks:
                        w.mul_(keep)
        with torch.no_grad():
            losses[name] = float(F.mse_loss(net(X), Y))
    return losses


def pytest_collection_modifyitems(items):
    """emu and interp by file, compile by what the test's code calls (a new compile test is
    marked without anyone remembering to); fuzz and slow are written on the tests."""
    import inspect

    for item in items:
        path = item.path.name
        if path == "test_cuda_emulated.py":
            item.add_marker(pytest.mark.emu)
        elif path.startswith("test_triton_"):
            item.add_marker(pytest.mark.interp)
        fn = getattr(item, "function", None)
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            src = ""
        if "torch.compile(" in src or "opcheck(" in src:
            item.add_marker(pytest.mark.compile)
