"""2:4 metadata in the layout CUTLASS's SM8x sparse GEMMs read (what torch's
`sparse_semi_structured_from_dense_cutlass` produces), written from the layout's description:

* per group of 4 (fp16/bf16/int8) a nibble ``i0 | i1 << 2`` names the two kept positions i0 < i1;
  fp32 groups are pairs encoded as 4 halves (0x4 keeps the first float, 0xE the second);
* which positions a group with fewer than two nonzeros names is fixed: the first nonzero (else
  2) for i0, then the next nonzero after it (else 2 or 3 as the rule below gives) for i1;
* nibbles pack least-significant first, 4 per int16 (fp16/bf16/fp32) or 8 per int32 (int8);
* the (rows, cols) metadata matrix is then scattered into ColumnMajorInterleaved<2> order.
"""
from __future__ import annotations

from typing import Tuple

import torch


def _positions(nz: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(i0, i1) kept positions per group from the nonzero pattern nz (..., 4) of a valid 2:4 group."""
    a, b, d = nz[..., 0], nz[..., 1], nz[..., 3]
    i0 = torch.where(a, 0, torch.where(b, 1, 2))
    # after position 0 comes 1 if it is nonzero, else 3 if nonzero, else 2; after 1: 3 or 2;
    # after 2 (no nonzero among 0, 1): always 3
    i1 = torch.where(a & b, 1, torch.where(a | b, torch.where(d, 3, 2), 3))
    return i0, i1


def _scatter_offsets(rows: int, cols: int, meta_dtype: torch.dtype, device) -> torch.Tensor:
    """Destination offset of every metadata element (r, c) in the reordered buffer."""
    group, interweave = (32, 4) if meta_dtype == torch.int16 else (16, 2)
    r = torch.arange(rows, device=device)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=device)[None, :].expand(rows, cols)
    r = r // group * group + (r % 8) * interweave + (r % group) // 8
    swap = ((r % 2 == 0) & (c % 2 == 1)).long() - ((r % 2 == 1) & (c % 2 == 0)).long()
    r, c = r + swap, c - swap
    return ((c // 2) * (2 * rows) + 2 * r + (c % 2)).reshape(-1)


def _meta_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.int8:
        return torch.int32
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.int16
    raise ValueError(f"the CUTLASS 2:4 layout has no {dtype} variant (float16, bfloat16, float32, int8)")


def from_dense(dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, reordered metadata) of a 2:4 (fp32: 1:2) dense matrix, CUTLASS layout."""
    rows, k = dense.shape
    meta_dtype = _meta_dtype(dense.dtype)
    per_elem = 4 if meta_dtype == torch.int16 else 8  # nibbles per metadata element
    need_rows = 32 if meta_dtype == torch.int16 else 16
    if rows % need_rows or k % (4 * per_elem):
        raise ValueError(f"the CUTLASS layout needs rows divisible by {need_rows} and columns by "
                         f"{4 * per_elem}, got {rows}x{k}")
    if dense.dtype == torch.float32:
        pairs = dense.reshape(rows, k // 2, 2)
        if bool(((pairs != 0).sum(-1) > 1).any()):
            raise ValueError("the float32 CUTLASS layout is 1:2: every pair of columns may hold one "
                             "nonzero at most")
        second = pairs[..., 0] == 0  # an all-zero pair names the second float (0xE)
        values = torch.where(second, pairs[..., 1], pairs[..., 0])
        nibble = torch.where(second, 0xE, 0x4)
    else:
        quads = dense.reshape(rows, k // 4, 4)
        if bool(((quads != 0).sum(-1) > 2).any()):
            raise ValueError("the matrix is not 2:4: a group of 4 columns holds more than 2 nonzeros")
        i0, i1 = _positions(quads != 0)
        values = torch.stack((quads.gather(-1, i0[..., None]), quads.gather(-1, i1[..., None])),
                             dim=-1).reshape(rows, k // 2)
        nibble = i0 | (i1 << 2)
    nibble = nibble.to(torch.int64).reshape(rows, -1, per_elem)
    shifts = torch.arange(per_elem, device=dense.device) * 4
    packed = (nibble << shifts).sum(-1)  # exact in int64; then keep the low 16/32 bits
    bits = 16 if meta_dtype == torch.int16 else 32
    packed = torch.where(packed >= 2 ** (bits - 1), packed - 2 ** bits, packed).to(meta_dtype)
    cols = packed.shape[1]
    out = torch.empty(rows * cols, dtype=meta_dtype, device=dense.device)
    out.scatter_(0, _scatter_offsets(rows, cols, meta_dtype, dense.device), packed.reshape(-1))
    return values.contiguous(), out.view(rows, cols)


def to_positions(values: torch.Tensor, meta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense (rows, k) positions and values from the CUTLASS pair; returns (dense, kept mask).
    ValueError for anything that is not such a pair: wrong types, shapes or devices, and nibbles
    that name no valid pair of positions (which would place two values on one column)."""
    if not isinstance(values, torch.Tensor) or not isinstance(meta, torch.Tensor) or values.dim() != 2:
        raise ValueError("from_cutlass needs a 2-D values tensor and a 2-D metadata tensor, got "
                         + ", ".join(f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                                     for t in (values, meta)))
    meta_dtype = _meta_dtype(values.dtype)
    rows, half_k = values.shape
    k = 2 * half_k
    if meta.dtype != meta_dtype or meta.dim() != 2 or meta.shape[0] != rows:
        raise ValueError(f"metadata for {values.dtype} values must be {meta_dtype} of shape ({rows}, cols), got "
                         f"{meta.dtype} {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"values and metadata must be on one device, got {values.device} and {meta.device}")
    per_elem = 4 if meta.dtype == torch.int16 else 8
    need_rows = 32 if meta.dtype == torch.int16 else 16
    cols = meta.shape[1]
    if rows % need_rows or cols % 2:
        raise ValueError(f"the CUTLASS layout needs rows divisible by {need_rows} and an even number of metadata "
                         f"columns, got {rows} rows and {cols} columns")
    if cols * per_elem * (2 if values.dtype == torch.float32 else 4) != k:
        raise ValueError(f"metadata of {cols} columns does not describe {k} dense columns")
    flat = meta.reshape(-1).gather(0, _scatter_offsets(rows, cols, meta.dtype, meta.device))
    flat = flat.to(torch.int64) & ((1 << (4 * per_elem)) - 1)
    nib = (flat.view(rows, cols, 1) >> (torch.arange(per_elem, device=meta.device) * 4)) & 0xF
    nib = nib.reshape(rows, -1)  # one nibble per group
    valid = (0x4, 0xE) if values.dtype == torch.float32 else (0x4, 0x8, 0xC, 0x9, 0xD, 0xE)
    bad = ~torch.isin(nib, torch.tensor(valid, device=nib.device))
    if bool(bad.any()):
        r, g = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"metadata row {r}, group {g} holds nibble {int(nib[r, g]):#x}, which names no "
                         f"{'1:2' if values.dtype == torch.float32 else '2:4'} pair of positions")
    dense = torch.zeros(rows, k, dtype=values.dtype, device=values.device)
    if values.dtype == torch.float32:
        pos = (torch.arange(nib.shape[1], device=meta.device) * 2)[None, :] + ((nib & 3) // 2)
        dense.scatter_(1, pos, values)
    else:
        base = (torch.arange(nib.shape[1], device=meta.device) * 4)[None, :]
        pos = torch.stack((base + (nib & 3), base + (nib >> 2)), dim=-1).reshape(rows, -1)
        dense.scatter_(1, pos, values)
    kept = torch.zeros(rows, k, dtype=torch.bool, device=values.device)
    kept.scatter_(1, pos, True)
    return dense, kept
