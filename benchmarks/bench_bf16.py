"""bf16: pysparse's CSR (90%) and 2:4 linear against torch's bf16 dense linear, the competitor a
bf16 user has (oneDNN: AMX-BF16 tiles where the CPU has them, else AVX512-BF16), at n = 32..512
tokens on BERT-base and LLaMA-sized layers. Side by side in alternating rounds; rates as useful
GFLOP/s (the dense FLOPs for dense, 2 nnz n for the sparse kernels) and as fractions of the
measured fp32 FMA peak (pysparse.bench.roofline: our kernels widen bf16 and accumulate in fp32).

    python benchmarks/bench_bf16.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the pysparse package is at the root

import pysparse  # noqa: E402  (after the path line above)
from pysparse.bench import alternating, roofline  # noqa: E402

SHAPES = [(3072, 768), (768, 3072), (4096, 4096)]
TOKENS = [32, 128, 512]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bf16.json"))
    args = ap.parse_args()
    rf = roofline()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads | FMA peak fp32 {rf.fp32_gflops:.0f} GFLOP/s, vdpbf16ps "
          f"{rf.bf16_dot_gflops:.0f} GFLOP/s | torch {torch.__version__}\n")
    print("| layer (out x in) | n | torch bf16 dense ms | CSR 90% ms | vs dense | 2:4 ms | vs dense | "
          "dense GFLOP/s | CSR 90% GFLOP/s (of FMA peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    with torch.inference_mode():
        for M, K in SHAPES:
            w = torch.randn(M, K)
            w90 = w * (torch.rand(M, K) >= 0.9)
            csr = pysparse.CSR.from_dense(w90.bfloat16())
            nm = pysparse.SparseNM.from_dense(w.bfloat16(), 2, 4, prune=True)
            dense = w.bfloat16()
            for n in TOKENS:
                x = torch.randn(n, K).bfloat16()
                td, tc = alternating(lambda: torch.nn.functional.linear(x, dense),
                                     lambda: pysparse.linear(x, csr), rounds=5, reps=7)
                td2, tn = alternating(lambda: torch.nn.functional.linear(x, dense),
                                      lambda: pysparse.linear(x, nm), rounds=5, reps=7)
                tn *= td / td2  # on the scale of the CSR pair's dense time
                fl_dense = 2 * M * K * n
                fl_csr = 2 * csr.nnz * n
                r = {"M": M, "K": K, "n": n, "dense_s": td, "csr90_s": tc, "nm24_s": tn,
                     "dense_gflops": fl_dense / td / 1e9, "csr90_gflops": fl_csr / tc / 1e9}
                rows.append(r)
                print(f"| {M}x{K} | {n} | {td * 1e3:.3f} | {tc * 1e3:.3f} | {td / tc:.2f}x | "
                      f"{tn * 1e3:.3f} | {td / tn:.2f}x | {r['dense_gflops']:.0f} | {r['csr90_gflops']:.0f} ({rf.fraction(r['csr90_gflops'], 'bf16'):.0%}) |",
                      flush=True)
    Path(args.json).write_text(json.dumps({"roofline": rf.as_dict(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
