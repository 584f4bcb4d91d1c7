"""Index checks for the GPU (Triton) launchers, made once per matrix version instead of per call.

The CUDA C++ launchers keep the same memo in csrc/include/checked_indices.h, which says why: a
GPU op can only raise on a bad index after reading a verdict back from the device, a host sync
that costs as much as a decode-sized product and cannot happen inside CUDA graph capture. So a
matrix's index tensors are checked on first use and remembered, keyed by the tensors themselves
(weak references) and their version counters, which every in-place write bumps. Writes that bypass
the version counter (``.data``, DLPack, a shared numpy array) are not seen; the Triton kernels
still clamp what they read, so such a write can give wrong numbers but never an out-of-bounds
access. Inference tensors carry no version counter and are checked on every call.

The checks raise the CPU kernels' sentences (and error types), so an op fails the same way on every
device. The memo (`recalled` / `remember`) also keeps pysparse.autograd's transposed patterns.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch

_CAPACITY = 4096
# (ids of the tensors, param) -> (weak references, their states when stored, the value stored)
_memo: Dict[tuple, tuple] = {}
_lock = threading.Lock()


def _state(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr(), t.numel(), t.dtype)


def traced(*tensors: torch.Tensor) -> bool:
    """Whether these are fake/functional tensors of a trace (no storage to key a memo on)."""
    if torch.compiler.is_compiling():
        return True
    try:
        for t in tensors:
            t.data_ptr()
    except RuntimeError:
        return True
    return False


def recalled(tensors: Tuple[torch.Tensor, ...], param) -> Optional[tuple]:
    """The entry remembered for `tensors` under `param` ((refs, states, value)), or None when
    there is none or a tensor was replaced or written since."""
    seen = _memo.get((tuple(id(t) for t in tensors), param))
    if seen is not None and all(r() is t for r, t in zip(seen[0], tensors)) \
            and seen[1] == tuple(_state(t) for t in tensors):
        return seen
    return None


def remember(tensors: Tuple[torch.Tensor, ...], param, value=None) -> None:
    """Store `value` for `tensors` under `param` until one of them is written, replaced or freed
    (a freed tensor's entry goes at once: a remembered value may hold memory). Inference tensors
    have no version counter and are not remembered."""
    if any(t.is_inference() for t in tensors):
        return
    key = (tuple(id(t) for t in tensors), param)
    with _lock:  # misses only: a hit reads the dict without it
        _memo.pop(key, None)
        if len(_memo) >= _CAPACITY:  # the oldest go first (dicts keep insertion order)
            while len(_memo) >= _CAPACITY:
                del _memo[next(iter(_memo))]
        refs = tuple(weakref.ref(t, lambda _, k=key: _memo.pop(k, None)) for t in tensors)
        _memo[key] = (refs, tuple(_state(t) for t in tensors), value)


def once(tensors: Tuple[torch.Tensor, ...], param, check: Callable[[], None]) -> None:
    """Runs check() unless `tensors` passed it with the same `param` and have not changed since."""
    if recalled(tensors, param) is not None:
        return
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        if any(t.is_inference() for t in tensors):
            raise RuntimeError("pysparse: a sparse matrix made under torch.inference_mode() has no version "
                               "counter, so its indices are checked on every product, which cannot happen during "
                               "CUDA graph capture: build it outside inference mode")
        raise RuntimeError("pysparse: a sparse matrix's indices are checked on its first product, which "
                           "cannot happen during CUDA graph capture: run the op once before capturing")
    check()
    remember(tensors, param)


def compressed(crow: torch.Tensor, col: torch.Tensor, cols: int, unit: str) -> None:
    """What the CPU kernels check of CSR/BSR indices (rows/cols in blocks for BSR, unit "blocks"
    or "nonzeros"): row pointers from 0 to the number of entries, non-decreasing, and column
    indices in [0, cols). Sorted, unique columns are the formats' invariant, not the kernels'."""
    def check():
        nnz = col.numel()
        if crow.numel() == 0:
            return
        c = crow.long()
        steps = c[1:] < c[:-1]
        col_bad = ((col < 0) | (col >= cols)).any() if nnz else torch.zeros((), dtype=torch.bool, device=col.device)
        # one transfer for the verdicts
        first, last, dec, bad = torch.stack([c[0], c[-1], steps.any().long(), col_bad.long()]).tolist()
        if first != 0:
            raise RuntimeError(f"pysparse: row pointers must start at 0, got {first}")
        if last != nnz:
            raise RuntimeError(f"pysparse: the last row pointer ({last}) must equal the number of {unit} ({nnz})")
        if dec:
            i = int(torch.nonzero(steps)[0, 0])
            raise RuntimeError(f"pysparse: row pointers must be non-decreasing, but entry {i + 1} "
                               f"({int(c[i + 1])}) is below entry {i} ({int(c[i])})")
        if bad:
            what = "block columns" if unit == "blocks" else "columns"
            raise RuntimeError(f"pysparse: a column index is out of range for a matrix with {cols} {what}")
    once((crow, col), ("compressed", cols, unit), check)


def nm_mask(mask: torch.Tensor, rows: int, cols: int, n: int, m: int) -> None:
    """What the CPU kernels check of an N:M bitmap (rows, ceil(cols / 8)): every group of m columns
    marks exactly n positions and no bit past the last column is set."""
    def check():
        if rows == 0 or mask.numel() == 0:
            return
        from .formats import unpack_bits
        bits = unpack_bits(mask, mask.shape[1] * 8)
        per_group = bits[:, :cols].reshape(rows, cols // m, m).sum(-1)
        bad = (per_group != n).any(-1) | bits[:, cols:].any(-1)
        if bool(bad.any()):
            r = int(torch.nonzero(bad)[0, 0])
            raise RuntimeError(f"pysparse: N:M mask row {r} has a group of {m} columns that does not mark "
                               f"exactly {n} positions (or marks a column past {cols})")
    once((mask,), ("nm", rows, cols, n, m), check)


def block_kinds(kind: torch.Tensor) -> None:
    """What the CPU kernel checks of a block mask's kinds: 0 (skip), 1 (partial) or 2 (full)."""
    def check():
        bad = (kind < 0) | (kind > 2)
        if bool(bad.any()):
            raise ValueError(f"pysparse: block_kind must hold 0 (skip), 1 (partial) or 2 (full), got "
                             f"{int(kind[bad][0])} at flat index {int(torch.nonzero(bad.flatten())[0, 0])}")
    once((kind,), ("kinds",), check)
