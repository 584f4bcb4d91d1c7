"""Timing: the one place pysparse measures speed (sparsify's kernel choice, the demo, the layer
table of ``python -m pysparse layers`` and the benchmarks all time through these).

- ``median_time(fn, reps)``: seconds, median of plain ``perf_counter`` calls after one warm-up;
  cheap enough to run inside ``sparsify`` for every candidate kernel of every layer.
- ``alternating(fa, fb, ..., rounds=, reps=)``: the sides of a speedup timed in alternating rounds,
  so that machine noise (another tenant, a frequency change) hits both alike.
- ``median_us(fn, min_run_time)``: microseconds, median of
  ``torch.utils.benchmark.Timer.blocked_autorange`` on all of torch's threads (the Timer's default
  is one thread); what the benchmark tables report.
- ``rotating(make, nbytes, cold, mb)`` and ``cold_copies(nbytes, cold_bytes)``: operands that
  stay in cache (warm) or stream from DRAM on every call (cold).
- ``roofline(threads, seconds)``: the ceilings a kernel's rate is a fraction of: the FMA peak
  (fp32 FMA; bf16 ``vdpbf16ps`` where present) and the read bandwidth of each cache level and of
  DRAM, measured by register-only and streaming loops on this machine (``python -m pysparse
  roofline`` prints them). torch's own matmul rate is *not* a ceiling: it is one more
  competitor, a fraction of the FMA peak like ours.
"""
from __future__ import annotations

import functools
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.benchmark import Timer

__all__ = ["TICK", "median_time", "alternating", "median_us", "cold_copies", "rotating", "Roofline",
           "roofline", "cache_sizes"]

#: The resolution of ``time.perf_counter`` in seconds: the smallest time ``median_time`` returns.
TICK = time.get_clock_info("perf_counter").resolution


