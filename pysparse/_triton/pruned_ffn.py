"""The fused FFN on CUDA at decode sizes: kernels/pruned_ffn.py, registered for
pysparse::pruned_ffn (larger token counts run the products separately)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton

from .. import _checked
from ..activations import apply as activate
from ..formats import BSR, CSR, NM_CHOICES
from ._common import ACT_CODES, INTERPRET
from .kernels.pruned_ffn import configs as ffn_configs, pruned_ffn_kernel
from .nm_linear import nm_linear

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
            if (self.n, self.m) not in NM_CHOICES:
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
            fused = activation if activation in ACT_CODES else "none"
            values, mask = self.tensors
            return nm_linear(inp, values, mask, self.shape, self.n, self.m, bias, fused), fused == activation
        return F.linear(inp, self.dense(), bias), activation == "none"


def _ffn_unfused(x, s1, b1, s2, b2, s3, activation, threshold):
    """The op as separate products: F.linear (cuBLAS) for dense weights, the nm_linear kernel
    for N:M ones (the activation fused into its epilogue when it has it), dense rebuilds for
    csr/bsr; h round-trips through memory in x's dtype."""
    h, done = s1.linear(x, b1, activation)
    if not done:
        h = activate(activation, h)
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
    if activation not in ACT_CODES:
        raise ValueError(f"pruned_ffn: activation must be one of {tuple(ACT_CODES)}, got {activation!r}")
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
                    GATED=s3 is not None, HAS_B1=b1 is not None, ACT=ACT_CODES[activation],
                    HAS_THRESHOLD=threshold > 0,
                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                    # The smallest token tile that tl.dot takes and that covers T.
                    BLOCK_T=min(64, max(16, triton.next_power_of_2(T))))
        if block is None and INTERPRET:
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

