"""Sparse formats as plain tensors.

Each format is a small Python object holding ordinary dense tensors (indices and values) and a
shape. Nothing here is a torch sparse layout, so torch.compile, export and state_dicts see only
strided tensors. Row pointers are int32 unless the matrix needs int64 (nnz or a dimension of
2**31 or more). CSR column indices are int16 when the matrix has at most 32768 columns (they are
a third of the bytes a memory-bound product reads), else they match the row pointers; BSR
column indices always match the row pointers. ``index_dtype=`` overrides the choice.

Construction from raw tensors validates them (``check=True``) and raises ``ValueError`` naming the
first problem found; ``check=False`` skips the O(nnz) checks for data you already trust.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional, Sequence, Tuple

import torch

_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1
_INT16_COLS = 2**15  # int16 column indices address columns 0 .. 32767


def _index_dtype_for(*extents: int) -> torch.dtype:
    return torch.int32 if max(extents, default=0) <= _INT32_MAX else torch.int64


def _csr_index_dtypes(index_dtype: Optional[torch.dtype], nnz: int, M: int, K: int):
    """(row pointer dtype, column index dtype) for a CSR matrix.

    None picks the smallest that fits: int32 row pointers (int64 from 2**31 nonzeros) and int16
    column indices when K <= 32768. Column indices are a third to a half of the bytes a
    memory-bound product streams, so this is what makes decode-sized products faster.
    """
    if index_dtype is None:
        rows = _index_dtype_for(nnz, M, K)
        return rows, (torch.int16 if rows == torch.int32 and K <= _INT16_COLS else rows)
    if index_dtype == torch.int16:
        if K > _INT16_COLS or nnz > _INT32_MAX:
            raise ValueError(f"int16 column indices need at most {_INT16_COLS} columns and fewer "
                             f"than 2**31 nonzeros, got {K} columns and {nnz} nonzeros")
        return torch.int32, torch.int16
    if index_dtype not in _INDEX_DTYPES:
        raise ValueError(f"index_dtype must be None, torch.int16, torch.int32 or torch.int64, got {index_dtype}")
    if index_dtype == torch.int32 and max(nnz, M, K) > _INT32_MAX:
        raise ValueError(f"int32 indices cannot address {max(nnz, M, K)} entries: use torch.int64")
    return index_dtype, index_dtype


def _check_shape(shape: Sequence[int]) -> Tuple[int, int]:
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
    return _check_shape([int(v) for v in t.tolist()])


def _check_dense(W: torch.Tensor, what: str) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"{what} needs a 2-D tensor, got {type(W).__name__}"
                         + (f" of shape {tuple(W.shape)}" if isinstance(W, torch.Tensor) else ""))
    if W.dtype not in _VALUE_DTYPES:
        raise ValueError(f"{what}: values must be float32, bfloat16 or float16, got {W.dtype}")


def _validate_compressed(crow, col, values, rows, cols, value_dim, what):
    """Checks shared by CSR and BSR; rows/cols are in units of blocks for BSR."""
    for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    if crow.dim() != 1 or col.dim() != 1:
        raise ValueError(f"{what}: crow_indices and col_indices must be 1-D, got shapes "
                         f"{tuple(crow.shape)} and {tuple(col.shape)}")
    compact = what == "CSR" and crow.dtype == torch.int32 and col.dtype == torch.int16
    if not compact and (crow.dtype not in _INDEX_DTYPES or col.dtype != crow.dtype):
        raise ValueError(f"{what}: crow_indices and col_indices must both be int32 or both int64"
                         + (" (or int32 and int16 with at most 32768 columns)" if what == "CSR" else "")
                         + f", got {crow.dtype} and {col.dtype}")
    if compact and cols > _INT16_COLS:
        raise ValueError(f"{what}: int16 column indices need at most {_INT16_COLS} columns, got {cols}")
    if values.dtype not in _VALUE_DTYPES:
        raise ValueError(f"{what}: values must be float32, bfloat16 or float16, got {values.dtype}")
    if values.dim() != value_dim:
        raise ValueError(f"{what}: values must be {value_dim}-D, got shape {tuple(values.shape)}")
    if not (crow.device == col.device == values.device):
        raise ValueError(f"{what}: crow_indices, col_indices and values must be on one device, got "
                         f"{crow.device}, {col.device} and {values.device}")
    unit = "block " if what == "BSR" else ""
    if crow.numel() != rows + 1:
        raise ValueError(f"{what}: crow_indices must have {rows + 1} entries ({unit}rows + 1), "
                         f"got {crow.numel()}")
    nnz = col.numel()
    if values.shape[0] != nnz:
        raise ValueError(f"{what}: col_indices has {nnz} entries but values has {values.shape[0]}")
    if "meta" in (crow.device.type, col.device.type, values.device.type):
        return  # shapes and dtypes checked; there is no data to look at
    if int(crow[0]) != 0:
        raise ValueError(f"{what}: crow_indices[0] must be 0, got {int(crow[0])}")
    if int(crow[-1]) != nnz:
        raise ValueError(f"{what}: crow_indices[-1] must equal the number of stored entries "
                         f"({nnz}), got {int(crow[-1])}")
    counts = crow[1:] - crow[:-1]
    if rows and bool((counts < 0).any()):
        r = int(torch.nonzero(counts < 0)[0, 0])
        raise ValueError(f"{what}: crow_indices must be non-decreasing, but {unit}row {r} ends "
                         f"({int(crow[r + 1])}) before it starts ({int(crow[r])})")
    if nnz == 0:
        return
    col = col.int() if col.dtype == torch.int16 else col  # compare without int16 overflow
    bad = (col < 0) | (col >= cols)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0, 0])
        r = int(torch.searchsorted(crow, torch.tensor(j, dtype=crow.dtype, device=crow.device), right=True)) - 1
        raise ValueError(f"{what}: {unit}column index {int(col[j])} at position {j} ({unit}row {r}) "
                         f"is out of range for {cols} {unit}columns")
    # Strictly increasing within each row: a step that is not positive must start a new row.
    step_ok = col[1:] > col[:-1]
    row_start = torch.zeros(nnz, dtype=torch.bool, device=col.device)
    starts = crow[1:-1][(crow[1:-1] > 0) & (crow[1:-1] < nnz)]
    row_start[starts.long()] = True
    bad = ~step_ok & ~row_start[1:]
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0, 0]) + 1
        r = int(torch.searchsorted(crow, torch.tensor(j, dtype=crow.dtype, device=crow.device), right=True)) - 1
        raise ValueError(f"{what}: {unit}column indices of {unit}row {r} must be sorted and unique, but "
                         f"{int(col[j])} follows {int(col[j - 1])}")


def _scipy_values(data, dtype: torch.dtype, what: str) -> torch.Tensor:
    """scipy's value array as `dtype`, refusing a conversion that loses more than rounding."""
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"{what}: dtype must be float32, bfloat16 or float16, got {dtype}")
    src = torch.from_numpy(data)
    if src.dtype.is_complex:
        if bool((src.imag != 0).any()):
            raise ValueError(f"{what}: the matrix has complex values; pysparse stores real ones "
                             "(pass m.real if the imaginary parts are meant to go)")
        src = src.real
    out = src.to(dtype)
    overflow = torch.isinf(out) & torch.isfinite(src.double())
    if bool(overflow.any()):
        j = int(torch.nonzero(overflow)[0, 0])
        raise ValueError(f"{what}: value {src[j].item()!r} at stored position {j} overflows {dtype}")
    return out