def median_time(fn: Callable[[], object], reps: int = 15) -> float:
    """Median seconds of `reps` calls of fn() after one warm-up call, at least one clock tick."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # A call faster than the clock can see reads as one tick: a 0 would divide in a speedup.
    return max(sorted(times)[len(times) // 2], TICK)


def alternating(*fns: Callable[[], object], rounds: int = 5, reps: int = 7) -> Tuple[float, ...]:
    """Median seconds of each of `fns` over `rounds` alternating rounds (each the `median_time`
    of `reps` calls), so that machine noise hits every side of a ratio alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(median_time(fn, reps))
    return tuple(sorted(t)[rounds // 2] for t in times)


def median_us(fn: Callable, min_run_time: float = 0.2, *, operands: Optional[Iterator] = None,
              max_call_s: Optional[float] = None) -> float:
    """Median microseconds per call of fn(), from Timer.blocked_autorange(min_run_time) on all of
    torch's threads (the Timer's default is one thread).

    operands: an iterator (e.g. ``itertools.cycle(copies)``); each call is then fn(next(operands)),
    drawn inside the timed statement, so a cold rotation costs no extra Python call per timing.
    max_call_s: a first call is made and timed as a warm-up; when it takes longer than max_call_s,
    one more call is timed alone and returned instead (bounds the wall time of a sweep).
    """
    if operands is None:
        stmt, glob = "fn()", {"fn": fn}
    else:
        stmt, glob = "fn(next(operands))", {"fn": fn, "operands": operands}
    if max_call_s is not None:
        call = (lambda: fn(next(operands))) if operands is not None else fn
        t0 = time.perf_counter()
        call()  # warm-up (first touch, lazy init)
        if time.perf_counter() - t0 > max_call_s:
            t0 = time.perf_counter()
            call()
            return (time.perf_counter() - t0) * 1e6
    timer = Timer(stmt, globals=glob, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def cold_copies(nbytes: int, cold_bytes: int) -> int:
    """How many copies of an `nbytes` operand a cold rotation cycles through: more than
    `cold_bytes` in all and at least 2, so each call's copy was evicted from cache by the others."""
    return max(2, int(cold_bytes) // max(int(nbytes), 1) + 1)


def rotating(make: Callable[[], object], nbytes: int, cold: bool, mb: float = 64) -> Callable[[], object]:
    """A callable that returns a fresh copy each call (cold: `cold_copies` of `make()` totalling
    more than `mb` MiB, so the data streams from DRAM) or the same object every call (warm)."""
    if not cold:
        obj = make()
        return lambda: obj
    copies = [make() for _ in range(cold_copies(nbytes, int(mb * 2**20)))]
    it = itertools.cycle(copies)
    return lambda: next(it)


# ---------------------------------------------------------------------------------------------
# The roofline: hardware ceilings, measured.

def cache_sizes() -> Dict[str, int]:
    """Bytes of the L1 data, L2 and L3 caches that one core sees (the L3 is shared), from sysfs;
    a level the kernel does not report is left out."""
    out: Dict[str, int] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for e in entries:
        if not e.startswith("index"):
            continue
        try:
            with open(f"{base}/{e}/level") as f:
                level = int(f.read())
            with open(f"{base}/{e}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{e}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            out[f"L{level}"] = int(text.rstrip("KMG")) * mult
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Roofline:
    """Ceilings measured on `threads` threads: GFLOP/s and GB/s (1e9).

    fp32_gflops: fp32 FMA (AVX-512, else AVX2) from a register-only loop: the peak every fp32
    kernel (ours, torch's, ONNX Runtime's) is a fraction of. bf16_dot_gflops: ``vdpbf16ps``
    (AVX512-BF16), 0.0 where the CPU lacks it. read_gbps: the read bandwidth of a working set
    per thread that fits each level (keys L1, L2, L3, DRAM; working_set_bytes says the sizes).
    """

    threads: int
    fp32_gflops: float
    bf16_dot_gflops: float
    read_gbps: Dict[str, float] = field(default_factory=dict)
    working_set_bytes: Dict[str, int] = field(default_factory=dict)

    def fraction(self, gflops: float, dtype: str = "fp32") -> float:
        """gflops as a fraction of the FMA peak the kernel can use: fp32 FMA for fp32, and for
        bf16 the faster of fp32 FMA (widen, then FMA) and vdpbf16ps."""
        peak = self.fp32_gflops if dtype != "bf16" else max(self.fp32_gflops, self.bf16_dot_gflops)
        return gflops / peak if peak > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"threads": self.threads, "fp32_gflops": self.fp32_gflops,
                "bf16_dot_gflops": self.bf16_dot_gflops, "read_gbps": dict(self.read_gbps),
                "working_set_bytes": dict(self.working_set_bytes)}


def _working_sets(threads: int) -> Dict[str, int]:
    """Per-thread buffer sizes that one level serves: half of L1d and of L2 (the rest holds what
    the loop itself touches), a quarter of the L3's share per thread, and 256 MiB (> any L3)."""
    caches = cache_sizes()
    l1 = caches.get("L1", 32 * 2**10)
    l2 = caches.get("L2", 1 * 2**20)
    sets = {"L1": l1 // 2, "L2": l2 // 2}
    if "L3" in caches and caches["L3"] // threads // 4 > l2 * 2:
        sets["L3"] = caches["L3"] // threads // 4
    sets["DRAM"] = max(256 * 2**20 // threads, 4 * caches.get("L3", 0) // threads)
    return sets


@functools.lru_cache(maxsize=None)
def roofline(threads: Optional[int] = None, seconds: float = 0.3) -> Roofline:
    """Measure the ceilings on `threads` threads (default: torch's thread count), each probe
    running about `seconds` (the best of 3 runs is kept: a ceiling is what the hardware can do,
    and noise from other tenants only ever lowers a rate). Cached per (threads, seconds): a
    benchmark asks once and divides every rate by it."""
    from . import _C

    threads = int(threads or torch.get_num_threads())
    if threads < 1:
        raise ValueError(f"pysparse.bench.roofline: threads must be >= 1, got {threads}")

    def best(fn):
        return max(fn() for _ in range(3))

    fp32 = best(lambda: _C.probe_flops("fp32", threads, seconds))
    bf16 = best(lambda: _C.probe_flops("bf16", threads, seconds)) if _C.bf16_dot_supported() else 0.0
    sets = _working_sets(threads)
    bw = {k: best(lambda b=b: _C.probe_read_bandwidth(b, threads, seconds)) for k, b in sets.items()}
    return Roofline(threads, fp32, bf16, bw, sets)
