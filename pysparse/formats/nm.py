"""N:M semi-structured sparsity (2:4 included) as values + a bitmap of kept positions."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import VALUE_DTYPES, Format, check_shape, shape_entry

NM_CHOICES = {(n, m) for m in (4, 8, 16) for n in range(1, m)}


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(R, K) bool -> (R, ceil(K / 8)) uint8, bit j of byte b = column 8 b + j."""
    R, K = bits.shape
    pad = (-K) % 8
    if pad:
        bits = torch.cat((bits, bits.new_zeros(R, pad)), dim=1)
    weights = (1 << torch.arange(8, device=bits.device)).to(torch.uint8)
    return (bits.view(R, bits.shape[1] // 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of pack_bits: (R, ceil(K / 8)) uint8 -> (R, K) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).bool().reshape(packed.shape[0], packed.shape[1] * 8)[:, :K]


def keep_largest(W: torch.Tensor, n: int, m: int, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W with all but the n largest-scoring of every m consecutive entries of its last dimension
    zeroed (scores: default |W|, broadcast to W; exactly n kept per group, ties unspecified).
    The selection N:M pruning makes (pysparse.prune.nm checks its arguments and calls this)."""
    s = W.detach().float().abs() if scores is None else torch.broadcast_to(scores.detach().to(W.device), W.shape)
    groups = s.float().reshape(*W.shape[:-1], W.shape[-1] // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1, sorted=False).indices, True)
    return W * keep.reshape(W.shape) if W.is_floating_point() else torch.where(keep.reshape(W.shape), W, 0)


def nm_native(device: torch.device) -> bool:
    """Whether pysparse::nm_compress / nm_decompress have a kernel for this device."""
    if device.type == "cpu":
        return True
    from .._loader import _C
    return device.type == "cuda" and _C.cuda_compiled()


class SparseNM(Format):
    """N:M semi-structured sparsity: in every group of m consecutive columns, n are kept.

    values (rows, cols * n / m): the kept entries of each group in ascending column order.
    mask (rows, ceil(cols / 8)) uint8: a bitmap of the kept positions (bit j of byte b is column
    8 b + j), exactly n bits per group. That is 1 bit per dense entry: 2 bits per kept value at
    2:4, so fp32 2:4 weights take 53% of the dense bytes and 16-bit ones 56%.
    A kept position may hold a zero (a group with fewer than n nonzeros is padded).
    Values may be float32, bfloat16, float16 or int8 (int8 for CUTLASS interop only).
    """

    kind = "nm"
    fields = ("values", "mask")

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, shape, n: int = 2, m: int = 4, *,
                 check: bool = True):
        R, K = check_shape(shape)
        n, m = int(n), int(m)
        if (n, m) not in NM_CHOICES:
            raise ValueError(f"SparseNM: need m in (4, 8, 16) and 0 < n < m, got {n}:{m}")
        if check:
            if not isinstance(values, torch.Tensor) or not isinstance(mask, torch.Tensor):
                raise ValueError("SparseNM: values and mask must be tensors")
            if K % m:
                raise ValueError(f"SparseNM: {K} columns are not a multiple of m = {m}")
            if values.dtype not in VALUE_DTYPES + (torch.int8,):
                raise ValueError(f"SparseNM: values must be float32, bfloat16, float16 or int8, got {values.dtype}")
            if tuple(values.shape) != (R, K // m * n):
                raise ValueError(f"SparseNM: values must have shape {(R, K // m * n)}, got {tuple(values.shape)}")
            if mask.dtype != torch.uint8 or tuple(mask.shape) != (R, (K + 7) // 8):
                raise ValueError(f"SparseNM: mask must be uint8 of shape {(R, (K + 7) // 8)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            if mask.device != values.device:
                raise ValueError(f"SparseNM: values and mask must be on one device, got {values.device} and {mask.device}")
            if mask.device.type != "meta" and R and K:
                per_group = unpack_bits(mask, K).view(R, K // m, m).sum(-1)
                bad = per_group != n
                if bool(bad.any()):
                    r, g = (int(i) for i in torch.nonzero(bad)[0])
                    raise ValueError(f"SparseNM: mask row {r}, group {g} (columns {g * m}..{g * m + m - 1}) "
                                     f"marks {int(per_group[r, g])} positions, expected {n}")
                if K % 8 and bool((mask[:, -1] >> (K % 8)).any()):
                    raise ValueError("SparseNM: mask bits past the last column must be zero")
        self.values, self.mask, self.shape, self.n, self.m = values, mask, (R, K), n, m

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def nm(self) -> Tuple[int, int]:
        return (self.n, self.m)

    @property
    def format_name(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def from_dense(cls, W: torch.Tensor, n: int = 2, m: int = 4, *, prune: bool = False) -> "SparseNM":
        """Compress a dense matrix that is already n:m, or with prune=True keep the n largest |w|
        of each group. Raises ValueError naming the first row and group with too many nonzeros."""
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError("SparseNM.from_dense needs a 2-D tensor")
        if W.dtype not in VALUE_DTYPES + (torch.int8,):
            raise ValueError(f"SparseNM.from_dense: values must be float32, bfloat16, float16 or int8, got {W.dtype}")
        if (int(n), int(m)) not in NM_CHOICES:
            raise ValueError(f"SparseNM: need m in (4, 8, 16) and 0 < n < m, got {n}:{m}")
        R, K = W.shape
        if K % m:
            raise ValueError(f"SparseNM.from_dense: {K} columns are not a multiple of m = {m}")
        if prune:
            W = keep_largest(W, n, m)
        if nm_native(W.device):  # one pass of the C++/CUDA kernel (pysparse::nm_compress)
            try:
                values, mask = torch.ops.pysparse.nm_compress(W, n, m)
            except ValueError as e:
                msg = str(e).splitlines()[0].replace("pysparse: ", "")
                raise ValueError(f"SparseNM.from_dense: {msg}; pass prune=True to keep the {n} largest") from None
            return cls(values, mask, (R, K), n, m, check=False)
        groups = W.reshape(R, K // m, m)
        nz = groups != 0
        count = nz.sum(-1)
        if bool((count > n).any()):
            r, g = (int(i) for i in torch.nonzero(count > n)[0])
            raise ValueError(f"SparseNM.from_dense: row {r}, group {g} (columns {g * m}..{g * m + m - 1}) "
                             f"has {int(count[r, g])} nonzeros, more than {n}:{m} allows; "
                             f"pass prune=True to keep the {n} largest")
        # Keep the nonzeros, then pad each group with its lowest-indexed zero positions (as the
        # C++ op does).
        rank = nz.to(torch.int16) * m + (m - 1 - torch.arange(m, device=W.device, dtype=torch.int16))
        kept = torch.zeros_like(nz)
        kept.scatter_(-1, torch.topk(rank, n, dim=-1).indices, True)
        values = groups[kept].reshape(R, K // m * n)
        return cls(values, pack_bits(kept.reshape(R, K)), (R, K), n, m, check=False)

    def positions(self) -> torch.Tensor:
        return self.kept_mask().reshape(-1).nonzero().squeeze(1)

    def kept_mask(self) -> torch.Tensor:
        """(rows, cols) bool: the kept positions."""
        return unpack_bits(self.mask, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        if nm_native(self.device):
            return torch.ops.pysparse.nm_decompress(self.values, self.mask, list(self.shape), self.n, self.m)
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        out[self.kept_mask()] = self.values.reshape(-1)
        return out

    def to(self, *args, **kwargs) -> "SparseNM":
        values = self.values.to(*args, **kwargs)
        return type(self)(values, self.mask.to(values.device), self.shape, self.n, self.m, check=False)

    def state_dict(self, prefix: str = "") -> dict:
        return {prefix + "values": self.values, prefix + "mask": self.mask,
                prefix + "shape": torch.tensor(self.shape, dtype=torch.int64),
                prefix + "nm": torch.tensor((self.n, self.m), dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", *, check: bool = True) -> "SparseNM":
        try:
            values, mask, shape, nm = (sd[prefix + k] for k in ("values", "mask", "shape", "nm"))
        except KeyError as e:
            raise ValueError(f"{cls.__name__}.from_state_dict: missing entry {e.args[0]!r}") from None
        what = f"{cls.__name__}.from_state_dict"
        n, m = shape_entry(sd, prefix + "nm", what)
        return cls(values, mask, shape_entry(sd, prefix + "shape", what), n, m, check=check)

    # CUTLASS / torch.sparse interop (2:4 only) ------------------------------------------------

    def to_cutlass(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(values, reordered metadata) exactly as torch's
        ``sparse_semi_structured_from_dense_cutlass`` gives for the same dense matrix: float16,
        bfloat16 and int8 as 2:4; float32 as 1:2 (every pair of columns holds one nonzero at most)."""
        if (self.n, self.m) != (2, 4):
            raise ValueError(f"the CUTLASS layout is 2:4, this matrix is {self.n}:{self.m}")
        from .. import _cutlass
        return _cutlass.from_dense(self.to_dense())

    @classmethod
    def from_cutlass(cls, values: torch.Tensor, meta: torch.Tensor) -> "SparseNM":
        """Inverse of to_cutlass (exact, float32 included)."""
        from .. import _cutlass
        dense, kept = _cutlass.to_positions(values, meta)
        R, K = dense.shape
        if values.dtype == torch.float32:  # 1:2 -> 2:4 keeps one float of each pair
            return cls.from_dense(dense, 2, 4)
        return cls(dense[kept].reshape(R, K // 2), pack_bits(kept), (R, K), 2, 4, check=False)

    def to_torch(self):
        """A torch.sparse.SparseSemiStructuredTensor (CUDA only, as torch supports it)."""
        from torch.sparse import to_sparse_semi_structured
        if (self.n, self.m) != (2, 4):
            raise ValueError(f"torch's semi-structured tensors are 2:4, this matrix is {self.n}:{self.m}")
        return to_sparse_semi_structured(self.to_dense())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, {self.n}:{self.m}, dtype={self.dtype}, "
                f"device={self.device})")


class Sparse24(SparseNM):
    """SparseNM with n = 2, m = 4: the pattern sparse tensor cores accelerate."""

    def __init__(self, values, mask, shape, n: int = 2, m: int = 4, *, check: bool = True):
        if (int(n), int(m)) != (2, 4):
            raise ValueError(f"Sparse24 is 2:4, got {n}:{m}: use SparseNM")
        super().__init__(values, mask, shape, 2, 4, check=check)

    @classmethod
    def from_dense(cls, W: torch.Tensor, n: int = 2, m: int = 4, *, prune: bool = False) -> "Sparse24":
        if (int(n), int(m)) != (2, 4):
            raise ValueError(f"Sparse24 is 2:4, got {n}:{m}: use SparseNM")
        return super().from_dense(W, 2, 4, prune=prune)
