"""Sparse x dense matmul on CPU: pysparse CSR/BSR against every peer, side by side in one run.

    cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_spmm.py            # full sweep
    cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_spmm.py --quick    # smoke run

Y = A @ X with A (M, K) pruned from torch.randn and X (K, n) dense row-major. Peers, timed in the
same process: dense torch.mm (fp32 and bf16), torch.sparse CSR and BSR (int32 indices, so MKL is
not charged for an int64 -> int32 conversion on every call; torch.sparse on CPU is fp32 only) and
scipy.sparse (fp32 only, single-threaded). Every number is the median of
torch.utils.benchmark.Timer.blocked_autorange with num_threads=torch.get_num_threads() (the Timer
default is 1 thread). A call that takes longer than --max-call-s is timed once after one
warm-up call instead, which keeps the sweep's wall time bounded.

warm: the same operand every call (it stays in cache when it fits).
cold: the call rotates through independent copies of the sparse/dense operand totalling more than
--cold-mb (at least 2 copies), so each call streams its weights from DRAM. X and the output stay
warm in both modes (they are the activations).

Before any timing, ours and the sparse peers are checked against the dense fp32 product of the same
(rounded) operands at every n; a mismatch aborts the run.

Roofline: achieved GFLOP/s = 2 * nnz * n / t over the fp32 FMA peak measured by a register-only
FMA loop (pysparse.bench.roofline; torch.mm's own rate, a fraction of that peak like ours, is
reported beside it); achieved GB/s = (values + column indices + row pointers + X + Y bytes) / t
over the streaming-read bandwidth of a parallel sum over a 1 GiB tensor. The peak is measured at
the start and the end of the run (the higher is used); the read bandwidth, which drifts with the host's other tenants, at the
start, before each shape and at the end (the median is used). Warm cases read from cache, so their
bandwidth fraction can exceed 1.

Output: a CSV (default benchmarks/results/<hostname>/spmm.csv; spmm_quick.csv with --quick), the
markdown summary (ceilings, bars, table) next to it with the suffix .md, and optionally
(--results-md) the same summary in a marked section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import itertools
import math
import os
import platform
import shlex
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy
import scipy.sparse as sp
import torch

import pysparse
from pysparse import _C
from pysparse.bench import cold_copies, median_us

warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")

HERE = Path(__file__).resolve().parent

# The grid (also what the bars are evaluated over).
SPEC_SHAPES = [(3072, 768), (768, 3072), (4096, 4096), (11008, 4096)]
SPEC_SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
SPEC_BLOCK_SPARSITIES = [0.9]
SPEC_NS = [1, 8, 32, 128, 512]
BLOCK = (32, 32)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CEILINGS = ("peak_fp32_gflop_per_s", "copy_gb_per_s", "read_gb_per_s")
# Ours: the library's default (int32 row pointers, int16 column indices when K <= 32768) or forced.
CSR_INDEX = {"auto": None, "int16": torch.int16, "int32": torch.int32}
_SHORT = {torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
# Normwise relative error of ours/peers against the fp32 dense product of the same rounded inputs.
TOL = {"fp32": 1e-5, "bf16": 1e-2}

CSV_FIELDS = [
    "M", "K", "shape", "pattern", "sparsity", "format", "index_dtypes", "dtype", "mode", "n", "nnz", "density",
    "cold_copies", "ours_us", "dense_fp32_us", "dense_bf16_us", "torch_csr_us", "torch_bsr_us",
    "scipy_1thread_us", "x_vs_dense_fp32", "x_vs_dense_bf16", "x_vs_torch_sparse", "x_vs_scipy",
    "gflop_per_s", "roofline_flop_frac", "gb_per_s", "roofline_bw_frac", "bytes_moved_MB",
    "rel_err", "others_cpu_frac", "peak_fp32_gflop_per_s", "read_gb_per_s", "copy_gb_per_s", "threads",
]


# ------------------------------------------------------------------------------------------------
# Timing

@dataclass
class Config:
    min_run_time: float
    max_call_s: float
    cold_bytes: int
    threads: int
    retries: int = 2
    noise: float = 0.1


@dataclass
class Timing:
    us: float      # median microseconds per call
    others: float  # fraction of all CPUs' time used by other processes (or VM steal) meanwhile


def _cpu_ticks() -> Optional[Tuple[int, int]]:
    """(busy, total) clock ticks of all CPUs from /proc/stat (steal counts as busy); None if absent."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4], sum(v)


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def cpu_busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Fraction of all CPUs' time that was not idle over `seconds` (None without /proc/stat)."""
    a = _cpu_ticks()
    time.sleep(seconds)
    b = _cpu_ticks()
    if a is None or b is None:
        return None
    return (b[0] - a[0]) / max(b[1] - a[1], 1)


