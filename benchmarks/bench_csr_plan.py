"""The CSR plans against the kernels they replace, torch's dense F.linear and the machine's
ceilings, side by side in one process (issue 18): the JIT code (csr_jit.cpp) against the kernels
it replaces (`--jit-only`), the slice plan against the row-axpy kernel (n = 128..1024 tokens, JIT
off), and the gemv's column bitmap against the gathering gemv (decode, n = 1).

    cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_csr_plan.py [--threads 2] [--jit-only]

csr_linear (x (n, K) @ A^T, A magnitude-pruned from torch.randn, int16 columns as CSR.from_dense
stores them) on BERT-base's and a LLaMA-sized layer's shapes at 80% and 90% sparsity, n = 128,
512 and 1024 tokens. Each row's sides run in alternating rounds (pysparse.bench.alternating): the
plan (the default), the row-axpy kernel (`_C.set_csr_plan(False)`) and dense fp32 F.linear, each
warm (the same weights every call) and cold (a rotation through copies of the weights totalling
more than 64 MiB, as a model's layers are: each call reads its weights from L3/DRAM). Rates are
useful FLOP/s (2 * nnz * n / t) over the fp32 FMA peak measured at the start
(pysparse.bench.roofline). Decode rows (LLaMA-style and BERT-base layer shapes at 60-90%
sparsity, one token): the bitmap (the default), the gathering gemv (plans off) and dense, warm and
cold (a 512 MiB rotation: more than this host's L3); their rate is the bytes each streams (bitmap: 4 B per value + 1 bit per weight; gather:
4 + 2 B per value) over the DRAM read bandwidth measured at the start.
Writes benchmarks/results/csr_plan.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import pysparse
from pysparse import _C
from pysparse.bench import alternating, cold_copies, roofline, rotating

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]
SPARSITIES = [0.8, 0.9]
TOKENS = [128, 512, 1024]
DECODE_SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048), (3072, 768), (768, 3072)]
DECODE_SPARSITIES = [0.6, 0.7, 0.8]  # 80%: no bitmap (both sides gather: the noise floor)
DECODE_COLD_MB = 512  # > this host's 300 MiB L3: a decode reads its weights from DRAM


def _switched_off(setter):
    """A wrapper running fn with the switch `setter` sets off (and back after)."""
    def wrap(fn):
        def run():
            old = setter(False)
            try:
                return fn()
            finally:
                setter(old)
        return run
    return wrap


plans_off = _switched_off(_C.set_csr_plan)  # the row-axpy kernel and the gathering gemv (no plans, no JIT)
jit_off = _switched_off(_C.set_csr_jit)  # the slice plan or the row-axpy kernel instead of the JIT code


def _sides(args, x, A, W, cold_A, cold_W, new, old, old_wrap):
    """Times (s) and useful GFLOP/s of x @ A^T by the default path (`new`), by old_wrap's path
    (`old`) and by dense F.linear, warm and cold (`*_cold`: rotating copies), alternating."""
    sides = {new: lambda: pysparse.linear(x, A), old: old_wrap(lambda: pysparse.linear(x, A)),
             "dense": lambda: F.linear(x, W), f"{new}_cold": lambda: pysparse.linear(x, cold_A()),
             f"{old}_cold": old_wrap(lambda: pysparse.linear(x, cold_A())), "dense_cold": lambda: F.linear(x, cold_W())}
    t = dict(zip(sides, alternating(*sides.values(), rounds=args.rounds, reps=args.reps)))
    flop = 2 * A.values.numel() * x.shape[0]
    return t, {k: flop / v / 1e9 for k, v in t.items()}


JIT_SPARSITIES = [0.8, 0.9, 0.95]


def jit_rows(args, roof, g):
    """The JIT code (the default at >= 128 tokens, >= 75% sparsity) against the kernels it replaces
    (JIT off: the slice plan where its window holds, else the row-axpy) and dense, warm and cold
    (a 64 MiB rotation, every copy's code made before timing)."""
    print("\nJIT code vs the kernels it replaces (JIT off) and dense F.linear")
    print("| layer | sparsity | n | JIT | first call ms (makes the code) | JIT vs kernels, warm | cold | JIT vs dense, warm "
          "| cold | JIT GFLOP/s warm (of peak) | kernels GFLOP/s warm (of peak) |")
    print("|---|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for (M, K), s, n in ((shape, s, n) for shape in SHAPES[:3] for s in JIT_SPARSITIES for n in TOKENS):
        W = pysparse.prune.magnitude(torch.randn(M, K, generator=g), s)
        A = pysparse.CSR.from_dense(W)
        x = torch.randn(n, K, generator=g)
        nbytes = A.values.numel() * 20  # values + indices + ~14 B of code per nonzero
        cold_A = rotating(lambda: pysparse.CSR.from_dense(W), nbytes, cold=True)
        cold_W = rotating(lambda: W.clone(), W.numel() * 4, cold=True)
        made = _C.csr_plans_made()
        torch.testing.assert_close(pysparse.linear(x, A), F.linear(x, W), rtol=1e-4, atol=1e-3)
        jitted = _C.csr_plans_made() > made
        t0 = time.perf_counter()
        copies = cold_copies(nbytes, 64 << 20)
        for _ in range(copies):
            pysparse.linear(x, cold_A())
        for _ in range(copies):  # the kernels' own plans too
            jit_off(lambda: pysparse.linear(x, cold_A()))()
        first_ms = (time.perf_counter() - t0) / copies * 1e3
        t, rate = _sides(args, x, A, W, cold_A, cold_W, "jit", "kernels", jit_off)
        rows.append(dict(M=M, K=K, sparsity=s, n=n, jit=jitted, peak_gflops=roof.fp32_gflops, first_call_ms=first_ms,
                         **{f"{k}_ms": v * 1e3 for k, v in t.items()}, **{f"{k}_gflops": v for k, v in rate.items()}))
        print(f"| {M}x{K} | {s:.0%} | {n} | {'yes' if jitted else 'no'} | {first_ms:.2f} "
              f"| {t['kernels'] / t['jit']:.2f}x | {t['kernels_cold'] / t['jit_cold']:.2f}x "
              f"| {t['dense'] / t['jit']:.2f}x | {t['dense_cold'] / t['jit_cold']:.2f}x "
              f"| {rate['jit']:.0f} ({roof.fraction(rate['jit']):.0%}) "
              f"| {rate['kernels']:.0f} ({roof.fraction(rate['kernels']):.0%}) |", flush=True)
    return rows


def token_rows(args, g):
    """A few tokens (batched decoding) through the bitmap against the row-axpy kernel (plans off),
    weights cold (a 512 MiB rotation), one process, alternating."""
    print("\nA few tokens, 70% sparsity, weights cold: bitmap vs the row-axpy kernel (plans off)")
    print("| layer | n | bitmap | bitmap us | row-axpy us | bitmap vs row-axpy | vs its own n = 1 |")
    print("|---|---:|:-:|---:|---:|---:|---:|")
    rows = []
    for M, K in ((2048, 2048), (768, 3072), (5632, 2048)):
        W = pysparse.prune.magnitude(torch.randn(M, K, generator=g), 0.7)
        A = pysparse.CSR.from_dense(W)
        cold_A = rotating(lambda: pysparse.CSR.from_dense(W), A.values.numel() * 6, cold=True, mb=DECODE_COLD_MB)
        ns = [1, 2, 3, 4]
        xs = {n: torch.randn(n, K, generator=g) for n in ns}
        used = {}
        for _ in range(cold_copies(A.values.numel() * 6, DECODE_COLD_MB << 20)):
            Ai = cold_A()
            for n in ns:
                made = _C.csr_plans_made()
                pysparse.linear(xs[n], Ai)
                used[n] = used.get(n, False) or _C.csr_plans_made() > made
        for n in ns:  # whether n takes the bitmap: a fresh pattern's first product says
            made = _C.csr_plans_made()
            pysparse.linear(xs[n], pysparse.CSR.from_dense(W))
            used[n] = _C.csr_plans_made() > made
        sides = []
        for n in ns:
            sides += [lambda n=n: pysparse.linear(xs[n], cold_A()), plans_off(lambda n=n: pysparse.linear(xs[n], cold_A()))]
        t = alternating(*sides, rounds=args.rounds, reps=4 * args.reps)
        for i, n in enumerate(ns):
            rows.append(dict(M=M, K=K, n=n, bitmap=used[n], bitmap_ms=t[2 * i] * 1e3, axpy_ms=t[2 * i + 1] * 1e3))
            print(f"| {M}x{K} | {n} | {'yes' if used[n] else 'no'} | {t[2 * i] * 1e6:.0f} | {t[2 * i + 1] * 1e6:.0f} "
                  f"| {t[2 * i + 1] / t[2 * i]:.2f}x | {t[2 * i] / t[0]:.2f}x |", flush=True)
    return rows


def decode_rows(args, roof, g):
    """The column bitmap against the gathering gemv and dense, at one token."""
    dram = roof.read_gbps.get("DRAM", float("nan"))
    print(f"\nDecode (n = 1); DRAM read {dram:.1f} GB/s on {args.threads} threads")
    print("| layer | sparsity | bitmap | default vs gather, warm | cold | default vs dense, warm | cold "
          "| default GB/s cold (of DRAM) | gather GB/s cold |")
    print("|---|---:|:-:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for (M, K), s in ((shape, s) for shape in DECODE_SHAPES for s in DECODE_SPARSITIES):
        W = pysparse.prune.magnitude(torch.randn(M, K, generator=g), s)
        A = pysparse.CSR.from_dense(W)
        x = torch.randn(1, K, generator=g)
        nnz = A.values.numel()
        bitmap_bytes, gather_bytes = nnz * 4 + M * K / 8, nnz * 6
        cold_A = rotating(lambda: pysparse.CSR.from_dense(W), gather_bytes, cold=True, mb=DECODE_COLD_MB)
        cold_W = rotating(lambda: W.clone(), W.numel() * 4, cold=True, mb=DECODE_COLD_MB)
        made = _C.csr_plans_made()
        torch.testing.assert_close(pysparse.linear(x, A), F.linear(x, W), rtol=1e-4, atol=1e-3)
        bitmapped = _C.csr_plans_made() > made
        for _ in range(cold_copies(gather_bytes, DECODE_COLD_MB << 20)):  # every copy's bitmap made first
            pysparse.linear(x, cold_A())
        sides = dict(bitmap=lambda: pysparse.linear(x, A), gather=plans_off(lambda: pysparse.linear(x, A)),
                     dense=lambda: F.linear(x, W), bitmap_cold=lambda: pysparse.linear(x, cold_A()),
                     gather_cold=plans_off(lambda: pysparse.linear(x, cold_A())),
                     dense_cold=lambda: F.linear(x, cold_W()))
        t = dict(zip(sides, alternating(*sides.values(), rounds=args.rounds, reps=4 * args.reps)))
        # what the default side streams: the bitmap's bytes where it has one, else the gather's
        gbps = dict(bitmap=(bitmap_bytes if bitmapped else gather_bytes) / t["bitmap_cold"] / 1e9,
                    gather=gather_bytes / t["gather_cold"] / 1e9)
        rows.append(dict(M=M, K=K, sparsity=s, n=1, bitmap=bitmapped, dram_gbps=dram,
                         **{f"{k}_ms": v * 1e3 for k, v in t.items()}, **{f"{k}_cold_gbps": v for k, v in gbps.items()}))
        print(f"| {M}x{K} | {s:.0%} | {'yes' if bitmapped else 'no'} | {t['gather'] / t['bitmap']:.2f}x "
              f"| {t['gather_cold'] / t['bitmap_cold']:.2f}x | {t['dense'] / t['bitmap']:.2f}x "
              f"| {t['dense_cold'] / t['bitmap_cold']:.2f}x | {gbps['bitmap']:.1f} ({gbps['bitmap'] / dram:.0%}) "
              f"| {gbps['gather']:.1f} |", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-only", action="store_true", help="only the decode rows (n = 1, then 1-4 tokens)")
    ap.add_argument("--tokens-only", action="store_true", help="only the rows of 1-4 tokens")
    ap.add_argument("--jit-only", action="store_true", help="only the JIT rows (written to csr_jit.json)")
    ap.add_argument("--plan-only", action="store_true", help="only the slice-plan rows (n = 128..1024)")
    ap.add_argument("--shapes", default=",".join(f"{m}x{k}" for m, k in SHAPES), help="slice-plan layers, MxK,...")
    ap.add_argument("--sparsities", default=",".join(str(v) for v in SPARSITIES), help="slice-plan sparsities")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "csr_plan.json"))
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in t.split("x")) for t in args.shapes.split(",")]
    sparsities = [float(v) for v in args.sparsities.split(",")]
    torch.set_num_threads(args.threads)
    roof = roofline(args.threads)
    print(f"{args.threads} threads; fp32 FMA peak {roof.fp32_gflops:.0f} GFLOP/s", flush=True)
    g = torch.Generator().manual_seed(0)
    if args.jit_only:
        rows = jit_rows(args, roof, g)
        path = os.path.join(os.path.dirname(args.json), "csr_jit.json")
        with open(path, "w") as f:
            json.dump(dict(threads=args.threads, fp32_peak_gflops=roof.fp32_gflops, roofline=roof.as_dict(), rows=rows),
                      f, indent=1)
        return 0
    _C.set_csr_jit(False)  # the rows below measure the plans the JIT code would replace
    rows = []
    print("| layer | sparsity | n | first call ms (makes the plan) | later calls, cold | plan vs row-axpy, warm | cold "
          "| plan vs dense, warm | cold | plan GFLOP/s warm (of peak) | cold | row-axpy GFLOP/s warm (of peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (M, K), s, n in ((shape, s, n) for shape in shapes for s in sparsities for n in TOKENS
                         if not (args.decode_only or args.tokens_only)):
        W = pysparse.prune.magnitude(torch.randn(M, K, generator=g), s)
        A = pysparse.CSR.from_dense(W)
        x = torch.randn(n, K, generator=g)
        nbytes = A.values.numel() * 6
        cold_A = rotating(lambda: pysparse.CSR.from_dense(W), nbytes, cold=True)
        cold_W = rotating(lambda: W.clone(), W.numel() * 4, cold=True)

        axpy = plans_off
        made = _C.csr_plans_made()
        torch.testing.assert_close(pysparse.linear(x, A), F.linear(x, W), rtol=1e-4, atol=1e-3)
        planned = _C.csr_plans_made() > made
        # Every copy's plan is made before timing (a model's layers keep theirs from call to call).
        t0 = time.perf_counter()
        for _ in range(cold_copies(nbytes, 64 << 20)):
            pysparse.linear(x, cold_A())
        first_ms = (time.perf_counter() - t0) / cold_copies(nbytes, 64 << 20) * 1e3
        t, rate = _sides(args, x, A, W, cold_A, cold_W, "plan", "axpy", axpy)
        row = dict(M=M, K=K, sparsity=s, n=n, planned=planned, peak_gflops=roof.fp32_gflops, first_call_ms=first_ms,
                   **{f"{k}_ms": v * 1e3 for k, v in t.items()}, **{f"{k}_gflops": v for k, v in rate.items()})
        rows.append(row)
        print(f"| {M}x{K} | {s:.0%} | {n}{'' if planned else ' (no plan)'} | {first_ms:.2f} | {t['plan_cold'] * 1e3:.3f} "
              f"| {t['axpy'] / t['plan']:.2f}x "
              f"| {t['axpy_cold'] / t['plan_cold']:.2f}x | {t['dense'] / t['plan']:.2f}x "
              f"| {t['dense_cold'] / t['plan_cold']:.2f}x | {rate['plan']:.0f} ({roof.fraction(rate['plan']):.0%}) "
              f"| {rate['plan_cold']:.0f} ({roof.fraction(rate['plan_cold']):.0%}) "
              f"| {rate['axpy']:.0f} ({roof.fraction(rate['axpy']):.0%}) |", flush=True)
    decode = decode_rows(args, roof, g) if not (args.tokens_only or args.plan_only) else []
    tokens = token_rows(args, g) if not args.plan_only else []
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(threads=args.threads, fp32_peak_gflops=roof.fp32_gflops, roofline=roof.as_dict(), rows=rows,
                       decode=decode, tokens=tokens), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
