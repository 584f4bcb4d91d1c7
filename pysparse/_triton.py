"""Launchers for the Triton kernels in triton_kernels/ (GPU path; runs on CPU tensors under
TRITON_INTERPRET=1, which is how CI tests it).

Importing this module needs triton. On CUDA, pysparse.linear sends N:M weights here (the CUDA
kernel registered for pysparse::nm_linear below), and pysparse::masked_attention runs the
block-sparse attention kernel.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton

from triton_kernels.masked_attention import configs as attn_configs, masked_attention_kernel
from triton_kernels.nm_linear import configs, nm_linear_kernel

from . import _checked
from .formats import BSR, CSR, _NM_CHOICES

_ACT = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "gelu_tanh": 4}  # triton_kernels/_tiles.py
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_autotuned = triton.autotune(configs=configs(), key=["T", "R", "K", "N", "M"])(nm_linear_kernel)


def _nm_operand(values: torch.Tensor, mask: torch.Tensor, shape, n: int, m: int):
    """(R, K) after the checks the CPU launcher makes of an N:M operand (csrc/include/checks.h),
    with its sentences."""
    if m not in (4, 8, 16):
        raise RuntimeError(f"pysparse: N:M needs m in (4, 8, 16), got {m}")
    if not 0 < n < m:
        raise RuntimeError(f"pysparse: N:M needs 0 < n < m, got {n}:{m}")
    for name, t in (("N:M values", values), ("N:M mask", mask)):
        if t.dim() != 2:
            raise RuntimeError(f"pysparse: {name} must be 2-D, got shape {list(t.shape)}")
    if len(shape) != 2:
        raise RuntimeError(f"pysparse: shape must have 2 entries, got {len(shape)}")
    R, K = (int(s) for s in shape)
    if R < 0 or K < 0 or K % m:
        raise RuntimeError(f"pysparse: N:M shape ({R}, {K}) needs non-negative sizes and columns divisible by m = {m}")
    if tuple(values.shape) != (R, K // m * n):
        raise RuntimeError(f"pysparse: N:M values must have shape ({R}, {K // m * n}), got {list(values.shape)}")
    if mask.dtype != torch.uint8:
        raise TypeError(f"pysparse: N:M mask must be uint8, got {mask.dtype}")
    if tuple(mask.shape) != (R, (K + 7) // 8):
        raise RuntimeError(f"pysparse: N:M mask must have shape ({R}, {(K + 7) // 8}), got {list(mask.shape)}")
    return R, K


def nm_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, shape, n: int, m: int,
              bias: Optional[torch.Tensor] = None, activation: str = "none",
              block: Optional[dict] = None) -> torch.Tensor:
    """act(x @ A^T + bias) for A = (values, mask) in N:M form; x (..., K) -> (..., R).

    `block` fixes the tile sizes (BLOCK_T/BLOCK_R/BLOCK_K, num_warps) instead of autotuning; the
    interpreter always uses one large tile (its programs run one after another).
    """
    R, K = _nm_operand(values, mask, shape, n, m)
    _checked.nm_mask(mask, R, K, n, m)
    values, mask = values.contiguous(), mask.contiguous()
    x2 = x.reshape(-1, K)
    T = x2.shape[0]
    y = torch.empty((T, R), dtype=x.dtype, device=x.device)
    args = (x2, values, mask, bias if bias is not None else values, y, T, R, K,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1))
    meta = dict(N=n, M=m, HAS_BIAS=bias is not None, ACT=_ACT[activation])
    if block is None and _INTERPRET:
        block = {"BLOCK_T": 16, "BLOCK_R": 64, "BLOCK_K": 64}
    if block is not None:
        grid = (triton.cdiv(R, block["BLOCK_R"]), triton.cdiv(T, block["BLOCK_T"]))
        nm_linear_kernel[grid](*args, **meta, **block)
    else:
        grid = lambda c: (triton.cdiv(R, c["BLOCK_R"]), triton.cdiv(T, c["BLOCK_T"]))
        _autotuned[grid](*args, **meta)
    return y.reshape(*x.shape[:-1], R)


@torch.library.register_kernel("pysparse::nm_linear", "cuda")
def _nm_linear_cuda(input, values, mask, shape, n, m, bias, activation="none"):
    return nm_linear(input, values, mask, shape, n, m, bias, activation)


def nm_spmm(values, mask, shape, n, m, dense):
    """A @ dense for A in N:M form; dense (K, n) or a batch (..., K, n) -> (..., M, n), computed
    as (dense^T @ A^T)^T by nm_linear and made contiguous (the layout the fake implementation
    and the CPU kernel give)."""
    if dense.dim() < 2:
        raise ValueError(f"nm_spmm: dense must be (K, n) or a batch (..., K, n), got {dense.dim()}-D")
    y = nm_linear(dense.transpose(-1, -2), values, mask, shape, n, m)
    return y.transpose(-1, -2).contiguous()


@torch.library.register_kernel("pysparse::nm_spmm", "cuda")
def _nm_spmm_cuda(values, mask, shape, n, m, dense):
    return nm_spmm(values, mask, shape, n, m, dense)


# ---------------------------------------------------------------------------------------------
# Block-sparse masked attention (triton_kernels/masked_attention.py)

_INT32_SAFE = 2**31 - 1
_attn_autotuned = triton.autotune(
    configs=attn_configs(), key=["Lq", "Lk", "D", "BLOCK_M", "BLOCK_N", "HAS_MASK", "HAS_BIAS"]
)(masked_attention_kernel)


def _kv_lists(block_kind: Optional[torch.Tensor], QB: int, KB: int, device):
    """(kv_num (Bb, Hb, QB) int32, kv_idx (Bb, Hb, QB, KB) int32, kv_full (Bb, Hb, QB, KB) int8):
    each query block's active key blocks first, in ascending order, and whether each is full."""
    if block_kind is None:
        kv_num = torch.full((1, 1, QB), KB, dtype=torch.int32, device=device)
        kv_idx = torch.arange(KB, dtype=torch.int32, device=device).expand(1, 1, QB, KB).contiguous()
        return kv_num, kv_idx, torch.zeros((1, 1, QB, KB), dtype=torch.int8, device=device)
    active = block_kind != 0
    kv_num = active.sum(-1, dtype=torch.int32)
    # A stable sort on "inactive" moves the active blocks to the front and keeps them ascending.
    order = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices
    kv_full = (block_kind.gather(-1, order) == 2).to(torch.int8)
    return kv_num.contiguous(), order.to(torch.int32).contiguous(), kv_full.contiguous()