def _bsr_index_dtype(index_dtype: Optional[torch.dtype], nblocks: int, M: int, K: int) -> torch.dtype:
    if index_dtype is None:
        return _index_dtype_for(nblocks, M, K)
    if index_dtype not in _INDEX_DTYPES:
        raise ValueError(f"BSR index_dtype must be None, torch.int32 or torch.int64, got {index_dtype}")
    if index_dtype == torch.int32 and max(nblocks, M, K) > _INT32_MAX:
        raise ValueError(f"int32 indices cannot address {max(nblocks, M, K)} entries: use torch.int64")
    return index_dtype


class _Format:
    """What every format has: stored values, a dense shape, their dtype and device."""

    values: torch.Tensor
    shape: Tuple[int, int]

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


class _Compressed(_Format):
    """Shared behaviour of CSR and BSR (compressed rows of scalars or of blocks)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor

    @property
    def index_dtype(self) -> torch.dtype:
        return self.crow_indices.dtype

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    def _replace(self, crow, col, values):
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.crow_indices, out.col_indices, out.values = crow, col, values
        return out

    def to(self, *args, **kwargs):
        """Like Tensor.to: a dtype applies to the values, a device to every tensor."""
        values = self.values.to(*args, **kwargs)
        if values.dtype not in _VALUE_DTYPES:
            raise ValueError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
        crow = self.crow_indices.to(device=values.device)
        col = self.col_indices.to(device=values.device)
        return self._replace(crow, col, values)

    def state_dict(self, prefix: str = "") -> dict:
        """Plain tensors only (safe for torch.save(weights_only=True) and safetensors)."""
        return {
            prefix + "crow_indices": self.crow_indices,
            prefix + "col_indices": self.col_indices,
            prefix + "values": self.values,
            prefix + "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", *, check: bool = True):
        try:
            crow, col, values, shape = (sd[prefix + k] for k in ("crow_indices", "col_indices", "values", "shape"))
        except KeyError as e:
            raise ValueError(f"{cls.__name__}.from_state_dict: missing entry {e.args[0]!r}") from None
        return cls(crow, col, values, shape_entry(sd, prefix + "shape", f"{cls.__name__}.from_state_dict"), check=check)

    def __repr__(self) -> str:
        extra = f", blocksize={self.blocksize}" if isinstance(self, BSR) else ""
        return (f"{type(self).__name__}(shape={self.shape}{extra}, nnz={self.nnz}, "
                f"density={self.density:.3f}, dtype={self.dtype}, "
                f"indices=({self.crow_indices.dtype}, {self.col_indices.dtype}), "
                f"device={self.device})")


class CSR(_Compressed):
    """Compressed sparse rows: crow_indices (M + 1), col_indices (nnz), values (nnz).

    Column indices are sorted and unique within each row.
    """

    def __init__(self, crow_indices, col_indices, values, shape, *, check: bool = True):
        M, K = _check_shape(shape)
        if check:
            _validate_compressed(crow_indices, col_indices, values, M, K, 1, "CSR")
        self.crow_indices, self.col_indices, self.values = crow_indices, col_indices, values
        self.shape = (M, K)

    @property
    def col_dtype(self) -> torch.dtype:
        return self.col_indices.dtype

    @classmethod
    def from_dense(cls, W: torch.Tensor, *, index_dtype: Optional[torch.dtype] = None) -> "CSR":
        """Keep the nonzeros of a 2-D float tensor.

        index_dtype: None (int32 row pointers, int16 column indices when W has <= 32768 columns),
        torch.int16 (the same, or an error), torch.int32 or torch.int64 (both index tensors).
        """
        _check_dense(W, "CSR.from_dense")
        M, K = W.shape
        mask = W != 0
        nnz_rows = mask.sum(dim=1)
        rdt, cdt = _csr_index_dtypes(index_dtype, int(nnz_rows.sum()), M, K)
        crow = torch.zeros(M + 1, dtype=rdt, device=W.device)
        crow[1:] = torch.cumsum(nnz_rows, 0)
        col = mask.nonzero()[:, 1].to(cdt)
        return cls(crow, col, W[mask], (M, K), check=False)

    def with_index_dtype(self, index_dtype: Optional[torch.dtype]) -> "CSR":
        """The same matrix with other index dtypes (see from_dense)."""
        rdt, cdt = _csr_index_dtypes(index_dtype, self.col_indices.numel(), *self.shape)
        return self._replace(self.crow_indices.to(rdt), self.col_indices.to(cdt), self.values)

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        out = torch.zeros(M, K, dtype=self.dtype, device=self.device)
        rows = torch.repeat_interleave(torch.arange(M, device=self.device),
                                       (self.crow_indices[1:] - self.crow_indices[:-1]).long())
        out[rows, self.col_indices.long()] = self.values
        return out

    @classmethod
    def from_torch(cls, t: torch.Tensor, *, index_dtype: Optional[torch.dtype] = None) -> "CSR":
        """From a torch.sparse_csr (or sparse COO / strided) tensor."""
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError("CSR.from_torch needs a 2-D torch tensor")
        if t.layout == torch.strided:
            return cls.from_dense(t, index_dtype=index_dtype)
        if t.layout != torch.sparse_csr:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                t = t.to_sparse_csr()
        M, K = t.shape
        crow, col = t.crow_indices(), t.col_indices()
        rdt, cdt = _csr_index_dtypes(index_dtype, col.numel(), M, K)
        # torch permits unsorted columns within a row; our format does not.
        return cls(crow.to(rdt), col.to(cdt), t.values(), (M, K), check=True)

    def to_torch(self) -> torch.Tensor:
        """A torch.sparse_csr tensor (column indices widened to the row pointers' dtype)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices.to(self.crow_indices.dtype),
                                           self.values, self.shape, check_invariants=False)

    @classmethod
    def from_scipy(cls, m, *, dtype: torch.dtype = torch.float32) -> "CSR":
        """From any scipy.sparse matrix or array (converted to CSR, sorted, duplicates summed).
        Refuses what dtype cannot hold: complex values, finite values that overflow it."""
        m = m.tocsr(copy=True)
        m.sum_duplicates()
        m.sort_indices()
        M, K = m.shape
        rdt, cdt = _csr_index_dtypes(None, m.nnz, M, K)
        return cls(torch.from_numpy(m.indptr).to(rdt), torch.from_numpy(m.indices).to(cdt),
                   _scipy_values(m.data, dtype, "CSR.from_scipy"), (M, K))


