"""Kernel choice for a swapped layer: time the candidates (dense included) once on this machine and
remember the winner on disk, keyed by machine, torch and pysparse versions, the kernels' source
hash (a rebuilt kernel is timed again), layer shape, format, density, dtype and token-count
bucket. The candidates are timed in alternating rounds (``pysparse.bench.median_time`` each) and
each keeps its best round: another tenant's burst of work slows one round, not the choice.

The cache is a JSON file, ``$PYSPARSE_CACHE_DIR/kernel_choice.json`` (default
``~/.cache/pysparse``); delete it, or pass ``cache=False`` to ``sparsify``, to time again.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict

import torch

from .._loader import _C, _build_info
from ..bench import TICK, median_time

_FILE = "kernel_choice.json"


def cache_path() -> Path:
    return Path(os.environ.get("PYSPARSE_CACHE_DIR") or Path.home() / ".cache" / "pysparse") / _FILE


def machine_key() -> str:
    """CPU model, the kernel ISA in use, threads, torch and pysparse versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    kernels = getattr(_build_info, "KERNEL_HASH", "")
    return (f"{cpu}|{_C.cpu_isa()}|t{torch.get_num_threads()}|torch {torch.__version__}|pysparse {_build_info.VERSION}"
            f"{'+' + kernels if kernels else ''}")


def bucket(tokens: int) -> int:
    """Token counts are timed per power-of-two bucket (1, 2, 4, ..., rounded up)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def _load() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}  # a missing or corrupt cache only costs a re-timing


def _is_timing(entry) -> bool:
    """Whether a cache entry is {candidate: seconds per call} with every time at least one tick
    (as median_time writes) and finite: anything else was edited or damaged, and is timed again
    rather than trusted (speedups divide by these). NaN fails both comparisons; the upper bound
    also stops a huge int, which float() would overflow on; type() leaves bools out."""
    return isinstance(entry, dict) and all(type(v) in (int, float) and TICK <= v <= sys.float_info.max
                                           for v in entry.values())


def _store(key: str, value: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Damaged entries are dropped, not carried along: what remains is flat and dumps safely.
        data = {k: v for k, v in _load().items() if _is_timing(v)}
        data[key] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent writers lose an entry at worst, never the file
        except OSError:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only home directory must not break sparsify


def time_candidates(key: str, candidates: Dict[str, Callable[[], object]], *, use_cache: bool = True,
                    reps: int = 15) -> "tuple[Dict[str, float], bool]":
    """Seconds per call of each candidate and whether they came from the cache."""
    full = f"{machine_key()}|{key}"
    if use_cache:
        hit = _load().get(full)
        if _is_timing(hit) and set(hit) == set(candidates):
            return {k: float(v) for k, v in hit.items()}, True
    # Alternating rounds, the best round's median per candidate: noise only ever slows a call, so
    # the fastest round is the one least disturbed (sequential medians cached a 768x768 90% CSR
    # layer at 1.5x dense's time during one busy second, and the layer stayed dense).
    rounds = 3
    per = max(1, reps // rounds)
    times = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name] = min(times[name], median_time(fn, per))
    if use_cache:
        _store(full, times)
    return times, False