def measure_us(call: Callable[[object], object], operands: Sequence[object], cfg: Config) -> Timing:
    """Median microseconds of call(operand), cycling through `operands` one per call
    (``pysparse.bench.median_us``).

    One operand = warm; several = cold rotation. Every timed method pays the same cycle+lambda
    overhead (~0.1 us). Slow calls (> cfg.max_call_s) get one warm-up and one timed call.

    On a shared machine a descheduled OpenMP thread stalls a whole call for scheduler ticks, so
    each measurement also records how much CPU time other processes took meanwhile (/proc/stat
    minus this process); above cfg.noise it is repeated up to cfg.retries times (unless it took
    more than 2 s) and the least disturbed attempt is kept.
    """
    it = itertools.cycle(operands)
    best: Optional[Timing] = None
    for _ in range(cfg.retries + 1):
        a, p0, w0 = _cpu_ticks(), time.process_time(), time.perf_counter()
        us = median_us(call, cfg.min_run_time, operands=it, max_call_s=cfg.max_call_s)
        b, p1, w1 = _cpu_ticks(), time.process_time(), time.perf_counter()
        others = 0.0
        if a is not None and b is not None and b[1] > a[1]:
            ncpu = (b[1] - a[1]) * _TICK_S / (w1 - w0)  # CPUs the kernel accounts for
            others = max(0.0, ((b[0] - a[0]) * _TICK_S - (p1 - p0)) / ((w1 - w0) * ncpu))
        cur = Timing(us, others)
        if best is None or cur.others < best.others:
            best = cur
        if cur.others <= cfg.noise or w1 - w0 > 2.0:  # retrying multi-second measurements costs too much
            break
    return best


def n_copies(bytes_one: int, mode: str, cfg: Config) -> int:
    return 1 if mode == "warm" else cold_copies(bytes_one, cfg.cold_bytes)


def _ceiling_cfg(cfg: Config) -> Config:
    return Config(min_run_time=max(1.0, cfg.min_run_time), max_call_s=float("inf"), cold_bytes=0,
                  threads=cfg.threads, retries=cfg.retries, noise=cfg.noise)


def measure_read_bw(cfg: Config) -> Timing:
    """Streaming-read GB/s (in Timing.us's place): a parallel sum over a 1 GiB fp32 tensor."""
    src = torch.randn(2**28)
    t = measure_us(lambda _: src.sum(), [None], _ceiling_cfg(cfg))
    gbs = src.nbytes / t.us / 1e3
    del src
    gc.collect()
    return Timing(gbs, t.others)


def measure_ceilings(cfg: Config) -> Dict[str, float]:
    """fp32 FMA peak GFLOP/s (register-only FMA loop, best of 3), torch.mm's 4096^3 rate, DRAM copy GB/s (read + write, 1 GiB) and streaming-read
    GB/s, all with the run's thread count and the same noise retries as every case."""
    c = _ceiling_cfg(cfg)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    mm = measure_us(lambda _: torch.mm(a, b), [None], c)
    del a, b
    src = torch.randn(2**28)
    dst = torch.empty_like(src)
    cp = measure_us(lambda _: dst.copy_(src), [None], c)
    del src, dst
    gc.collect()
    rd = measure_read_bw(cfg)
    fma = max(_C.probe_flops("fp32", cfg.threads, 0.3) for _ in range(3))
    return {"peak_fp32_gflop_per_s": fma, "torch_mm_gflop_per_s": 2 * 4096**3 / mm.us / 1e3,
            "copy_gb_per_s": 2 * 2**30 / cp.us / 1e3,
            "read_gb_per_s": rd.us, "others_cpu_frac": max(mm.others, cp.others, rd.others)}


# ------------------------------------------------------------------------------------------------
# Operands

def nbytes(*ts) -> int:
    total = 0
    for t in ts:
        total += t.nbytes if isinstance(t, (np.ndarray, torch.Tensor)) else 0
    return total


def clone_ours(A):
    return type(A)(A.crow_indices.clone(), A.col_indices.clone(), A.values.clone(), A.shape, check=False)


def ours_bytes(A) -> int:
    return nbytes(A.crow_indices, A.col_indices, A.values)


def torch_sparse(A):
    """torch.sparse CSR/BSR twin of a pysparse operand, int32 indices, fresh storage."""
    make = torch.sparse_csr_tensor if isinstance(A, pysparse.CSR) else torch.sparse_bsr_tensor
    return make(A.crow_indices.int().clone(), A.col_indices.int().clone(), A.values.clone(), A.shape,
                check_invariants=False)


def torch_sparse_bytes(St) -> int:
    return nbytes(St.crow_indices(), St.col_indices(), St.values())


def scipy_sparse(A):
    """scipy CSR/BSR twin of a pysparse fp32 operand, int32 indices, fresh storage."""
    args = (A.values.numpy().copy(), A.col_indices.int().numpy().copy(), A.crow_indices.int().numpy().copy())
    S = (sp.csr_matrix if isinstance(A, pysparse.CSR) else sp.bsr_matrix)(args, shape=A.shape)
    assert S.indices.dtype == np.int32 and S.indptr.dtype == np.int32
    return S


def scipy_bytes(S) -> int:
    return nbytes(S.data, S.indices, S.indptr)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    denom = ref.norm().item()
    return (y - ref).norm().item() / denom if denom else (y - ref).norm().item()


def check(what: str, y, ref: torch.Tensor, dtype_name: str) -> float:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.asarray(y))
    if tuple(y.shape) != tuple(ref.shape):
        sys.exit(f"\n*** CORRECTNESS FAILURE: {what}: shape {tuple(y.shape)} != {tuple(ref.shape)}")
    e = rel_err(y, ref)
    if not math.isfinite(e) or e > TOL[dtype_name]:
        sys.exit(f"\n*** CORRECTNESS FAILURE: {what}: normwise relative error {e:.3e} > {TOL[dtype_name]:.0e} "
                 f"against the fp32 dense product. Aborting: timings of a wrong result mean nothing.")
    return e


