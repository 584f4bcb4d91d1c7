"""CSR and BSR: compressed rows of scalars or of blocks (see pysparse/formats/__init__.py)."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from ._common import (INDEX_DTYPES, INT16_COLS, INT32_MAX, VALUE_DTYPES, Format, check_dense, check_shape,
                      csr_index_dtypes, index_dtype_for, shape_entry)

def validate_compressed(crow, col, values, rows, cols, value_dim, what):
    """Checks shared by CSR and BSR; rows/cols are in units of blocks for BSR."""
    for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    if crow.dim() != 1 or col.dim() != 1:
        raise ValueError(f"{what}: crow_indices and col_indices must be 1-D, got shapes "
                         f"{tuple(crow.shape)} and {tuple(col.shape)}")
    compact = what == "CSR" and crow.dtype == torch.int32 and col.dtype == torch.int16
    if not compact and (crow.dtype not in INDEX_DTYPES or col.dtype != crow.dtype):
        raise ValueError(f"{what}: crow_indices and col_indices must both be int32 or both int64"
                         + (" (or int32 and int16 with at most 32768 columns)" if what == "CSR" else "")
                         + f", got {crow.dtype} and {col.dtype}")
    if compact and cols > INT16_COLS:
        raise ValueError(f"{what}: int16 column indices need at most {INT16_COLS} columns, got {cols}")
    if values.dtype not in VALUE_DTYPES:
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


def scipy_values(data, dtype: torch.dtype, what: str) -> torch.Tensor:
    """scipy's value array as `dtype`, refusing a conversion that loses more than rounding."""
    if dtype not in VALUE_DTYPES:
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


def bsr_index_dtype(index_dtype: Optional[torch.dtype], nblocks: int, M: int, K: int) -> torch.dtype:
    if index_dtype is None:
        return index_dtype_for(nblocks, M, K)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"BSR index_dtype must be None, torch.int32 or torch.int64, got {index_dtype}")
    if index_dtype == torch.int32 and max(nblocks, M, K) > INT32_MAX:
        raise ValueError(f"int32 indices cannot address {max(nblocks, M, K)} entries: use torch.int64")
    return index_dtype


class _Compressed(Format):
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

    def positions(self) -> torch.Tensor:
        M, K = self.shape
        crow, col = self.crow_indices, self.col_indices
        bh, bw = (self.values.shape[1], self.values.shape[2]) if self.values.dim() == 3 else (1, 1)
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=col.device), crow.diff().long(),
                                       output_size=col.numel())
        if bh == bw == 1 and self.values.dim() == 1:
            return rows * K + col.long()
        a = torch.arange(bh, device=col.device).view(1, bh, 1)
        c = torch.arange(bw, device=col.device).view(1, 1, bw)
        return ((rows.view(-1, 1, 1) * bh + a) * K + col.long().view(-1, 1, 1) * bw + c).reshape(-1)

    def _replace(self, crow, col, values):
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.crow_indices, out.col_indices, out.values = crow, col, values
        return out

    def to(self, *args, **kwargs):
        """Like Tensor.to: a dtype applies to the values, a device to every tensor."""
        values = self.values.to(*args, **kwargs)
        if values.dtype not in VALUE_DTYPES:
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

    kind = "csr"
    fields = ("crow_indices", "col_indices", "values")

    def __init__(self, crow_indices, col_indices, values, shape, *, check: bool = True):
        M, K = check_shape(shape)
        if check:
            validate_compressed(crow_indices, col_indices, values, M, K, 1, "CSR")
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
        check_dense(W, "CSR.from_dense")
        M, K = W.shape
        mask = W != 0
        nnz_rows = mask.sum(dim=1)
        rdt, cdt = csr_index_dtypes(index_dtype, int(nnz_rows.sum()), M, K)
        crow = torch.zeros(M + 1, dtype=rdt, device=W.device)
        crow[1:] = torch.cumsum(nnz_rows, 0)
        col = mask.nonzero()[:, 1].to(cdt)
        return cls(crow, col, W[mask], (M, K), check=False)

    def with_index_dtype(self, index_dtype: Optional[torch.dtype]) -> "CSR":
        """The same matrix with other index dtypes (see from_dense)."""
        rdt, cdt = csr_index_dtypes(index_dtype, self.col_indices.numel(), *self.shape)
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
        rdt, cdt = csr_index_dtypes(index_dtype, col.numel(), M, K)
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
        rdt, cdt = csr_index_dtypes(None, m.nnz, M, K)
        return cls(torch.from_numpy(m.indptr).to(rdt), torch.from_numpy(m.indices).to(cdt),
                   scipy_values(m.data, dtype, "CSR.from_scipy"), (M, K))


class BSR(_Compressed):
    """Block sparse rows: crow_indices (M/bh + 1), col_indices (nnzb, in block units) and
    values (nnzb, bh, bw), each block row-major. Block columns are sorted and unique per block row.
    """

    kind = "bsr"
    fields = ("crow_indices", "col_indices", "values")

    def __init__(self, crow_indices, col_indices, values, shape, *, check: bool = True):
        M, K = check_shape(shape)
        if check:
            if not isinstance(values, torch.Tensor) or values.dim() != 3:
                raise ValueError("BSR: values must be a 3-D tensor (blocks, block_rows, block_cols), got "
                                 + (f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__))
            bh, bw = values.shape[1], values.shape[2]
            if bh <= 0 or bw <= 0 or M % bh or K % bw:
                raise ValueError(f"BSR: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
            validate_compressed(crow_indices, col_indices, values, M // bh, K // bw, 3, "BSR")
        self.crow_indices, self.col_indices, self.values = crow_indices, col_indices, values
        self.shape = (M, K)

    @property
    def blocksize(self) -> Tuple[int, int]:
        return (self.values.shape[1], self.values.shape[2])

    @classmethod
    def from_dense(cls, W: torch.Tensor, blocksize: Tuple[int, int] = (32, 32), *,
                   index_dtype: Optional[torch.dtype] = None) -> "BSR":
        """Keep every (bh, bw) block of W that holds a nonzero."""
        check_dense(W, "BSR.from_dense")
        bh, bw = (int(b) for b in blocksize)
        M, K = W.shape
        if bh <= 0 or bw <= 0 or M % bh or K % bw:
            raise ValueError(f"BSR.from_dense: shape {(M, K)} is not divisible by the block size {(bh, bw)}")
        blocks = W.reshape(M // bh, bh, K // bw, bw).transpose(1, 2)  # (Mb, Kb, bh, bw)
        keep = (blocks != 0).flatten(2).any(dim=2)
        idt = bsr_index_dtype(index_dtype, int(keep.sum()), M, K)
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
        idt = bsr_index_dtype(index_dtype, col.numel(), M, K)
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
        idt = index_dtype_for(m.data.size, M, K)
        return cls(torch.from_numpy(m.indptr).to(idt), torch.from_numpy(m.indices).to(idt),
                   scipy_values(m.data, dtype, "BSR.from_scipy"), (M, K))

