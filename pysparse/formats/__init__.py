"""Sparse formats as plain tensors.

Each format is a small Python object holding ordinary dense tensors (indices and values) and a
shape. Nothing here is a torch sparse layout, so torch.compile, export and state_dicts see only
strided tensors. Row pointers are int32 unless the matrix needs int64 (nnz or a dimension of
2**31 or more). CSR column indices are int16 when the matrix has at most 32768 columns (they are
a third of the bytes a memory-bound product reads), else they match the row pointers; BSR
column indices always match the row pointers. ``index_dtype=`` overrides the choice.

Construction from raw tensors validates them (``check=True``) and raises ``ValueError`` naming the
first problem found; ``check=False`` skips the O(nnz) checks for data you already trust.

The registry: ``FORMATS`` maps each format's ``kind`` ("csr", "bsr", "nm": the prefix of its ops'
names) to its class; ``build(kind, tensors, shape, nm)`` makes a format object from its tensors
(in ``fields`` order), which is how modules that keep the tensors as buffers rebuild it.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Type

import torch

from ._common import Format, shape_entry
from .compressed import BSR, CSR
from .nm import NM_CHOICES, Sparse24, SparseNM, keep_largest, pack_bits, unpack_bits

FORMATS: Dict[str, Type[Format]] = {"csr": CSR, "bsr": BSR, "nm": SparseNM}


def build(kind: str, tensors: Sequence[torch.Tensor], shape, nm: Tuple[int, int] = (0, 0), *,
          check: bool = True) -> Format:
    """The `kind` format of `shape` from its tensors (in its ``fields`` order); nm = (n, m) for
    N:M. check=False skips the O(nnz) validation (tensors already checked, e.g. a module's own
    buffers)."""
    if kind not in FORMATS:
        raise ValueError(f"format kind must be one of {tuple(FORMATS)}, got {kind!r}")
    if kind == "nm":
        return SparseNM(*tensors, shape, *nm, check=check)
    return FORMATS[kind](*tensors, shape, check=check)


def format_name(kind: str, nm: Tuple[int, int] = (0, 0)) -> str:
    """"csr", "bsr" or "n:m" (e.g. "2:4") for a kind and its (n, m)."""
    return f"{nm[0]}:{nm[1]}" if kind == "nm" else kind


__all__ = ["BSR", "CSR", "FORMATS", "Format", "NM_CHOICES", "Sparse24", "SparseNM", "build", "format_name",
           "keep_largest", "pack_bits", "shape_entry", "unpack_bits"]