# ------------------------------------------------------------------------------------------------
# The sweep

def fmt_shape(M, K) -> str:
    return f"{M}x{K}"


def pattern_label(pattern: str, s: float) -> str:
    return f"{pattern} {round(s * 100)}%"


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def run_sweep(args, cfg: Config, log, read_samples: List[Timing]) -> List[dict]:
    patterns = [("unstructured", s) for s in args.sparsities] + [("block32x32", s) for s in args.block_sparsities]
    rows: List[dict] = []
    n_rows_total = len(args.shapes) * sum(1 if p == "unstructured" else 2 for p, _ in patterns) \
        * len(args.dtypes) * len(args.modes) * len(args.ns)
    t_start = time.perf_counter()

    def elapsed() -> str:
        return f"[{time.perf_counter() - t_start:6.0f} s]"

    def noisy(t: Optional[Timing]) -> str:
        return f" (others used {t.others:.0%} CPU)" if t is not None and t.others > cfg.noise else ""

    for (M, K) in args.shapes:
        shape = fmt_shape(M, K)
        # The host's memory bandwidth drifts (other tenants): sample the read ceiling once per shape.
        bw = measure_read_bw(cfg)
        read_samples.append(bw)
        log(f"  streaming read before {shape}: {bw.us:.1f} GB/s{noisy(bw)}  {elapsed()}")
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + M * 7919 + K)
        W0 = torch.randn(M, K, generator=gen)
        Xs = {n: torch.randn(K, n, generator=gen) for n in args.ns}
        Xs_np = {n: X.numpy() for n, X in Xs.items()}
        Xs_dt = {(dn, n): X.to(DTYPES[dn]) for n, X in Xs.items() for dn in DTYPES}

        # Dense peers: independent of sparsity, timed once per (dtype, mode, n) and reused. fp32 is
        # always timed (the baseline of every row); bf16 only when bf16 rows are asked for.
        dense: Dict[Tuple[str, str, int], Timing] = {}
        for dn in ["fp32"] + [d for d in args.dtypes if d == "bf16"]:
            Wd = W0.to(DTYPES[dn])
            for mode in args.modes:
                k = n_copies(Wd.nbytes, mode, cfg)
                copies = [Wd.clone() for _ in range(k)] if k > 1 else [Wd]
                for n in args.ns:
                    t = dense[(dn, mode, n)] = measure_us(lambda W, X=Xs_dt[(dn, n)]: torch.mm(W, X), copies, cfg)
                    log(f"  dense {dn} {shape} {mode:4s} n={n:<4d} {t.us:12.1f} us  ({k} copies){noisy(t)}  {elapsed()}")
                del copies
            del Wd
        gc.collect()

        for pattern, s in patterns:
            if pattern == "unstructured":
                W = pysparse.prune.magnitude(W0, s)
                formats = ["CSR"]
            else:
                W = pysparse.prune.blocks(W0, s, blocksize=BLOCK)
                formats = ["CSR", "BSR"]
            base = {"CSR": pysparse.CSR.from_dense(W, index_dtype=CSR_INDEX[args.csr_index])}
            if "BSR" in formats:
                base["BSR"] = pysparse.BSR.from_dense(W, BLOCK)
            label = pattern_label(pattern, s)

            # Correctness first, at every n, for ours (every dtype/format) and the fp32 peers.
            errs: Dict[Tuple[str, str, int], float] = {}
            for dn in args.dtypes:
                Wr = W.to(DTYPES[dn]).float()
                for n in args.ns:
                    ref = Wr @ Xs_dt[(dn, n)].float()
                    for f in formats:
                        A = base[f].to(DTYPES[dn])
                        errs[(f, dn, n)] = check(f"ours {f} {dn} {shape} {label} n={n}",
                                                 pysparse.spmm(A, Xs_dt[(dn, n)]), ref, dn)
                    if dn == "fp32":
                        for f in formats:
                            check(f"torch.sparse {f} {shape} {label} n={n}", torch_sparse(base[f]) @ Xs[n], ref, dn)
                            check(f"scipy {f} {shape} {label} n={n}", scipy_sparse(base[f]) @ Xs_np[n], ref, dn)
                del Wr
            worst = {d: max((e for (f, dd, n), e in errs.items() if dd == d), default=float("nan")) for d in args.dtypes}
            log(f"{shape} {label}: correctness OK (max normwise rel err "
                + ", ".join(f"{d} {e:.1e}" for d, e in worst.items()) + ")")

            for mode in args.modes:
                # fp32 sparse peers, once per (format, n) for this pattern and mode.
                peer: Dict[Tuple[str, str, int], Timing] = {}
                for f in formats:
                    for lib, make, size, Xin in (("torch", torch_sparse, torch_sparse_bytes, Xs),
                                                 ("scipy", scipy_sparse, scipy_bytes, Xs_np)):
                        first = make(base[f])
                        k = n_copies(size(first), mode, cfg)
                        copies = [first] + [make(base[f]) for _ in range(k - 1)]
                        for n in args.ns:
                            peer[(lib, f, n)] = measure_us(lambda A, X=Xin[n]: A @ X, copies, cfg)
                        del copies, first
                        gc.collect()
                    log(f"  peers {shape} {label} {f} {mode:4s}: "
                        + "  ".join(f"n={n}: torch {peer[('torch', f, n)].us:.1f} / scipy {peer[('scipy', f, n)].us:.1f} us"
                                    for n in args.ns))

                for f in formats:
                    for dn in args.dtypes:
                        A = base[f].to(DTYPES[dn])
                        k = n_copies(ours_bytes(A), mode, cfg)
                        copies = [A] + [clone_ours(A) for _ in range(k - 1)]
                        esize = A.values.element_size()
                        for n in args.ns:
                            ours = measure_us(lambda A, X=Xs_dt[(dn, n)]: pysparse.spmm(A, X), copies, cfg)
                            us, t = ours.us, ours.us * 1e-6
                            moved = ours_bytes(A) + (K * n + M * n) * esize
                            flops = 2 * A.nnz * n
                            used = [ours, dense.get(("fp32", mode, n)), dense.get(("bf16", mode, n))]
                            if dn == "fp32":  # torch.sparse and scipy have no bf16 matmul on CPU
                                used += [peer.get(("torch", "CSR", n)), peer.get(("torch", "BSR", n)),
                                         peer.get(("scipy", f, n))]
                            else:
                                used += [None, None, None]
                            d32, d16, tcsr, tbsr, sc = (None if x is None else x.us for x in used[1:])
                            row = {
                                "M": M, "K": K, "shape": shape, "pattern": pattern, "sparsity": s,
                                "format": f, "index_dtypes": f"{_SHORT[A.crow_indices.dtype]}/{_SHORT[A.col_indices.dtype]}",
                                "dtype": dn, "mode": mode, "n": n, "nnz": A.nnz,
                                "density": A.nnz / (M * K), "cold_copies": k, "ours_us": us,
                                "dense_fp32_us": d32, "dense_bf16_us": d16,
                                "torch_csr_us": tcsr, "torch_bsr_us": tbsr, "scipy_1thread_us": sc,
                                "x_vs_dense_fp32": ratio(d32, us), "x_vs_dense_bf16": ratio(d16, us),
                                "x_vs_torch_sparse": ratio(tcsr if f == "CSR" else tbsr, us),
                                "x_vs_scipy": ratio(sc, us),
                                "gflop_per_s": flops / t / 1e9, "gb_per_s": moved / t / 1e9,
                                "bytes_moved_MB": moved / 1e6, "rel_err": errs[(f, dn, n)],
                                "others_cpu_frac": max(x.others for x in used if x is not None),
                                "threads": cfg.threads,
                            }
                            rows.append(row)
                            flag = (f" NOISY (others used {row['others_cpu_frac']:.0%} CPU)"
                                    if row["others_cpu_frac"] > cfg.noise else "")
                            log(f"[{len(rows):4d}/{n_rows_total}] {shape:>10s} {label:>17s} {f} {dn} {mode:4s} "
                                f"n={n:<4d} ours {us:10.1f} us | dense32 {fmt_num(d32)} | dense16 {fmt_num(d16)} "
                                f"| tcsr {fmt_num(tcsr)} | tbsr {fmt_num(tbsr)} | scipy {fmt_num(sc)} "
                                f"| {fmt_x(row['x_vs_dense_fp32'])} dense32, {fmt_x(row['x_vs_torch_sparse'])} torch.sparse "
                                f"| {row['gb_per_s']:.1f} GB/s{flag}  {elapsed()}")
                        del copies, A
                        gc.collect()
            del base, W
            gc.collect()
        del W0, Xs, Xs_np, Xs_dt
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------------------
# Bars (the targets), evaluated from the rows of this run