def _strides4(t: Optional[torch.Tensor], shape):
    """t broadcast to `shape` (stride 0 on broadcast dims) and its strides; zeros when t is None."""
    if t is None:
        return None, (0, 0, 0, 0)
    e = t.expand(shape)
    return e, tuple(e.stride())


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     block_kind: Optional[torch.Tensor], block_q: int, block_k: int,
                     elem_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     band_lo: int, band_hi: int, kv_len: Optional[torch.Tensor], scale: float,
                     head_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias, over the allowed keys) @ v, visiting only active blocks.

    q (B, H, Lq, D), k and v (B, Hkv, Lk, D), H % Hkv == 0; any strides. block_kind int8
    (Bb|1, Hb|1, ceil(Lq/block_q), ceil(Lk/block_k)): 0 skip, 1 partial, 2 full; None = all
    partial. On partial blocks key j is allowed for query i iff elem_mask[b, h, i, j] (bool,
    broadcastable to (B, H, Lq, Lk)), band_lo <= j - i <= band_hi and j < kv_len[b]; full blocks
    allow every in-range key. bias (broadcastable) is added on every visited block. Rows with no
    allowed key, and heads with head_mask False, are zeros. block_q and block_k (powers of two
    >= 16) are the kernel's tiles.
    """
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"masked_attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} differ")
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"masked_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"masked_attention: H = {H} is not a multiple of Hkv = {Hkv}")
    if not 1 <= D <= 256:
        raise ValueError(f"masked_attention: head dim {D} is outside 1..256")
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"masked_attention: {name} = {bs} must be a power of two >= 16")
    QB, KB = triton.cdiv(Lq, block_q), triton.cdiv(Lk, block_k)
    if block_kind is not None and (block_kind.dim() != 4 or tuple(block_kind.shape[2:]) != (QB, KB)
                                   or block_kind.shape[0] not in (1, B) or block_kind.shape[1] not in (1, H)):
        raise ValueError(f"masked_attention: block_kind {tuple(block_kind.shape)} must be "
                         f"(1 or {B}, 1 or {H}, {QB}, {KB})")
    if block_kind is not None:
        _checked.block_kinds(block_kind)
    if kv_len is not None and tuple(kv_len.shape) != (B,):
        raise ValueError(f"masked_attention: kv_len {tuple(kv_len.shape)} must be ({B},)")
    if head_mask is not None and tuple(head_mask.shape) != (H,):
        raise ValueError(f"masked_attention: head_mask {tuple(head_mask.shape)} must be ({H},)")
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Lk == 0:
        return out.zero_()

    kv_num, kv_idx, kv_full = _kv_lists(block_kind, QB, KB, q.device)
    kv_num = kv_num.expand(B, H, QB)
    kv_idx = kv_idx.expand(B, H, QB, KB)
    if elem_mask is not None:
        elem_mask = elem_mask.view(torch.uint8) if elem_mask.dtype == torch.bool else elem_mask
    elem_mask, mask_strides = _strides4(elem_mask, (B, H, Lq, Lk))
    bias, bias_strides = _strides4(bias, (B, H, Lq, Lk))
    # j - i lies in [-(Lq - 1), Lk - 1]: a band covering that range cuts nothing, and clipping
    # either bound to int32 changes nothing either.
    has_band = band_lo > -(Lq - 1) or band_hi < Lk - 1
    band_lo = max(-_INT32_SAFE, min(_INT32_SAFE, int(band_lo)))
    band_hi = max(-_INT32_SAFE, min(_INT32_SAFE, int(band_hi)))
    if head_mask is not None and head_mask.dtype == torch.bool:
        head_mask = head_mask.view(torch.uint8)
    # Any pointer stands in for an absent operand: its flag keeps the kernel from reading it.
    args = (q, k, v, out, kv_num, kv_idx, kv_full,
            elem_mask if elem_mask is not None else kv_full, bias if bias is not None else q,
            kv_len if kv_len is not None else kv_num, head_mask if head_mask is not None else kv_full,
            float(scale) * 1.4426950408889634, band_lo, band_hi, H, H // Hkv, Lq, Lk, D,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *kv_num.stride(), *kv_idx.stride()[:3], *mask_strides, *bias_strides)
    meta = dict(HAS_MASK=elem_mask is not None, HAS_BIAS=bias is not None, HAS_BAND=has_band,
                HAS_KV_LEN=kv_len is not None, HAS_HEAD_MASK=head_mask is not None,
                # fp32 means fp32: tl.dot would otherwise round its inputs to tf32.
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=max(16, triton.next_power_of_2(D)))
    grid = (QB * B * H,)
    if _INTERPRET:
        masked_attention_kernel[grid](*args, **meta, num_warps=4)
    elif q.dtype == torch.float32:
        # fp32 is the accuracy path, not the fast one: one unpipelined stage keeps 64 x 64 tiles
        # at D = 256 within shared memory, and skipping the autotuner saves a compile per config.
        masked_attention_kernel[grid](*args, **meta, num_warps=4, num_stages=1)
    else:
        _attn_autotuned[grid](*args, **meta)
    return out


@torch.library.register_kernel("pysparse::masked_attention", "cuda")
def _masked_attention_cuda(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo,
                           band_hi, kv_len, scale, head_mask):
    return masked_attention(q, k, v, block_kind, block_q, block_k, elem_mask, bias, band_lo,
                            band_hi, kv_len, scale, head_mask)


# ---------------------------------------------------------------------------------------------
# Fused FFN at decode (triton_kernels/pruned_ffn.py)

import torch.nn.functional as F  # noqa: E402

from triton_kernels.pruned_ffn import configs as ffn_configs, pruned_ffn_kernel  # noqa: E402


# Up to this many tokens the fused kernel runs: it streams the weights once, and at decode that
# is the whole cost. Past it every further 64 tokens re-read every weight, the atomics grow with
# the tokens, and the products approach the compute-bound regime where cuBLAS
# (F.linear -> act -> F.linear) uses the tensor cores better. 64 is a first guess, not a
# measurement: move it to where the gpu_bench.py FFN table crosses over.
FFN_MAX_FUSED_TOKENS = 64
_FFN_CODE = {"dense": 0, "dense_t": 1, "nm": 2}  # the kernel's F1/F2/F3
# The token count is in the key because the best BLOCK_H moves with it (more tokens, more
# atomics per program). The accumulator is filled with b2 before the launch and summed into with
# atomics, so every config the tuner tries must start from that same content.
_ffn_autotuned = triton.autotune(configs=ffn_configs(),
                                 key=["T", "D", "HIDDEN", "BLOCK_T", "F1", "F2", "F3", "GATED"],
                                 restore_value=["out_ptr"])(pruned_ffn_kernel)


class _FFNWeight:
    """One weight of the FFN as given to the op: kind (dense, dense_t, nm, csr, bsr), its
    tensors, its nn.Linear shape (R, K), and n, m for N:M."""

    def __init__(self, name: str, fmt: str, tensors, shape, allow_t: bool):
        self.name, self.shape, self.tensors, self.n, self.m = name, shape, list(tensors), 0, 0
        kind = fmt
        if fmt.startswith("nm:"):
            kind = "nm"
            try:
                self.n, self.m = (int(p) for p in fmt[3:].split(":"))
            except ValueError:
                raise ValueError(f"pruned_ffn: {name} format {fmt!r} is not nm:N:M") from None
            if (self.n, self.m) not in _NM_CHOICES:
                raise ValueError(f"pruned_ffn: {name} is {fmt}; N:M needs m in (4, 8, 16) and 0 < n < m")
        counts = {"dense": 1, "dense_t": 1, "nm": 2, "csr": 3, "bsr": 3}
        if kind not in counts or (kind == "dense_t" and not allow_t):
            allowed = "dense, " + ("dense_t, " if allow_t else "") + "nm:N:M, csr or bsr"
            raise ValueError(f"pruned_ffn: {name} format must be {allowed}, got {fmt!r}")
        if len(self.tensors) != counts[kind]:
            raise ValueError(f"pruned_ffn: {name} in format {fmt!r} takes {counts[kind]} tensor(s), "
                             f"got {len(self.tensors)}")
        self.kind = kind
        R, K = shape
        if kind == "dense" and tuple(self.tensors[0].shape) != (R, K):
            raise ValueError(f"pruned_ffn: {name} must be {(R, K)}, got {tuple(self.tensors[0].shape)}")
        if kind == "dense_t" and tuple(self.tensors[0].shape) != (K, R):
            raise ValueError(f"pruned_ffn: {name} given transposed must be {(K, R)}, got "
                             f"{tuple(self.tensors[0].shape)}")
        if kind == "nm":
            values, mask = self.tensors
            if K % self.m:
                raise ValueError(f"pruned_ffn: {name} has {K} columns, not a multiple of m = {self.m}")
            if tuple(values.shape) != (R, K // self.m * self.n):
                raise ValueError(f"pruned_ffn: {name} values must be {(R, K // self.m * self.n)}, got "
                                 f"{tuple(values.shape)}")
            if mask.dtype != torch.uint8 or tuple(mask.shape) != (R, (K + 7) // 8):
                raise ValueError(f"pruned_ffn: {name} mask must be uint8 {(R, (K + 7) // 8)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            _checked.nm_mask(mask, R, K, self.n, self.m)
        if kind in ("csr", "bsr"):
            crow, col, values = self.tensors
            bh, bw = tuple(values.shape[1:]) if kind == "bsr" and values.dim() == 3 else (1, 1)
            if (values.dim() != (3 if kind == "bsr" else 1) or R % bh or K % bw or crow.dim() != 1
                    or crow.numel() != R // bh + 1 or col.dim() != 1 or col.numel() != values.shape[0]):
                raise ValueError(f"pruned_ffn: {name} in format {kind} must be crow_indices ({R // bh + 1},), "
                                 f"col_indices (nnz,) and values (nnz{', bh, bw' if kind == 'bsr' else ''}) with "
                                 f"{'blocks dividing ' if kind == 'bsr' else 'shape '}{(R, K)}, got "
                                 f"{tuple(crow.shape)}, {tuple(col.shape)}, {tuple(values.shape)}")
            _checked.compressed(crow, col, K // bw, "blocks" if kind == "bsr" else "nonzeros")

    @property
    def values(self) -> torch.Tensor:
        return self.tensors[0] if self.kind in ("dense", "dense_t", "nm") else self.tensors[2]

    def kernel_args(self):
        """(pointer, bitmap pointer, stride over R, stride over K) for the fused kernel."""
        if self.kind == "nm":
            return self.tensors[0].contiguous(), self.tensors[1].contiguous(), 0, 0
        W = self.tensors[0]
        if self.kind == "dense_t":
            return W, W, W.stride(1), W.stride(0)
        return W, W, W.stride(0), W.stride(1)

    def dense(self) -> torch.Tensor:
        """The (R, K) weight as a dense tensor, rebuilt with torch ops for csr/bsr (no CUDA
        kernel of pysparse multiplies those), an allocation and a scatter on every call."""
        if self.kind == "dense":
            return self.tensors[0]
        if self.kind == "dense_t":
            return self.tensors[0].t()
        cls = CSR if self.kind == "csr" else BSR
        return cls(*self.tensors, self.shape, check=False).to_dense()

    def linear(self, inp: torch.Tensor, bias: Optional[torch.Tensor], activation: str):
        """(act(inp @ W^T + bias), or without act where it was not applied here; applied?)."""
        if self.kind == "nm":
            fused = activation if activation in _ACT else "none"
            values, mask = self.tensors
            return nm_linear(inp, values, mask, self.shape, self.n, self.m, bias, fused), fused == activation
        return F.linear(inp, self.dense(), bias), activation == "none"


def _ffn_act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    return h


def _ffn_unfused(x, s1, b1, s2, b2, s3, activation, threshold):
    """The op as separate products: F.linear (cuBLAS) for dense weights, the nm_linear kernel
    for N:M ones (the activation fused into its epilogue when it has it), dense rebuilds for
    csr/bsr; h round-trips through memory in x's dtype."""
    h, done = s1.linear(x, b1, activation)
    if not done:
        h = _ffn_act(h, activation)
    if s3 is not None:
        h = h * s3.linear(x, None, "none")[0]
    if threshold > 0:
        h = h.masked_fill(h.abs() <= threshold, 0)
    return s2.linear(h, b2, "none")[0]


