"""What the formats share: value and index dtypes, shape checks, and the base class with the
format registry's fields (kind, fields)."""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1
INT16_COLS = 2**15  # int16 column indices address columns 0 .. 32767


def index_dtype_for(*extents: int) -> torch.dtype:
    return torch.int32 if max(extents, default=0) <= INT32_MAX else torch.int64


def csr_index_dtypes(index_dtype: Optional[torch.dtype], nnz: int, M: int, K: int):
    """(row pointer dtype, column index dtype) for a CSR matrix.

    None picks the smallest that fits: int32 row pointers (int64 from 2**31 nonzeros) and int16
    column indices when K <= 32768. Column indices are a third to a half of the bytes a
    memory-bound product streams, so this is what makes decode-sized products faster.
    """
    if index_dtype is None:
        rows = index_dtype_for(nnz, M, K)
        return rows, (torch.int16 if rows == torch.int32 and K <= INT16_COLS else rows)
    if index_dtype == torch.int16:
        if K > INT16_COLS or nnz > INT32_MAX:
            raise ValueError(f"int16 column indices need at most {INT16_COLS} columns and fewer "
                             f"than 2**31 nonzeros, got {K} columns and {nnz} nonzeros")
        return torch.int32, torch.int16
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be None, torch.int16, torch.int32 or torch.int64, got {index_dtype}")
    if index_dtype == torch.int32 and max(nnz, M, K) > INT32_MAX:
        raise ValueError(f"int32 indices cannot address {max(nnz, M, K)} entries: use torch.int64")
    return index_dtype, index_dtype


def check_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """(M, K) from two non-negative integers: ints, numpy ints or 0-d integer tensors; 2.7 is not
    silently 2, and a bool is not a size."""
    try:
        if len(shape) != 2 or any(isinstance(s, bool) for s in shape):
            raise TypeError
        M, K = (operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be two non-negative integers, got {shape!r}") from None
    if M < 0 or K < 0:
        raise ValueError(f"shape must be two non-negative integers, got {(M, K)}")
    return M, K


def shape_entry(sd: dict, key: str, what: str) -> Tuple[int, int]:
    """A state dict's shape tensor (int64, two entries) as (M, K)."""
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.numel() != 2:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: {key!r} must be an integer tensor of 2 entries, got {got}")
    return check_shape([int(v) for v in t.tolist()])


def check_dense(W: torch.Tensor, what: str) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got {type(W).__name__}"
                         + (f" of shape {tuple(W.shape)}" if isinstance(W, torch.Tensor) else ""))
    if W.dtype not in VALUE_DTYPES:
        raise ValueError(f"{what}: values must be float32, bfloat16 or float16, got {W.dtype}")



class Format:
    """What every format has: stored values, a dense shape, their dtype and device, and its entry
    in the format registry (pysparse.formats.FORMATS): `kind`, the name the ops carry
    (csr_spmm, bsr_linear, nm_linear, ...), and `fields`, its tensors in constructor order."""

    kind: str
    fields: Tuple[str, ...]
    values: torch.Tensor
    shape: Tuple[int, int]

    def tensors(self) -> List[torch.Tensor]:
        """The format's tensors, in `fields` order (what the ops take)."""
        return [getattr(self, f) for f in self.fields]

    @property
    def nm(self) -> Tuple[int, int]:
        """(n, m) of an N:M format, (0, 0) for the others."""
        return (0, 0)

    @property
    def format_name(self) -> str:
        """"csr", "bsr" or "n:m" (e.g. "2:4"): what reports and reprs call it."""
        return self.kind

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        """Stored entries (BSR: the scalars inside stored blocks; N:M: kept positions, zeros
        included)."""
        return self.values.numel()

    def positions(self) -> torch.Tensor:
        """int64 (nnz,): the flat index (row * cols + col) in the dense matrix of each stored
        value, in the order of ``values.reshape(-1)``: ``dense.view(-1)[A.positions()]`` are the
        entries A stores, e.g. to carry a dense layer's optimizer state over to A's values."""
        raise NotImplementedError

