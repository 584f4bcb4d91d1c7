"""GPU timings for benchmarks/gpu_check.sh: each GPU path of pysparse against its peers, bf16,
medians of triton.testing.do_bench (CUDA events), correctness checked first. Prints one table
last. Never run on a machine without CUDA (it exits)."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("gpu_bench.py needs a CUDA GPU")

import triton

import pysparse
from pysparse import _triton

torch.manual_seed(0)
dev = "cuda"
rows = []


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def cusparselt(W):
    """torch's 2:4 path (cuSPARSELt on sm90) or None where torch refuses."""
    try:
        from torch.sparse import to_sparse_semi_structured, SparseSemiStructuredTensor
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        return to_sparse_semi_structured(W)
    except Exception as e:  # noqa: BLE001 - report, do not fail the table
        print("cuSPARSELt unavailable:", type(e).__name__, str(e).splitlines()[0])
        return None


# 2:4 linear: y = x @ W^T, bf16, decode to prefill token counts.
for R, K in ((4096, 4096), (11008, 4096)):
    W = pysparse.prune.nm(torch.randn(R, K, device=dev), 2, 4).to(torch.bfloat16)
    A = pysparse.Sparse24.from_dense(W.cpu()).to(dev)
    Ws = cusparselt(W)
    for T in (1, 2, 4, 8, 16, 32, 64, 128, 1024, 4096):
        x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ W.float().T
        y = pysparse.linear(x, A)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"pysparse 2:4 linear off: {err} at {R}x{K} T={T}"
        t_dense = bench(lambda: F.linear(x, W))
        t_ours = bench(lambda: pysparse.linear(x, A))
        t_cslt = None
        if Ws is not None:
            try:
                t_cslt = bench(lambda: F.linear(x, Ws))
            except Exception as e:  # noqa: BLE001
                print(f"cuSPARSELt F.linear failed at T={T}: {type(e).__name__}")
        bytes_moved = A.values.numel() * 2 + A.mask.numel() + x.numel() * 2 + R * T * 2
        rows.append((f"{R}x{K}", T, t_ours, t_dense, t_cslt, bytes_moved / t_ours / 1e3))

print("\n| W (bf16, 2:4) | tokens | pysparse Triton us | cuBLAS dense us | cuSPARSELt us | x vs dense | x vs cuSPARSELt | GB/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for shape, T, t_ours, t_dense, t_cslt, gbs in rows:
    c = f"{t_cslt:.1f}" if t_cslt else "n/a"
    xc = f"{t_cslt / t_ours:.2f}" if t_cslt else "n/a"
    print(f"| {shape} | {T} | {t_ours:.1f} | {t_dense:.1f} | {c} | {t_dense / t_ours:.2f} | {xc} | {gbs:.0f} |")