def pruned_ffn(x: torch.Tensor, f1: str, w1, b1: Optional[torch.Tensor], f2: str, w2,
               b2: Optional[torch.Tensor], f3: str, w3, hidden: int, activation: str,
               threshold: float, *, block: Optional[dict] = None) -> torch.Tensor:
    """out = W2 g(x) + b2, g(x) = act(W1 x + b1) [* (W3 x)], g zeroed where |g| <= threshold
    (threshold > 0); x (..., d) -> (..., d) in x's dtype. The arguments are pysparse::pruned_ffn's.

    Up to FFN_MAX_FUSED_TOKENS tokens, with W1/W3 dense or N:M and W2 dense, dense_t or N:M, this
    is the fused kernel: g stays in fp32 registers (it is rounded to x's dtype only as the second
    product's operand), and the output is summed with fp32 atomics, so it is not bitwise
    reproducible from run to run. Otherwise it is the unfused sequence (_ffn_unfused). csr/bsr
    weights are rebuilt dense on every call there: correct, not fast.
    `block` fixes the kernel's BLOCK_H (a power of two >= 16) and BLOCK_D (>= 16) instead of
    autotuning; the interpreter always uses one large tile.
    """
    if activation not in _ACT:
        raise ValueError(f"pruned_ffn: activation must be one of {tuple(_ACT)}, got {activation!r}")
    d, hidden, threshold = x.shape[-1], int(hidden), float(threshold)
    s1 = _FFNWeight("w1", f1, w1, (hidden, d), allow_t=False)
    s2 = _FFNWeight("w2", f2, w2, (d, hidden), allow_t=True)
    if f3 == "none":
        if len(w3):
            raise ValueError(f"pruned_ffn: f3 is 'none' but w3 holds {len(w3)} tensor(s)")
        s3 = None
    else:
        s3 = _FFNWeight("w3", f3, w3, (hidden, d), allow_t=False)
    for name, b, n in (("b1", b1, hidden), ("b2", b2, d)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"pruned_ffn: {name} must have shape ({n},), got {tuple(b.shape)}")
    for name, t in [(s.name, s.values) for s in (s1, s2, s3) if s is not None] + [("b1", b1), ("b2", b2)]:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"pruned_ffn: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")

    x2 = x.reshape(-1, d)
    T = x2.shape[0]
    weights = [s for s in (s1, s2, s3) if s is not None]
    if T > FFN_MAX_FUSED_TOKENS or any(s.kind in ("csr", "bsr") for s in weights):
        return _ffn_unfused(x, s1, b1, s2, b2, s3, activation, threshold)

    acc = torch.empty((T, d), dtype=torch.float32, device=x.device)
    if b2 is not None:
        acc.copy_(b2.expand(T, d))
    else:
        acc.zero_()
    if T and d and hidden:
        (w1p, m1p, s1r, s1c), (w2p, m2p, s2r, s2c) = s1.kernel_args(), s2.kernel_args()
        w3p, m3p, s3r, s3c = s3.kernel_args() if s3 is not None else (w1p, m1p, 0, 0)
        args = (x2, w1p, m1p, b1 if b1 is not None else w1p, w3p, m3p, w2p, m2p, acc,
                T, d, hidden, threshold, x2.stride(0), x2.stride(1), s1r, s1c, s3r, s3c, s2r, s2c,
                acc.stride(0))
        s3_or_1 = s3 if s3 is not None else s1
        meta = dict(F1=_FFN_CODE[s1.kind], N1=s1.n, M1=s1.m,
                    F3=_FFN_CODE[s3_or_1.kind], N3=s3_or_1.n, M3=s3_or_1.m,
                    F2=_FFN_CODE[s2.kind], N2=s2.n, M2=s2.m,
                    GATED=s3 is not None, HAS_B1=b1 is not None, ACT=_ACT[activation],
                    HAS_THRESHOLD=threshold > 0,
                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                    # The smallest token tile that tl.dot takes and that covers T.
                    BLOCK_T=min(64, max(16, triton.next_power_of_2(T))))
        if block is None and _INTERPRET:
            block = {"BLOCK_H": 64, "BLOCK_D": 128}
        if block is not None:
            bh, bd = int(block["BLOCK_H"]), int(block["BLOCK_D"])
            # tl.arange needs powers of two; >= 16 for tl.dot, and N:M chunks must start groups.
            if bh < 16 or bh & (bh - 1) or bd < 16 or bd & (bd - 1):
                raise ValueError(f"pruned_ffn: BLOCK_H and BLOCK_D must be powers of two >= 16, got {block}")
            grid = (triton.cdiv(hidden, bh), triton.cdiv(T, meta["BLOCK_T"]))
            pruned_ffn_kernel[grid](*args, **meta, BLOCK_H=bh, BLOCK_D=bd,
                                    num_warps=int(block.get("num_warps", 4)))
        else:
            grid = lambda c: (triton.cdiv(hidden, c["BLOCK_H"]), triton.cdiv(T, meta["BLOCK_T"]))  # noqa: E731
            _ffn_autotuned[grid](*args, **meta)
    out = acc if x.dtype == torch.float32 else acc.to(x.dtype)
    return out.reshape(x.shape)