@dataclass
class Check:
    bar: str
    case: str
    measured: Optional[float]
    target: float
    others: float = 0.0  # worst share of the CPUs other processes took while its rows were timed

    @property
    def ok(self) -> Optional[bool]:
        return None if self.measured is None else self.measured >= self.target


def evaluate_bars(rows: List[dict]) -> List[Tuple[str, List[Check]]]:
    idx = {(r["shape"], r["pattern"], round(r["sparsity"], 4), r["format"], r["dtype"], r["mode"], r["n"]): r
           for r in rows}

    def check_of(bar, case, target, value, *keys):
        """value(row, ...) over the rows named by keys (shape, pattern, sparsity, fmt, dtype, mode, n)."""
        rs = [idx.get((fmt_shape(*k[0]), k[1], round(k[2], 4)) + tuple(k[3:])) for k in keys]
        if any(r is None for r in rs):
            return Check(bar, case, None, target)
        return Check(bar, case, value(*rs), target, max(r["others_cpu_frac"] for r in rs))

    bars: List[Tuple[str, List[Check]]] = []

    name = ("B1: 90% unstructured, fp32 warm, n in {32,128,512}: >= 3x dense on 3072x768, >= 2.5x on 4096x4096; "
            ">= 2x torch.sparse CSR")
    cs = []
    for shape, thr in (((3072, 768), 3.0), ((4096, 4096), 2.5)):
        for n in (32, 128, 512):
            key = (shape, "unstructured", 0.9, "CSR", "fp32", "warm", n)
            case = f"{fmt_shape(*shape)} n={n}"
            cs.append(check_of(name, case + " vs dense fp32", thr, lambda r: r["x_vs_dense_fp32"], key))
            cs.append(check_of(name, case + " vs torch CSR", 2.0, lambda r: r["x_vs_torch_sparse"], key))
    bars.append((name, cs))

    name = ("B2: 70% unstructured, fp32 warm: >= 1.5x dense at n=32, >= 1x dense at every n; "
            ">= 2x torch.sparse CSR at every n")
    cs = []
    for shape in SPEC_SHAPES:
        for n in SPEC_NS:
            key = (shape, "unstructured", 0.7, "CSR", "fp32", "warm", n)
            case = f"{fmt_shape(*shape)} n={n}"
            cs.append(check_of(name, case + " vs dense fp32", 1.5 if n == 32 else 1.0,
                               lambda r: r["x_vs_dense_fp32"], key))
            cs.append(check_of(name, case + " vs torch CSR", 2.0, lambda r: r["x_vs_torch_sparse"], key))
    bars.append((name, cs))

    name = "B3: 32x32 blocks at 90% block sparsity, ours BSR fp32 warm, n >= 32: >= 5x dense"
    cs = [check_of(name, f"{fmt_shape(*shape)} n={n} vs dense fp32", 5.0, lambda r: r["x_vs_dense_fp32"],
                   (shape, "block32x32", s, "BSR", "fp32", "warm", n))
          for shape in SPEC_SHAPES for s in SPEC_BLOCK_SPARSITIES for n in SPEC_NS if n >= 32]
    bars.append((name, cs))

    spec_patterns = [("unstructured", s) for s in SPEC_SPARSITIES] + [("block32x32", s) for s in SPEC_BLOCK_SPARSITIES]

    name = "B4a: n=1 cold, fp32 CSR: >= 60% of the streaming-read bandwidth (roofline_bw_frac >= 0.6)"
    cs = [check_of(name, f"{fmt_shape(*shape)} {pattern_label(p, s)}", 0.6, lambda r: r["roofline_bw_frac"],
                   (shape, p, s, "CSR", "fp32", "cold", 1))
          for shape in SPEC_SHAPES for p, s in spec_patterns]
    bars.append((name, cs))

    def bf16_speedup(r32, r16):
        return ratio(r32["ours_us"], r16["ours_us"])

    name = "B4b: n=1 cold, 90% 32x32 blocks: ours bf16 BSR >= 1.4x faster than ours fp32 BSR"
    cs = [check_of(name, f"{fmt_shape(*shape)} {pattern_label('block32x32', s)}", 1.4, bf16_speedup,
                   (shape, "block32x32", s, "BSR", "fp32", "cold", 1), (shape, "block32x32", s, "BSR", "bf16", "cold", 1))
          for shape in SPEC_SHAPES for s in SPEC_BLOCK_SPARSITIES]
    bars.append((name, cs))

    name = "B4c: n=1 cold: ours bf16 CSR not slower than ours fp32 CSR (fp32_us / bf16_us >= 1)"
    cs = [check_of(name, f"{fmt_shape(*shape)} {pattern_label(p, s)}", 1.0, bf16_speedup,
                   (shape, p, s, "CSR", "fp32", "cold", 1), (shape, p, s, "CSR", "bf16", "cold", 1))
          for shape in SPEC_SHAPES for p, s in spec_patterns]
    bars.append((name, cs))

    name = "B4d: n=1 cold: every bf16 case >= 10x faster than torch dense bf16"
    cs = [check_of(name, f"{fmt_shape(*shape)} {pattern_label(p, s)} {f}", 10.0, lambda r: r["x_vs_dense_bf16"],
                   (shape, p, s, f, "bf16", "cold", 1))
          for shape in SPEC_SHAPES for p, s in spec_patterns
          for f in (["CSR"] if p == "unstructured" else ["CSR", "BSR"])]
    bars.append((name, cs))
    return bars