class BSR(_Compressed):
    """Block sparse rows: crow_indices (M/bh + 1), col_indices (nnzb, in block units) and
    values (nnzb, bh, bw), each block row-major. Block columns are sorted and unique per block row.
    """

    def __init__(self, crow_indices, col_indices, values, shape, *, check: bool = True):
        M, K = _check_shape(shape)
        if check:
            if not isinstance(values, torch.Tensor) or values.dim() != 3:
                raise ValueError("BSR: values must be a 3-D tensor (blocks, block_rows, block_cols), got "
                                 + (f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__))
            bh, bw = values.shape[1], values.shape[2]
            if bh <= 0 or bw <= 0 or M % bh or K % bw:
                raise ValueError(f"BSR: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
            _validate_compressed(crow_indices, col_indices, values, M // bh, K // bw, 3, "BSR")
        self.crow_indices, self.col_indices, self.values = crow_indices, col_indices, values
        self.shape = (M, K)

    @property
    def blocksize(self) -> Tuple[int, int]:
        return (self.values.shape[1], self.values.shape[2])

    @classmethod
    def from_dense(cls, W: torch.Tensor, blocksize: Tuple[int, int] = (32, 32), *,
                   index_dtype: Optional[torch.dtype] = None) -> "BSR":
        """Keep every (bh, bw) block of W that holds a nonzero."""
        _check_dense(W, "BSR.from_dense")
        bh, bw = (int(b) for b in blocksize)
        M, K = W.shape
        if bh <= 0 or bw <= 0 or M % bh or K % bw:
            raise ValueError(f"BSR.from_dense: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
        blocks = W.reshape(M // bh, bh, K // bw, bw).transpose(1, 2)  # (Mb, Kb, bh, bw)
        keep = (blocks != 0).flatten(2).any(dim=2)
        idt = _bsr_index_dtype(index_dtype, int(keep.sum()), M, K)
        crow = torch.zeros(M // bh + 1, dtype=idt, device=W.device)
        crow[1:] = torch.cumsum(keep.sum(dim=1), 0)
        col = keep.nonzero()[:, 1].to(idt)
        return cls(crow, col, blocks[keep].contiguous(), (M, K), check=False)

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        bh, bw = self.blocksize
        blocks = torch.zeros(M // bh, K // bw, bh, bw, dtype=self.dtype, device=self.device)
        rows = torch.repeat_interleave(torch.arange(M // bh, device=self.device),
                                       (self.crow_indices[1:] - self.crow_indices[:-1]).long())
        blocks[rows, self.col_indices.long()] = self.values
        return blocks.transpose(1, 2).reshape(M, K)

    @classmethod
    def from_torch(cls, t: torch.Tensor, blocksize: Optional[Tuple[int, int]] = None, *,
                   index_dtype: Optional[torch.dtype] = None) -> "BSR":
        """From a torch.sparse_bsr tensor (or any 2-D tensor plus a blocksize)."""
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError("BSR.from_torch needs a 2-D torch tensor")
        if t.layout != torch.sparse_bsr:
            if blocksize is None:
                raise ValueError(f"BSR.from_torch: a {t.layout} tensor needs a blocksize")
            return cls.from_dense(t.to_dense() if t.layout != torch.strided else t, blocksize, index_dtype=index_dtype)
        M, K = t.shape
        crow, col = t.crow_indices(), t.col_indices()
        idt = _bsr_index_dtype(index_dtype, col.numel(), M, K)
        return cls(crow.to(idt), col.to(idt), t.values(), (M, K), check=True)

    def to_torch(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse BSR tensor support is in beta")
            return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values,
                                           self.shape, check_invariants=False)

    @classmethod
    def from_scipy(cls, m, *, dtype: torch.dtype = torch.float32) -> "BSR":
        """From a scipy.sparse bsr matrix/array (its blocksize is kept)."""
        if m.format != "bsr":
            raise ValueError(f"BSR.from_scipy needs a scipy BSR matrix, got format {m.format!r}: "
                             "convert with .tobsr(blocksize=...) first")
        m = m.copy()
        m.sum_duplicates()
        m.sort_indices()
        M, K = m.shape
        idt = _index_dtype_for(m.data.size, M, K)
        return cls(torch.from_numpy(m.indptr).to(idt), torch.from_numpy(m.indices).to(idt),
                   _scipy_values(m.data, dtype, "BSR.from_scipy"), (M, K))


# ---------------------------------------------------------------------------------------------
# N:M semi-structured

_NM_CHOICES = {(n, m) for m in (4, 8, 16) for n in range(1, m)}


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(R, K) bool -> (R, ceil(K / 8)) uint8, bit j of byte b = column 8 b + j."""
    R, K = bits.shape
    pad = (-K) % 8
    if pad:
        bits = torch.cat((bits, bits.new_zeros(R, pad)), dim=1)
    weights = (1 << torch.arange(8, device=bits.device)).to(torch.uint8)
    return (bits.view(R, bits.shape[1] // 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of _pack_bits: (R, ceil(K / 8)) uint8 -> (R, K) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).bool().reshape(packed.shape[0], packed.shape[1] * 8)[:, :K]


def _nm_native(device: torch.device) -> bool:
    """Whether pysparse::nm_compress / nm_decompress have a kernel for this device."""
    if device.type == "cpu":
        return True
    from ._loader import _C
    return device.type == "cuda" and _C.cuda_compiled()


class SparseNM(_Format):
    """N:M semi-structured sparsity: in every group of m consecutive columns, n are kept.

    values (rows, cols * n / m): the kept entries of each group in ascending column order.
    mask (rows, ceil(cols / 8)) uint8: a bitmap of the kept positions (bit j of byte b is column
    8 b + j), exactly n bits per group. That is 1 bit per dense entry: 2 bits per kept value at
    2:4, so fp32 2:4 weights take 53% of the dense bytes and 16-bit ones 56%.
    A kept position may hold a zero (a group with fewer than n nonzeros is padded).
    Values may be float32, bfloat16, float16 or int8 (int8 for CUTLASS interop only).
    """

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, shape, n: int = 2, m: int = 4, *,
                 check: bool = True):
        R, K = _check_shape(shape)
        n, m = int(n), int(m)
        if (n, m) not in _NM_CHOICES:
            raise ValueError(f"SparseNM: need m in (4, 8, 16) and 0 < n < m, got {n}:{m}")
        if check:
            if not isinstance(values, torch.Tensor) or not isinstance(mask, torch.Tensor):
                raise ValueError("SparseNM: values and mask must be tensors")
            if K % m:
                raise ValueError(f"SparseNM: {K} columns are not a multiple of m = {m}")
            if values.dtype not in _VALUE_DTYPES + (torch.int8,):
                raise ValueError(f"SparseNM: values must be float32, bfloat16, float16 or int8, got {values.dtype}")
            if tuple(values.shape) != (R, K // m * n):
                raise ValueError(f"SparseNM: values must have shape {(R, K // m * n)}, got {tuple(values.shape)}")
            if mask.dtype != torch.uint8 or tuple(mask.shape) != (R, (K + 7) // 8):
                raise ValueError(f"SparseNM: mask must be uint8 of shape {(R, (K + 7) // 8)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            if mask.device != values.device:
                raise ValueError(f"SparseNM: values and mask must be on one device, got {values.device} and {mask.device}")
            if mask.device.type != "meta" and R and K:
                per_group = _unpack_bits(mask, K).view(R, K // m, m).sum(-1)
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

    @classmethod
    def from_dense(cls, W: torch.Tensor, n: int = 2, m: int = 4, *, prune: bool = False) -> "SparseNM":
        """Compress a dense matrix that is already n:m, or with prune=True keep the n largest |w|
        of each group. Raises ValueError naming the first row and group with too many nonzeros."""
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError("SparseNM.from_dense needs a 2-D tensor")
        if W.dtype not in _VALUE_DTYPES + (torch.int8,):
            raise ValueError(f"SparseNM.from_dense: values must be float32, bfloat16, float16 or int8, got {W.dtype}")
        if (int(n), int(m)) not in _NM_CHOICES:
            raise ValueError(f"SparseNM: need m in (4, 8, 16) and 0 < n < m, got {n}:{m}")
        R, K = W.shape
        if K % m:
            raise ValueError(f"SparseNM.from_dense: {K} columns are not a multiple of m = {m}")
        if prune:
            from .prune import nm as _prune_nm
            W = _prune_nm(W.float(), n, m).to(W.dtype) if W.dtype == torch.int8 else _prune_nm(W, n, m)
        if _nm_native(W.device):  # one pass of the C++/CUDA kernel (pysparse::nm_compress)
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
        return cls(values, _pack_bits(kept.reshape(R, K)), (R, K), n, m, check=False)

    def kept_mask(self) -> torch.Tensor:
        """(rows, cols) bool: the kept positions."""
        return _unpack_bits(self.mask, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        if _nm_native(self.device):
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
        from . import _cutlass
        return _cutlass.from_dense(self.to_dense())

    @classmethod
    def from_cutlass(cls, values: torch.Tensor, meta: torch.Tensor) -> "SparseNM":
        """Inverse of to_cutlass (exact, float32 included)."""
        from . import _cutlass
        dense, kept = _cutlass.to_positions(values, meta)
        R, K = dense.shape
        if values.dtype == torch.float32:  # 1:2 -> 2:4 keeps one float of each pair
            return cls.from_dense(dense, 2, 4)
        return cls(dense[kept].reshape(R, K // 2), _pack_bits(kept), (R, K), 2, 4, check=False)

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