@torch.library.register_kernel("pysparse::pruned_ffn", "cuda")
def _pruned_ffn_cuda(x, f1, w1, b1, f2, w2, b2, f3, w3, hidden, activation, threshold):
    return pruned_ffn(x, f1, w1, b1, f2, w2, b2, f3, w3, hidden, activation, threshold)


# ---------------------------------------------------------------------------------------------
# BSR x dense (triton_kernels/bsr_spmm.py)

from triton_kernels.bsr_spmm import bsr_spmm_kernel, configs as bsr_configs  # noqa: E402

# N (the output columns, tokens in the linear layout) is in the key because the best BLOCK_N
# follows it; the block size because every block size is its own kernel.
_bsr_autotuned = triton.autotune(configs=bsr_configs(), key=["M", "N", "K", "BH", "BW"])(bsr_spmm_kernel)


def _bsr_check(fn: str, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape,
               x: torch.Tensor, what: str):
    """(M, K, bh, bw) after checking A's tensors against shape and x's dtype."""
    if len(shape) != 2:
        raise ValueError(f"{fn}: shape must be (M, K), got {tuple(shape)}")
    M, K = (int(s) for s in shape)
    if values.dim() != 3 or crow.dim() != 1 or col.dim() != 1:
        raise ValueError(f"{fn}: crow_indices and col_indices must be 1-D and values 3-D (nnzb, bh, bw), "
                         f"got {crow.dim()}-D, {col.dim()}-D and {values.dim()}-D")
    bh, bw = values.shape[1], values.shape[2]
    if bh <= 0 or bw <= 0 or M % bh or K % bw:
        raise ValueError(f"{fn}: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{fn}: indices must be int32 or int64, got {crow.dtype} and {col.dtype}")
    if crow.numel() != M // bh + 1 or col.numel() != values.shape[0]:
        raise ValueError(f"{fn}: crow_indices must have {M // bh + 1} entries and col_indices one per "
                         f"block ({values.shape[0]}), got {crow.numel()} and {col.numel()}")
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{fn}: values must be float32, bfloat16 or float16, got {values.dtype}")
    if x.dtype != values.dtype:
        raise ValueError(f"{fn}: {what} is {x.dtype} but the values are {values.dtype}")
    return M, K, bh, bw