def bar_verdict(cs: List[Check], noise: float) -> str:
    measured = [c for c in cs if c.ok is not None]
    if not measured:
        return "n/a (no case of this bar in this run)"
    bad = [c for c in measured if not c.ok]
    worst = min(measured, key=lambda c: c.measured / c.target)
    tail = (f"{len(measured) - len(bad)}/{len(measured)} cases pass; worst {worst.case}: {worst.measured:.3g} "
            f"(target {worst.target:g})")
    if len(measured) < len(cs):
        tail += f"; PARTIAL: {len(measured)} of {len(cs)} spec cases in this run"
    n_noisy = sum(c.others > noise for c in measured)
    if n_noisy:
        tail += f"; {n_noisy} case(s) timed while other processes took > {noise:.0%} of the CPUs"
    return ("MISS" if bad else "PASS") + " - " + tail


# ------------------------------------------------------------------------------------------------
# Reporting

def fmt_num(v, nd=1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


TABLE_COLS = [
    ("shape", "shape (MxK)", lambda r: r["shape"]),
    ("pattern", "pattern", lambda r: pattern_label(r["pattern"], r["sparsity"])),
    ("format", "fmt (row ptr/col idx)", lambda r: f"{r['format']} {r['index_dtypes']}"),
    ("dtype", "dtype", lambda r: r["dtype"]),
    ("mode", "mode", lambda r: r["mode"]),
    ("n", "n", lambda r: str(r["n"])),
    ("ours_us", "ours (us)", lambda r: fmt_num(r["ours_us"])),
    ("dense_fp32_us", "dense fp32 (us)", lambda r: fmt_num(r["dense_fp32_us"])),
    ("dense_bf16_us", "dense bf16 (us)", lambda r: fmt_num(r["dense_bf16_us"])),
    ("torch_csr_us", "torch CSR (us)", lambda r: fmt_num(r["torch_csr_us"])),
    ("torch_bsr_us", "torch BSR (us)", lambda r: fmt_num(r["torch_bsr_us"])),
    ("scipy_1thread_us", "scipy, 1 thread (us)", lambda r: fmt_num(r["scipy_1thread_us"])),
    ("x_vs_dense_fp32", "vs dense fp32 (x)", lambda r: fmt_num(r["x_vs_dense_fp32"], 2)),
    ("x_vs_dense_bf16", "vs dense bf16 (x)", lambda r: fmt_num(r["x_vs_dense_bf16"], 2)),
    ("x_vs_torch_sparse", "vs torch.sparse same fmt (x)", lambda r: fmt_num(r["x_vs_torch_sparse"], 2)),
    ("x_vs_scipy", "vs scipy (x)", lambda r: fmt_num(r["x_vs_scipy"], 2)),
    ("gflop_per_s", "GFLOP/s", lambda r: fmt_num(r["gflop_per_s"])),
    ("roofline_flop_frac", "of peak FLOP/s", lambda r: fmt_num(r["roofline_flop_frac"], 3)),
    ("gb_per_s", "GB/s", lambda r: fmt_num(r["gb_per_s"])),
    ("roofline_bw_frac", "of read BW", lambda r: fmt_num(r["roofline_bw_frac"], 2)),
]


def md_table(header: List[str], lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(l) + " |" for l in lines]
    return "\n".join(out)


def results_table(rows: List[dict]) -> str:
    return md_table([c[1] for c in TABLE_COLS], [[c[2](r) for c in TABLE_COLS] for r in rows])


def bars_markdown(bars, noise: float) -> Tuple[str, str]:
    summary = md_table(["bar", "verdict"], [[name, bar_verdict(cs, noise)] for name, cs in bars])
    detail_lines = []
    for name, cs in bars:
        for c in cs:
            verdict = "not run" if c.ok is None else ("PASS" if c.ok else "MISS")
            detail_lines.append([name.split(":")[0], c.case, "n/a" if c.measured is None else f"{c.measured:.3g}",
                                 f">= {c.target:g}", verdict, f"{c.others:.0%}"])
    detail = md_table(["bar", "case", "measured", "target", "result", "CPU taken by others"],
                      [l for l in detail_lines if l[4] != "not run"])
    return summary, detail


def machine_lines(ceil: Dict[str, float], ceil_end: Dict[str, float], used: Dict[str, float],
                  read_samples: List[Timing], load_start: Optional[float], cfg: Config) -> List[str]:
    cpu, family, model, flags = platform.processor() or "?", "?", "?", []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = (x.strip() for x in line.partition(":"))
                if key == "model name" and cpu in ("?", platform.processor()):
                    cpu = val
                elif key == "cpu family" and family == "?":
                    family = val
                elif key == "model" and model == "?":
                    model = val
                elif key == "flags" and not flags:
                    flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
                             if f in val.split()]
    except OSError:
        pass
    try:
        caches = ", ".join(
            f"{name} {open(f'/sys/devices/system/cpu/cpu0/cache/index{i}/size').read().strip()}"
            for i, name in ((2, "L2/core"), (3, "L3")))
    except OSError:
        caches = "caches unknown"
    info = pysparse.info()
    return [
        f"- host `{socket.gethostname()}`, CPU {cpu} (family {family}, model {model}; {' '.join(flags)}; "
        f"{caches}), {os.cpu_count()} logical CPUs, "
        f"torch threads {cfg.threads}, CPUs busy just before the run: "
        + ("unknown" if load_start is None else f"{load_start:.0%}") + " (> 10%: other processes shared the CPU)",
        f"- torch {torch.__version__}, pysparse {info['pysparse']} (CPU ISA {info['cpu_isa_selected']}), "
        f"numpy {np.__version__}, scipy {scipy.__version__} (scipy sparse matmul is single-threaded)",
        f"- ceilings used: fp32 FMA peak {used['peak_fp32_gflop_per_s']:.1f} GFLOP/s (register-only FMA loop, "
        f"pysparse.bench.roofline; start / end {ceil['peak_fp32_gflop_per_s']:.1f} / "
        f"{ceil_end['peak_fp32_gflop_per_s']:.1f}, the higher is used; torch.mm 4096^3 reached "
        f"{max(ceil['torch_mm_gflop_per_s'], ceil_end['torch_mm_gflop_per_s']):.1f}), "
        f"DRAM copy {used['copy_gb_per_s']:.1f} GB/s (read + write, 1 GiB; start / end {ceil['copy_gb_per_s']:.1f} / "
        f"{ceil_end['copy_gb_per_s']:.1f}), streaming read {used['read_gb_per_s']:.1f} GB/s (sum over 1 GiB: the "
        f"median of {len(read_samples)} samples taken at the start, before each shape and at the end: "
        + ", ".join(f"{t.us:.1f}" for t in read_samples) + ")"
        + ("" if max(t.us for t in read_samples) <= 1.15 * min(t.us for t in read_samples) else
           " - **the read samples differ by more than 15%: the host's memory bandwidth drifted during the run**")
        + (f"; other processes took up to {max(t.others for t in read_samples):.0%} of the CPUs while the "
           f"ceilings were measured" if max([t.others for t in read_samples] + [ceil['others_cpu_frac'],
                                             ceil_end['others_cpu_frac']]) > cfg.noise else ""),
        f"- timing: median of Timer.blocked_autorange(min_run_time={cfg.min_run_time}) with "
        f"num_threads={cfg.threads}; calls slower than {cfg.max_call_s} s: one warm-up + one timed call; "
        f"cold = rotating copies totalling > {cfg.cold_bytes / 1e6:.0f} MB (at least 2); a measurement "
        f"during which other processes took > {cfg.noise:.0%} of the CPUs is retried up to {cfg.retries} times",
        "- ratios `vs X` = X's time / ours (> 1: ours is faster). torch.sparse and scipy run fp32 only "
        "(n/a on bf16 rows); torch BSR is run on block-pruned weights only. `of read BW` divides the "
        "bytes of the sparse operand + X + Y by the streaming-read bandwidth: warm rows read from cache "
        "and can exceed 1. `of peak FLOP/s` is against the measured fp32 FMA peak (bf16 rows too: the "
        "kernels widen bf16 and accumulate with fp32 FMAs).",
    ]


