"""The CSR slice plan against the row-axpy kernel it replaces, torch's dense F.linear and the FMA
peak, side by side in one process (issue 18).

    cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/bench_csr_plan.py [--threads 2]

csr_linear (x (n, K) @ A^T, A magnitude-pruned from torch.randn, int16 columns as CSR.from_dense
stores them) on BERT-base's and a LLaMA-sized layer's shapes at 80% and 90% sparsity, n = 128,
512 and 1024 tokens. Each row's three sides run in alternating rounds (pysparse.bench.alternating):
the plan (the default), the row-axpy kernel (`_C.set_csr_plan(False)`), and dense fp32 F.linear.
Rates are useful FLOP/s (2 * nnz * n / t) over the fp32 FMA peak measured at the start
(pysparse.bench.roofline). Writes benchmarks/results/csr_plan.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import pysparse
from pysparse import _C
from pysparse.bench import alternating, roofline

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
    print("| layer | sparsity | n | plan ms | row-axpy ms | plan vs row-axpy | dense ms | plan vs dense "
          "| plan GFLOP/s (of peak) | row-axpy GFLOP/s (of peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (M, K), s, n in ((shape, s, n) for shape in SHAPES for s in SPARSITIES for n in TOKENS):
        W = pysparse.prune.magnitude(torch.randn(M, K, generator=g), s)
        A = pysparse.CSR.from_dense(W)
        x = torch.randn(n, K, generator=g)

        def sparse():
            return pysparse.linear(x, A)

        def axpy():
            old = _C.set_csr_plan(False)
            try:
                return pysparse.linear(x, A)
            finally:
                _C.set_csr_plan(old)

        made = _C.csr_plans_made()
        torch.testing.assert_close(sparse(), F.linear(x, W), rtol=1e-4, atol=1e-3)
        planned = _C.csr_plans_made() > made
        t_plan, t_axpy, t_dense = alternating(sparse, axpy, lambda: F.linear(x, W),
                                              rounds=args.rounds, reps=args.reps)
        flop = 2 * A.values.numel() * n
        gp, ga = flop / t_plan / 1e9, flop / t_axpy / 1e9
        row = dict(M=M, K=K, sparsity=s, n=n, planned=planned, plan_ms=t_plan * 1e3, axpy_ms=t_axpy * 1e3,
                   dense_ms=t_dense * 1e3, plan_gflops=gp, axpy_gflops=ga, peak_gflops=roof.fp32_gflops)
        rows.append(row)
        print(f"| {M}x{K} | {s:.0%} | {n} | {t_plan * 1e3:.3f}{'' if planned else ' (no plan)'} | {t_axpy * 1e3:.3f} "
              f"| {t_axpy / t_plan:.2f}x | {t_dense * 1e3:.3f} | {t_dense / t_plan:.2f}x "
              f"| {gp:.0f} ({roof.fraction(gp):.0%}) | {ga:.0f} ({roof.fraction(ga):.0%}) |", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(threads=args.threads, fp32_peak_gflops=roof.fp32_gflops, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
