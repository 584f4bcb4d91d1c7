"""Timing: the one place pysparse measures speed (sparsify's kernel choice, the demo, the layer
table of ``python -m pysparse layers`` and the benchmarks all time through these).

- ``median_time(fn, reps)``: seconds, median of plain ``perf_counter`` calls after one warm-up;
  cheap enough to run inside ``sparsify`` for every candidate kernel of every layer.
- ``alternating(fa, fb, rounds, reps)``: the two sides of a speedup timed in alternating rounds,
  so that machine noise (another tenant, a frequency change) hits both alike.
- ``median_us(fn, min_run_time)``: microseconds, median of
  ``torch.utils.benchmark.Timer.blocked_autorange`` on all of torch's threads (the Timer's default
  is one thread); what the benchmark tables report.
- ``rotating(make, nbytes, cold, mb)`` and ``cold_copies(nbytes, cold_bytes)``: operands that
  stay in cache (warm) or stream from DRAM on every call (cold).
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.utils.benchmark import Timer

__all__ = ["TICK", "median_time", "alternating", "median_us", "cold_copies", "rotating"]

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


def alternating(fa: Callable[[], object], fb: Callable[[], object], rounds: int = 5,
                reps: int = 7) -> Tuple[float, float]:
    """Median seconds of fa and fb over `rounds` alternating rounds (each the `median_time` of
    `reps` calls), so that machine noise hits both sides of a ratio alike."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(median_time(fa, reps))
        tb.append(median_time(fb, reps))
    return sorted(ta)[rounds // 2], sorted(tb)[rounds // 2]


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