def write_outputs(args, rows, ceil, ceil_end, used, read_samples, load_start, cfg, command: str, wall_s: float,
                  log) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in CSV_FIELDS})

    md_path = out.with_suffix(".md")
    out_rel, md_rel = (Path(os.path.relpath(x)).as_posix() for x in (out, md_path))
    bars = evaluate_bars(rows)
    summary, detail = bars_markdown(bars, cfg.noise)
    table = results_table(rows)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    n_noisy = sum(r["others_cpu_frac"] > cfg.noise for r in rows)
    machine = machine_lines(ceil, ceil_end, used, read_samples, load_start, cfg) + [
        f"- {n_noisy} of {len(rows)} rows include a time taken while other processes still held > "
        f"{cfg.noise:.0%} of the CPUs after the retries (`others_cpu_frac` in the CSV)"
        + (": rerun on a quiet machine before trusting them" if n_noisy else "")]
    head = [f"Command (from the repository root, {stamp}, {wall_s / 60:.1f} min wall):", "",
            "```", command, "```", ""] + machine
    md = "\n".join(["# SpMM benchmark: pysparse vs dense torch.mm, torch.sparse and scipy", ""] + head
                   + ["", "## Bars (medians; fp32 and warm unless the bar says otherwise)", "", summary, "",
                      "### Every measured case", "", detail, "", "## Results", "",
                      f"CSV: `{out_rel}`", "", table, ""])
    md_path.write_text(md)

    if args.results_md:
        begin, end = "<!-- bench_spmm:begin -->", "<!-- bench_spmm:end -->"
        section = "\n".join([begin, "## SpMM (`benchmarks/bench_spmm.py`)", ""] + head
                            + ["", "### Bars (medians; fp32 and warm unless the bar says otherwise)", "", summary, "",
                               f"Every case, the full table and the CSV: `{md_rel}`, `{out_rel}`.", end])
        p = Path(args.results_md)
        text = p.read_text() if p.exists() else "# Benchmark results\n\n"
        if begin in text and end in text:
            text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        p.write_text(text)

    log("")
    log("\n".join(machine))
    log("")
    log("## Bars")
    log(summary)
    log("")
    log(detail)
    log("")
    log(f"CSV: {out}   summary: {md_path}" + (f"   and {args.results_md}" if args.results_md else ""))
    log(f"wall time {wall_s / 60:.1f} min")
    log("")
    log(table)


