"""Timing helpers shared by the CPU benchmarks (imported as a sibling module: the benchmarks run
as scripts, so their own folder is on sys.path)."""
from __future__ import annotations

import itertools

import torch
from torch.utils.benchmark import Timer


def median_us(fn, min_run_time):
    """Median of Timer.blocked_autorange in microseconds, on all of torch's threads (the Timer's
    default is one thread)."""
    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def rotating(make, nbytes, cold, mb=64):
    """A callable that returns a fresh copy each call (cold: copies totalling > mb MB, so the data
    streams from DRAM) or the same object every call (warm)."""
    if not cold:
        obj = make()
        return lambda: obj
    copies = [make() for _ in range(max(2, int(mb * 2**20 / max(nbytes, 1)) + 1))]
    it = itertools.cycle(copies)
    return lambda: next(it)
