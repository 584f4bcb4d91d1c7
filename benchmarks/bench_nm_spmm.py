"""2:4 (N:M) sparse x dense on CPU: pysparse's nm_spmm against dense torch and our own CSR of the
same matrix, side by side in one run; plus compression throughput.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_nm_spmm.py            # full sweep (~4 min)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_nm_spmm.py --quick

Y = A @ X, A (M, K) pruned 2:4 by magnitude, X (K, n) row-major. The sides of a row (ours, our
CSR, dense fp32, dense in the row's dtype) run in alternating rounds (pysparse.bench.alternating:
the median of --rounds rounds, each the median of --reps calls), at torch.get_num_threads()
threads. warm: the same operand each call; cold: the call rotates through
copies of the operand totalling > 64 MB (weights stream from the L3 or DRAM). Results: CSV and
markdown under benchmarks/results/<host>/nm_spmm.{csv,md} (--out names another stem); the bars of
the 2:4 issue are checked at the end.
"""
from __future__ import annotations

import argparse
import csv
import socket
import time
from pathlib import Path

import torch

import pysparse
from pysparse.bench import alternating, median_us, rotating

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="3072x768,4096x4096,11008x4096")
    ap.add_argument("--ns", default="1,8,32,128,512")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--out", default="", help="file stem under results/<host>/ (default nm_spmm)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per row (median of the rounds)")
    ap.add_argument("--reps", type=int, default=7, help="calls per round (median of the calls)")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.ns, args.dtypes = "3072x768", "1,32", "fp32,bf16"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ns = [int(v) for v in args.ns.split(",")]
    dtypes = args.dtypes.split(",")
    out_dir = Path(__file__).parent / "results" / socket.gethostname()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("nm_spmm_quick" if args.quick else "nm_spmm")
    info = pysparse.info()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, pysparse ISA {info['cpu_isa_selected']}", flush=True)

    rows, compress = [], []
    t_start = time.time()
    for M, K in shapes:
        torch.manual_seed(0)
        W32 = pysparse.prune.nm(torch.randn(M, K), 2, 4)
        # compression throughput: dense fp32 in, GB/s of dense input
        pysparse.Sparse24.from_dense(W32)  # warm-up (page faults of the outputs)
        t_c = median_us(lambda: pysparse.Sparse24.from_dense(W32), 0.15)
        compress.append((f"{M}x{K}", t_c, W32.numel() * 4 / t_c / 1e3))
        print(f"{M}x{K} compress fp32: {t_c:.0f} us = {compress[-1][2]:.2f} GB/s of dense input", flush=True)
        for dname in dtypes:
            dt = DT[dname]
            W = W32.to(dt)
            A = pysparse.Sparse24.from_dense(W)
            C = pysparse.CSR.from_dense(W)
            a_bytes = A.values.numel() * A.values.element_size() + A.mask.numel()
            for n in ns:
                X = torch.randn(K, n).to(dt)
                X32 = X.float()
                ref = W.double() @ X.double()
                got = pysparse.spmm(A, X).double()
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < (1e-5 if dt == torch.float32 else 1e-2), f"2:4 result off: {err}"
                for mode in (("warm", "cold") if n <= 32 else ("warm",)):
                    cold = mode == "cold"
                    gA = rotating(lambda: pysparse.SparseNM(A.values.clone(), A.mask.clone(), A.shape, check=False), a_bytes, cold)
                    gC = rotating(lambda: pysparse.CSR(C.crow_indices.clone(), C.col_indices.clone(), C.values.clone(), C.shape, check=False),
                                  C.values.numel() * (C.values.element_size() + 2), cold)
                    gW32 = rotating(lambda: W32.clone(), W32.numel() * 4, cold)
                    gW = rotating(lambda: W.clone(), W.numel() * W.element_size(), cold) if dt != torch.float32 else gW32
                    # Alternating rounds: the host's speed moves by up to 1.7x between minutes.
                    sides = [lambda: pysparse.spmm(gA(), X), lambda: pysparse.spmm(gC(), X), lambda: gW32() @ X32]
                    if dt != torch.float32:
                        sides.append(lambda: gW() @ X)
                    times = [t * 1e6 for t in alternating(*sides, rounds=args.rounds, reps=args.reps)]
                    t_ours, t_csr, t_d32 = times[:3]
                    t_dsame = times[3] if dt != torch.float32 else t_d32
                    row = dict(shape=f"{M}x{K}", dtype=dname, mode=mode, n=n, ours_us=round(t_ours, 1),
                               dense_fp32_us=round(t_d32, 1), dense_same_dtype_us=round(t_dsame, 1),
                               our_csr_us=round(t_csr, 1), x_vs_dense_fp32=round(t_d32 / t_ours, 2),
                               x_vs_dense_same_dtype=round(t_dsame / t_ours, 2), x_vs_our_csr=round(t_csr / t_ours, 2),
                               gb_per_s=round((a_bytes + X.numel() * X.element_size()) / t_ours / 1e3, 1),
                               gflop_per_s=round(2 * A.values.numel() * n / t_ours / 1e3, 1))
                    rows.append(row)
                    print(f"{M}x{K} {dname} {mode} n={n:4d}: ours {t_ours:9.1f} us | dense fp32 {t_d32:9.1f} | dense {dname} {t_dsame:9.1f} "
                          f"| our CSR {t_csr:9.1f} | {row['x_vs_dense_fp32']}x dense fp32, {row['x_vs_our_csr']}x CSR", flush=True)

    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def find(shape, dtype, mode, n):
        return next((r for r in rows if r["shape"] == shape and r["dtype"] == dtype and r["mode"] == mode and r["n"] == n), None)

    bars = []
    for M, K in shapes:
        s = f"{M}x{K}"
        for n, mode in ((1, "cold"), (8, "warm"), (32, "warm")):
            r = find(s, "fp32", mode, n)
            if r:
                bars.append((f"fp32 >= 1.3x dense at n={n} ({mode})", s, r["x_vs_dense_fp32"], 1.3))
        worst = min((r for r in rows if r["shape"] == s and r["dtype"] == "fp32"), key=lambda r: r["x_vs_dense_fp32"], default=None)
        if worst:
            bars.append((f"fp32 never slower than dense (worst: n={worst['n']} {worst['mode']})", s, worst["x_vs_dense_fp32"], 1.0))
        for dname in ("bf16", "fp16"):
            r = find(s, dname, "cold", 1)
            if r:
                bars.append((f"{dname} n=1 cold >= 2x dense fp32", s, r["x_vs_dense_fp32"], 2.0))
    for s, t_c, gbs in compress:
        bars.append(("compression >= 1 GB/s of dense fp32 input", s, round(gbs, 2), 1.0))

    lines = [f"# 2:4 SpMM, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t_start:.0f} s",
             "", f"torch {torch.__version__}, {torch.get_num_threads()} threads, pysparse CPU ISA {info['cpu_isa_selected']}", "",
             "| bar | shape | measured | target | result |", "|---|---|---:|---:|---|"]
    lines += [f"| {b} | {s} | {v} | {t} | {'PASS' if v >= t else 'MISS'} |" for b, s, v, t in bars]
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6 + len(bars)]))


if __name__ == "__main__":
    main()