# ------------------------------------------------------------------------------------------------
# CLI

def parse_list(text: str, conv) -> list:
    return [conv(t) for t in text.split(",") if t.strip()]


def parse_shape(text: str) -> Tuple[int, int]:
    m, k = text.lower().split("x")
    return int(m), int(k)


def main(argv: Optional[Sequence[str]] = None) -> None:
    host = socket.gethostname() or "dev"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3072x768, sparsities 0.7,0.9 (+ 90%% blocks), n 1,32 "
                        "(explicit --shapes/--sparsities/--ns still win)")
    p.add_argument("--shapes", default=None, help="MxK list, default " + ",".join(fmt_shape(*s) for s in SPEC_SHAPES))
    p.add_argument("--sparsities", default=None, help="unstructured sparsities, default "
                   + ",".join(map(str, SPEC_SPARSITIES)) + " ('' for none)")
    p.add_argument("--block-sparsities", default=None, help="32x32 block sparsities (prune.blocks), default "
                   + ",".join(map(str, SPEC_BLOCK_SPARSITIES)) + " ('' for none)")
    p.add_argument("--ns", default=None, help="columns of X, default " + ",".join(map(str, SPEC_NS)))
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32,bf16")
    p.add_argument("--modes", default="warm,cold", help="warm,cold")
    p.add_argument("--min-run-time", type=float, default=0.15, help="seconds per blocked_autorange (default 0.15)")
    p.add_argument("--max-call-s", type=float, default=0.5,
                   help="a call slower than this is timed once after one warm-up (default 0.5)")
    p.add_argument("--cold-mb", type=float, default=64.0, help="cold rotation exceeds this many MB (default 64)")
    p.add_argument("--csr-index", choices=sorted(CSR_INDEX), default="auto",
                   help="index dtypes of our CSR: auto = the library default (int32 row pointers, int16 column "
                        "indices when K <= 32768), int16 or int32 (peers always get int32)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-time a measurement up to this many times while other processes take more than "
                        "--noise of the CPUs (default 2)")
    p.add_argument("--noise", type=float, default=0.1,
                   help="share of all CPUs' time other processes may take during a measurement (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="CSV path (the .md summary is written next to it); default "
                        "benchmarks/results/<hostname>/spmm.csv, or spmm_quick.csv with --quick")
    p.add_argument("--results-md", default=None,
                   help="also write the summary into this file's bench_spmm section (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(HERE / "results" / host / ("spmm_quick.csv" if args.quick else "spmm.csv"))

    args.shapes = parse_list(args.shapes, parse_shape) if args.shapes is not None else (
        [(3072, 768)] if args.quick else list(SPEC_SHAPES))
    args.sparsities = parse_list(args.sparsities, float) if args.sparsities is not None else (
        [0.7, 0.9] if args.quick else list(SPEC_SPARSITIES))
    args.block_sparsities = parse_list(args.block_sparsities, float) if args.block_sparsities is not None \
        else list(SPEC_BLOCK_SPARSITIES)
    args.ns = parse_list(args.ns, int) if args.ns is not None else ([1, 32] if args.quick else list(SPEC_NS))
    args.dtypes = parse_list(args.dtypes, str)
    args.modes = parse_list(args.modes, str)
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown {d!r} (choose from {', '.join(DTYPES)})")
    for m in args.modes:
        if m not in ("warm", "cold"):
            p.error(f"--modes: unknown {m!r} (choose from warm, cold)")
    for M, K in args.shapes:
        if args.block_sparsities and (M % BLOCK[0] or K % BLOCK[1]):
            p.error(f"--shapes: {M}x{K} is not divisible by the 32x32 block (pass --block-sparsities '')")
    if not args.shapes or not args.ns or not (args.sparsities or args.block_sparsities):
        p.error("nothing to run: need at least one shape, one n and one sparsity")

    def log(msg: str) -> None:
        print(msg, flush=True)

    cfg = Config(min_run_time=args.min_run_time, max_call_s=args.max_call_s,
                 cold_bytes=int(args.cold_mb * 1e6), threads=torch.get_num_threads(),
                 retries=args.retries, noise=args.noise)
    command = "PYTHONPATH=. .venv/bin/python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    log(f"bench_spmm: {command}")
    log(f"torch {torch.__version__}, threads {cfg.threads}, pysparse ISA {pysparse.info()['cpu_isa_selected']}")
    load = cpu_busy_fraction()
    if load is not None and load > 0.1:
        log(f"WARNING: the CPUs were {load:.0%} busy (other processes or VM steal) just before the run. "
            f"A descheduled OpenMP thread costs whole scheduler ticks (ms): expect noisy numbers.")
    log("measuring ceilings (fp32 FMA peak, torch.mm 4096^3, 1 GiB copy, 1 GiB sum) ...")
    ceil = measure_ceilings(cfg)
    log(f"  peak fp32 {ceil['peak_fp32_gflop_per_s']:.1f} GFLOP/s, copy {ceil['copy_gb_per_s']:.1f} GB/s, "
        f"read {ceil['read_gb_per_s']:.1f} GB/s")
    read_samples = [Timing(ceil["read_gb_per_s"], ceil["others_cpu_frac"])]
    rows = run_sweep(args, cfg, log, read_samples)
    log("measuring ceilings again (a large change means the machine was busy during the run) ...")
    ceil_end = measure_ceilings(cfg)
    log(f"  peak fp32 {ceil_end['peak_fp32_gflop_per_s']:.1f} GFLOP/s, copy {ceil_end['copy_gb_per_s']:.1f} GB/s, "
        f"read {ceil_end['read_gb_per_s']:.1f} GB/s")
    read_samples.append(Timing(ceil_end["read_gb_per_s"], ceil_end["others_cpu_frac"]))
    # Contention only lowers torch.mm and copy rates: take the higher of the two. The read bandwidth
    # drifts both ways on a shared host, so the fractions use the median of all its samples.
    used = {"peak_fp32_gflop_per_s": max(ceil["peak_fp32_gflop_per_s"], ceil_end["peak_fp32_gflop_per_s"]),
            "copy_gb_per_s": max(ceil["copy_gb_per_s"], ceil_end["copy_gb_per_s"]),
            "read_gb_per_s": statistics.median(t.us for t in read_samples)}
    for r in rows:
        r.update(used)
        r["roofline_flop_frac"] = r["gflop_per_s"] / used["peak_fp32_gflop_per_s"]
        r["roofline_bw_frac"] = r["gb_per_s"] / used["read_gb_per_s"]
    write_outputs(args, rows, ceil, ceil_end, used, read_samples, load, cfg, command, time.perf_counter() - t0, log)


if __name__ == "__main__":
    main()
