"""The CSR slice plan against the row-axpy kernel it replaces, torch's dense F.linear and the FMA
peak, side by side in one process (issue 18).

    cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_csr_plan.py [--threads 2]

csr_linear (x (n, K) @ A^T, A magnitude-pruned from torch.randn, int16 columns as CSR.from_dense
stores them) on BERT-base's and a LLaMA-sized layer's shapes at 80% and 90% sparsity, n = 128,
512 and 1024 tokens. Each row's sides run in alternating rounds (pysparse.bench.alternating): the
plan (the default), the row-axpy kernel (`_C.set_csr_plan(False)`) and dense fp32 F.linear, each
warm (the same weights every call) and cold (a rotation through copies of the weights totalling
more than 64 MiB, as a model's layers are: each call reads its weights from L3/DRAM). Rates are
useful FLOP/s (2 * nnz * n / t) over the fp32 FMA peak measured at the start
(pysparse.bench.roofline). Writes benchmarks/results/csr_plan.json.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "csr_plan.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    roof = roofline(args.threads)
    print(f"{args.threads} threads; fp32 FMA peak {roof.fp32_gflops:.0f} GFLOP/s", flush=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    print("| layer | sparsity | n | first call ms (makes the plan) | later calls, cold | plan vs row-axpy, warm | cold "
          "| plan vs dense, warm | cold | plan GFLOP/s warm (of peak) | cold | row-axpy GFLOP/s warm (of peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (M, K), s, n in ((shape, s, n) for shape in SHAPES for s in SPARSITIES for n in TOKENS):
        W = pysparse.prune.magnitude(torch.randn(M, K, generator=g), s)
        A = pysparse.CSR.from_dense(W)
        x = torch.randn(n, K, generator=g)
        nbytes = A.values.numel() * 6
        cold_A = rotating(lambda: pysparse.CSR.from_dense(W), nbytes, cold=True)
        cold_W = rotating(lambda: W.clone(), W.numel() * 4, cold=True)

        def axpy(fn):
            def run():
                old = _C.set_csr_plan(False)
                try:
                    return fn()
                finally:
                    _C.set_csr_plan(old)
            return run

        made = _C.csr_plans_made()
        torch.testing.assert_close(pysparse.linear(x, A), F.linear(x, W), rtol=1e-4, atol=1e-3)
        planned = _C.csr_plans_made() > made
        # Every copy's plan is made before timing (a model's layers keep theirs from call to call).
        t0 = time.perf_counter()
        for _ in range(cold_copies(nbytes, 64 << 20)):
            pysparse.linear(x, cold_A())
        first_ms = (time.perf_counter() - t0) / cold_copies(nbytes, 64 << 20) * 1e3
        sides = dict(plan=lambda: pysparse.linear(x, A), axpy=axpy(lambda: pysparse.linear(x, A)),
                     dense=lambda: F.linear(x, W), plan_cold=lambda: pysparse.linear(x, cold_A()),
                     axpy_cold=axpy(lambda: pysparse.linear(x, cold_A())), dense_cold=lambda: F.linear(x, cold_W()))
        t = dict(zip(sides, alternating(*sides.values(), rounds=args.rounds, reps=args.reps)))
        flop = 2 * A.values.numel() * n
        rate = {k: flop / v / 1e9 for k, v in t.items()}
        row = dict(M=M, K=K, sparsity=s, n=n, planned=planned, peak_gflops=roof.fp32_gflops, first_call_ms=first_ms,
                   **{f"{k}_ms": v * 1e3 for k, v in t.items()}, **{f"{k}_gflops": v for k, v in rate.items()})
        rows.append(row)
        print(f"| {M}x{K} | {s:.0%} | {n}{'' if planned else ' (no plan)'} | {first_ms:.2f} | {t['plan_cold'] * 1e3:.3f} "
              f"| {t['axpy'] / t['plan']:.2f}x "
              f"| {t['axpy_cold'] / t['plan_cold']:.2f}x | {t['dense'] / t['plan']:.2f}x "
              f"| {t['dense_cold'] / t['plan_cold']:.2f}x | {rate['plan']:.0f} ({roof.fraction(rate['plan']):.0%}) "
              f"| {rate['plan_cold']:.0f} ({roof.fraction(rate['plan_cold']):.0%}) "
              f"| {rate['axpy']:.0f} ({roof.fraction(rate['axpy']):.0%}) |", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(threads=args.threads, fp32_peak_gflops=roof.fp32_gflops, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
