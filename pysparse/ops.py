"""Typed wrappers over torch.ops.pysparse.* and their fake (meta) implementations.

The schemas live in csrc/registry.cpp; the fake implementations here are what torch.compile and
torch.export trace. ``spmm`` and ``linear`` are the user-facing entry points: they take a format
object and check, in Python and with one sentence per problem, what the kernels would reject.
"""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch

from . import activations
from ._loader import _C  # noqa: F401  (loads the library that defines the ops)
from .formats import BSR, CSR, SparseNM

_ops = torch.ops.pysparse


# ---------------------------------------------------------------------------------------------
# Fake implementations (shape/dtype propagation for compile and export)

def _fake_common(values, dense, shape, what):
    torch._check(len(shape) == 2, lambda: f"pysparse: shape must have 2 entries, got {len(shape)}")
    torch._check(dense.dtype == values.dtype,
                 lambda: f"pysparse: {what} dtype {dense.dtype} differs from the sparse values' dtype {values.dtype}")


@torch.library.register_fake("pysparse::csr_spmm")
def _csr_spmm_fake(crow_indices, col_indices, values, shape, dense):
    _fake_common(values, dense, shape, "dense")
    torch._check(dense.dim() >= 2, lambda: f"pysparse: dense must be (K, n) or a batch (..., K, n), got {dense.dim()}-D")
    torch._check(dense.shape[-2] == shape[1],
                 lambda: f"pysparse: dense has {dense.shape[-2]} rows but the sparse matrix has {shape[1]} columns")
    return dense.new_empty((*dense.shape[:-2], shape[0], dense.shape[-1]))


@torch.library.register_fake("pysparse::bsr_spmm")
def _bsr_spmm_fake(crow_indices, col_indices, values, shape, dense):
    return _csr_spmm_fake(crow_indices, col_indices, values, shape, dense)


@torch.library.register_fake("pysparse::csr_linear")
def _csr_linear_fake(input, crow_indices, col_indices, values, shape, bias):
    _fake_common(values, input, shape, "input")
    torch._check(input.dim() >= 1 and input.shape[-1] == shape[1],
                 lambda: f"pysparse: input's last dimension must equal the sparse matrix's columns ({shape[1]})")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == shape[0],
                     lambda: f"pysparse: bias must have shape ({shape[0]},)")
    return input.new_empty((*input.shape[:-1], shape[0]))


@torch.library.register_fake("pysparse::bsr_linear")
def _bsr_linear_fake(input, crow_indices, col_indices, values, shape, bias):
    return _csr_linear_fake(input, crow_indices, col_indices, values, shape, bias)


@torch.library.register_fake("pysparse::nm_spmm")
def _nm_spmm_fake(values, mask, shape, n, m, dense):
    return _csr_spmm_fake(None, None, values, shape, dense)


@torch.library.register_fake("pysparse::nm_linear")
def _nm_linear_fake(input, values, mask, shape, n, m, bias, activation="none"):
    torch._check(activation in activations.NAMES,
                 lambda: f"pysparse: activation must be one of {activations.NAMES}, got {activation!r}")
    return _csr_linear_fake(input, None, None, values, shape, bias)


@torch.library.register_fake("pysparse::csr_sddmm")
def _csr_sddmm_fake(crow_indices, col_indices, shape, a, b):
    torch._check(len(shape) == 2, lambda: f"pysparse: shape must have 2 entries, got {len(shape)}")
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "pysparse: a and b must be 2-D")
    torch._check(a.dtype == b.dtype, lambda: f"pysparse: a is {a.dtype} but b is {b.dtype}")
    torch._check(a.shape[0] == shape[0] and b.shape[0] == shape[1] and a.shape[1] == b.shape[1],
                 lambda: f"pysparse: a must be ({shape[0]}, n) and b ({shape[1]}, n)")
    return a.new_empty((col_indices.shape[0],))