def _bsr_launch(crow, col, values, b, bias, out, M, N, K, b_strides, out_strides, block_n):
    """out[i][M, N] = A @ b[i] (+ bias) for each matrix i of a batch, b and out addressed as
    (matrix, rows, cols) through the given strides (3 each); one launch per 65535 matrices (the
    grid's third axis)."""
    batch = out.shape[0]
    bh, bw = values.shape[1], values.shape[2]
    _checked.compressed(crow, col, K // bw, "blocks")
    if out.numel() == 0:
        return
    has_bias = bias is not None
    head = (crow.contiguous(), col.contiguous(), values.contiguous())
    bias = bias.contiguous() if has_bias else values  # any pointer: never read
    meta = dict(BH=bh, BW=bw, PH=max(16, triton.next_power_of_2(bh)), PW=max(16, triton.next_power_of_2(bw)),
                HAS_BIAS=has_bias,
                # fp32 means fp32: tl.dot would otherwise round its inputs to tf32.
                DOT_PRECISION="ieee" if values.dtype == torch.float32 else "tf32")
    if block_n is None and _INTERPRET:
        block_n = min(128, max(16, triton.next_power_of_2(N)))
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"bsr_spmm: block_n must be a power of two >= 16, got {block_n}")
    for i0 in range(0, batch, 65535):
        nb = min(65535, batch - i0)
        args = (*head, b[i0:], bias, out[i0:], M, N, K, values.shape[0], *b_strides, *out_strides)
        if block_n is not None:
            bsr_spmm_kernel[(M // bh, triton.cdiv(N, block_n), nb)](*args, **meta, BLOCK_N=block_n, num_warps=4)
        else:
            grid = lambda c: (M // bh, triton.cdiv(N, c["BLOCK_N"]), nb)  # noqa: E731
            _bsr_autotuned[grid](*args, **meta)


def bsr_spmm(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape,
             dense: torch.Tensor, *, block_n: Optional[int] = None) -> torch.Tensor:
    """A @ dense for A (M, K) in BSR form (values (nnzb, bh, bw)); dense (K, n), any strides, or a
    batch (..., K, n) -> (..., M, n) in values' dtype, accumulated in fp32.

    A batch runs in one launch (the grid's third axis). `block_n` fixes the output-column tile (a power of two
    >= 16) instead of autotuning; the interpreter always uses one large tile.
    """
    if dense.dim() < 2:
        raise ValueError(f"bsr_spmm: dense must be (K, n) or a batch (..., K, n), got {dense.dim()}-D")
    M, K, _, _ = _bsr_check("bsr_spmm", crow_indices, col_indices, values, shape, dense, "dense")
    if dense.shape[-2] != K:
        raise ValueError(f"bsr_spmm: dense has {dense.shape[-2]} rows but A has {K} columns")
    n, batch = dense.shape[-1], math.prod(dense.shape[:-2])
    out = torch.empty((*dense.shape[:-2], M, n), dtype=values.dtype, device=values.device)
    b3, o3 = dense.reshape(batch, K, n), out.view(batch, M, n)
    _bsr_launch(crow_indices, col_indices, values, b3, None, o3, M, n, K, b3.stride(), o3.stride(), block_n)
    return out


def bsr_linear(input: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, shape, bias: Optional[torch.Tensor] = None, *,
               block_n: Optional[int] = None) -> torch.Tensor:
    """input @ A^T + bias for A (M, K) in BSR form; input (..., K) -> (..., M).

    Runs as out^T = A @ input^T: the kernel reads input and writes out through swapped strides,
    so nothing is transposed in memory. `block_n` (a tile of tokens) is bsr_spmm's.
    """
    if input.dim() < 1:
        raise ValueError("bsr_linear: input must have at least one dimension (..., K)")
    M, K, _, _ = _bsr_check("bsr_linear", crow_indices, col_indices, values, shape, input, "input")
    if input.shape[-1] != K:
        raise ValueError(f"bsr_linear: input ends in {input.shape[-1]} features but A has {K} columns")
    if bias is not None:
        if bias.dtype != values.dtype:
            raise ValueError(f"bsr_linear: bias is {bias.dtype} but the values are {values.dtype}")
        if tuple(bias.shape) != (M,):
            raise ValueError(f"bsr_linear: bias must have shape ({M},), got {tuple(bias.shape)}")
    x2 = input.reshape(-1, K)
    T = x2.shape[0]
    out = torch.empty((T, M), dtype=values.dtype, device=values.device)
    _bsr_launch(crow_indices, col_indices, values, x2[None], bias, out[None], M, T, K,
                (0, x2.stride(1), x2.stride(0)), (0, out.stride(1), out.stride(0)), block_n)
    return out.reshape(*input.shape[:-1], M)


@torch.library.register_kernel("pysparse::bsr_spmm", "cuda")
def _bsr_spmm_cuda(crow_indices, col_indices, values, shape, dense):
    return bsr_spmm(crow_indices, col_indices, values, shape, dense)


@torch.library.register_kernel("pysparse::bsr_linear", "cuda")
def _bsr_linear_cuda(input, crow_indices, col_indices, values, shape, bias):
    return bsr_linear(input, crow_indices, col_indices, values, shape, bias)