@torch.library.register_fake("pysparse::csr_transpose_values")
def _csr_transpose_values_fake(values, order):
    torch._check(values.dim() == 1, lambda: "pysparse: values must be 1-D")
    torch._check(order.dim() == 2 and order.shape[0] == 2, lambda: "pysparse: order must be (2, nnz)")
    return values.new_empty((order.shape[1],))


@torch.library.register_kernel("pysparse::csr_transpose_values", "cuda")
def _csr_transpose_values_cuda(values, order):
    # A GPU gathers at full bandwidth in any order: two torch indexing kernels.
    torch._check(values.dim() == 1 and order.dim() == 2 and order.shape[0] == 2 and order.dtype == torch.int32,
                 lambda: "pysparse: csr_transpose_values takes 1-D values and a (2, nnz) int32 order")
    out = values.new_zeros((order.shape[1],))
    out[order[0].long()] = values[order[1].long()]
    return out


@torch.library.register_fake("pysparse::nm_compress")
def _nm_compress_fake(dense, n, m):
    torch._check(dense.dim() == 2, lambda: "pysparse: dense must be 2-D")
    R, K = dense.shape
    return dense.new_empty((R, K // m * n)), dense.new_empty((R, (K + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("pysparse::nm_decompress")
def _nm_decompress_fake(values, mask, shape, n, m):
    return values.new_empty(tuple(shape))


# ---------------------------------------------------------------------------------------------
# Typed wrappers, one per op

def csr_spmm(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
             shape: List[int], dense: torch.Tensor) -> torch.Tensor:
    """A @ dense for A in CSR form (shape (M, K)); dense (K, n) -> (M, n), or a batch (..., K, n)
    -> (..., M, n), in values' dtype."""
    return _ops.csr_spmm.default(crow_indices, col_indices, values, list(shape), dense)


def csr_linear(input: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, shape: List[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input @ A.T + bias for A in CSR form (shape (M, K)); input (..., K) -> (..., M)."""
    return _ops.csr_linear.default(input, crow_indices, col_indices, values, list(shape), bias)


def csr_sddmm(crow_indices: torch.Tensor, col_indices: torch.Tensor, shape: List[int], a: torch.Tensor,
              b: torch.Tensor) -> torch.Tensor:
    """The CSR pattern's sampled product: out[j] = <a[r(j), :], b[col[j], :]> for each stored
    entry j (row r(j)); a (M, n), b (K, n) -> (nnz,), accumulated in fp32. The value gradient of
    csr_spmm and csr_linear (pysparse.autograd)."""
    return _ops.csr_sddmm.default(crow_indices, col_indices, list(shape), a, b)


def csr_transpose_values(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """values of a CSR matrix in its transpose's order: out[order[0, i]] = values[order[1, i]] (positions
    order does not name stay 0). order: (2, nnz) int32, as ``pysparse.autograd.transpose_order`` makes
    it (blocked for locality: 3-5x ``values[perm]`` on large matrices)."""
    return _ops.csr_transpose_values.default(values, order)


def bsr_spmm(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
             shape: List[int], dense: torch.Tensor) -> torch.Tensor:
    """A @ dense for A in BSR form (values (nnzb, bh, bw)); dense (K, n) or (..., K, n) -> (..., M, n)."""
    return _ops.bsr_spmm.default(crow_indices, col_indices, values, list(shape), dense)


def bsr_linear(input: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, shape: List[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input @ A.T + bias for A in BSR form; input (..., K) -> (..., M)."""
    return _ops.bsr_linear.default(input, crow_indices, col_indices, values, list(shape), bias)


def nm_spmm(values: torch.Tensor, mask: torch.Tensor, shape: List[int], n: int, m: int,
            dense: torch.Tensor) -> torch.Tensor:
    """A @ dense for A in N:M form (values (M, K/m*n), mask bitmap (M, ceil(K/8)) uint8); dense
    (K, n) or (..., K, n) -> (..., M, n)."""
    return _ops.nm_spmm.default(values, mask, list(shape), n, m, dense)


def nm_linear(input: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, shape: List[int],
              n: int, m: int, bias: Optional[torch.Tensor] = None, activation: str = "none") -> torch.Tensor:
    """act(input @ A.T + bias) for A in N:M form; activation one of pysparse.activations.NAMES."""
    return _ops.nm_linear.default(input, values, mask, list(shape), n, m, bias, activation)


# ---------------------------------------------------------------------------------------------
# User-facing entry points

def _check_operands(fn: str, A, x: torch.Tensor, what: str) -> None:
    if not isinstance(A, (CSR, BSR, SparseNM)):
        raise TypeError(f"pysparse.{fn}: A must be a pysparse.CSR, BSR or SparseNM/Sparse24, got {type(A).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pysparse.{fn}: {what} must be a tensor, got {type(x).__name__}")
    if x.dtype != A.dtype:
        raise TypeError(f"pysparse.{fn}: {what} is {x.dtype} but A's values are {A.dtype}; "
                        f"convert one of them (A.to({x.dtype}) or {what}.to({A.dtype}))")
    if x.device != A.device:
        raise ValueError(f"pysparse.{fn}: {what} is on {x.device} but A is on {A.device}")


def spmm(A, X: torch.Tensor) -> torch.Tensor:
    """A @ X for a sparse A (CSR, BSR or N:M, shape (M, K)) and a dense X (K, n): returns (M, n).

    X may also be a batch (..., K, n), multiplied matrix by matrix into (..., M, n) (an NCHW 1x1
    convolution is A @ x.view(N, C, H*W)); on the CPU the batch is one call whose threads take
    whole matrices, on CUDA one kernel launch. X may be non-contiguous. Values and X share a dtype
    (float32, bfloat16 or float16); products accumulate in fp32 and the result has the input dtype.
    """
    _check_operands("spmm", A, X, "X")
    if X.dim() < 2 or X.shape[-2] != A.shape[1]:
        raise ValueError(f"pysparse.spmm: A is {A.shape[0]}x{A.shape[1]}, so X must be "
                         f"({A.shape[1]}, n) or (..., {A.shape[1]}, n), got {tuple(X.shape)}")
    return spmm_tensors(A.kind, A.tensors(), A.shape, A.nm, X)


def linear(x: torch.Tensor, A, bias: Optional[torch.Tensor] = None, *,
           activation: str = "none") -> torch.Tensor:
    """act(x @ A.T + bias), the nn.Linear layout: A (out_features, in_features) sparse, x (..., in).

    The bias (and, for N:M formats, a relu) is applied in the kernel's epilogue; the other
    activations (pysparse.activations.NAMES) run over the output right after, while it is in
    cache (on CUDA the Triton N:M kernel fuses them all).
    """
    activations.check(activation, "pysparse.linear")
    _check_operands("linear", A, x, "x")
    if x.dim() < 1 or x.shape[-1] != A.shape[1]:
        raise ValueError(f"pysparse.linear: A is {A.shape[0]}x{A.shape[1]}, so x must end in "
                         f"{A.shape[1]} features, got shape {tuple(x.shape)}")
    if bias is not None:
        _check_operands("linear", A, bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != A.shape[0]:
            raise ValueError(f"pysparse.linear: bias must have shape ({A.shape[0]},), got {tuple(bias.shape)}")
    return linear_tensors(A.kind, A.tensors(), A.shape, A.nm, x, bias, activation)


# ---------------------------------------------------------------------------------------------
# From a format's kind and tensors to its op: the one dispatch that pysparse.spmm/linear and the
# modules keeping their formats as buffers (SparseLinear, SparseConv2d) share. No checks beyond
# the ops' own (the callers' operands are checked, or are their own buffers).

def spmm_tensors(kind: str, tensors, shape, nm, X: torch.Tensor) -> torch.Tensor:
    """A @ X for the format `kind` given as its tensors (see pysparse.formats.FORMATS)."""
    if kind == "nm":
        return nm_spmm(tensors[0], tensors[1], list(shape), nm[0], nm[1], X)
    op = csr_spmm if kind == "csr" else bsr_spmm
    return op(tensors[0], tensors[1], tensors[2], list(shape), X)


def linear_tensors(kind: str, tensors, shape, nm, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   activation: str = "none") -> torch.Tensor:
    """act(x @ A.T + bias) for the format `kind` given as its tensors. N:M fuses the activation
    (and uses cuSPARSELt on CUDA from _CSLT_MIN_TOKENS tokens); CSR/BSR apply it after."""
    if kind == "nm":
        values, mask = tensors
        if _use_cusparselt(x, values, shape, nm):
            return _cusparselt_linear(x, values, mask, shape, bias, activation)
        return nm_linear(x, values, mask, list(shape), nm[0], nm[1], bias, activation)
    op = csr_linear if kind == "csr" else bsr_linear
    y = op(x, tensors[0], tensors[1], tensors[2], list(shape), bias)
    return y if activation == "none" else activations.apply(activation, y)


# ---------------------------------------------------------------------------------------------
# CUDA 2:4 at many tokens: the sparse tensor cores through torch's cuSPARSELt op. Our Triton
# kernel (registered as nm_linear's CUDA kernel) expands the values in registers and wins where
# the weight bytes dominate (decode); from _CSLT_MIN_TOKENS tokens on the product is compute-bound
# and the hardware 2:4 path is the one to use. The compressed weight is made once per values
# tensor and kept beside it (with the tensors' versions, so an in-place update of values or mask
# recompresses). Whether it has run on a GPU: benchmarks/RESULTS.md, GPU sections.

_CSLT_MIN_TOKENS = 64
# values tensor -> ((its state when compressed), the compressed weight): keyed by the tensor, so
# every module or format object sharing it shares the compression, and it goes with the tensor.
_cslt_cache: "weakref.WeakKeyDictionary[torch.Tensor, tuple]" = weakref.WeakKeyDictionary()


def uses_cusparselt(x: torch.Tensor, A) -> bool:
    """Whether linear(x, A) runs on torch's cuSPARSELt op (2:4 bf16/fp16 on CUDA, from
    _CSLT_MIN_TOKENS tokens, where cuSPARSELt is available) rather than pysparse's kernel."""
    return A.kind == "nm" and _use_cusparselt(x, A.values, A.shape, A.nm)


def _use_cusparselt(x: torch.Tensor, values: torch.Tensor, shape, nm) -> bool:
    if not x.is_cuda or tuple(nm) != (2, 4) or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (values.requires_grad or x.requires_grad):
        return False  # torch's compressed weight has no backward here; our op's has (autograd.py)
    if x.numel() // shape[1] < _CSLT_MIN_TOKENS or shape[0] % 64 or shape[1] % 64:
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    return backend is not None and backend.is_available()


def _cusparselt_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, shape, bias,
                       activation: str) -> torch.Tensor:
    key = (values.data_ptr(), values._version, mask.data_ptr(), mask._version)
    cached = _cslt_cache.get(values)
    if cached is None or cached[0] != key:
        dense = SparseNM(values, mask, shape, 2, 4, check=False).to_dense()
        cached = (key, torch._cslt_compress(dense))
        _cslt_cache[values] = cached
    x2 = x.reshape(-1, shape[1])
    pad = (-x2.shape[0]) % 16  # cuSPARSELt wants the dense operand's dims in multiples of 16
    xp = torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2
    y = torch._cslt_sparse_mm(cached[1], xp.t(), bias=bias, transpose_result=True)[: x2.shape[0]]
    if activation != "none":
        y = activations.apply(activation, y)
    return y.reshape(*x.shape[:-1], shape[0])
