"""Training step of one layer: SparseLinear (CSR, pattern fixed, values trained) forward +
backward (input, value and bias gradients) against nn.Linear's forward + backward (dense
training, what masked fine-tuning runs), side by side in alternating rounds, 2 threads, fp32.
Two SparseLinear columns: train_kernel="sparse" (the sparse ops forward and backward) and
"auto" (the default: the faster of that and the dense fall-back, timed once per token count).

    python benchmarks/bench_backward.py [--json PATH]
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
from pysparse.bench import alternating  # noqa: E402
from pysparse.nn import kernel_choice  # noqa: E402

SHAPES = [(3072, 768), (4096, 4096)]
TOKENS = [128, 512, 2048]
SPARSITIES = [0.9, 0.7]


def step_of(layer, x, g):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "backward.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, fp32; forward + backward per call (input, weight/value and "
          f"bias gradients)\n")
    print("| layer (out x in) | sparsity | n | nn.Linear ms | sparse kernels ms | speedup | auto: chose | auto ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    rows = []
    for M, K in SHAPES:
        dense = torch.nn.Linear(K, M)
        for sp in SPARSITIES:
            sparse = pysparse.nn.SparseLinear.from_linear(dense, "csr", sparsity=sp)
            sparse.train_kernel = "sparse"
            auto = pysparse.nn.SparseLinear.from_linear(dense, "csr", sparsity=sp)
            for n in TOKENS:
                x = torch.randn(n, K, requires_grad=True)
                g = torch.randn(n, M)
                step_of(auto, x, g)()  # auto's one-time timing, outside the measurement
                chose = auto._train_choice[kernel_choice.bucket(n)]
                reps = 3 if M * K * n > 4096 * 4096 * 512 else 5
                td, ts = alternating(step_of(dense, x, g), step_of(sparse, x, g), rounds=5, reps=reps)
                td2, ta = alternating(step_of(dense, x, g), step_of(auto, x, g), rounds=5, reps=reps)
                ta *= td / td2  # on the scale of the first pair's dense time
                rows.append({"M": M, "K": K, "sparsity": sp, "n": n, "dense_s": td, "sparse_s": ts,
                             "auto_choice": chose, "auto_s": ta})
                print(f"| {M}x{K} | {sp:.0%} | {n} | {td * 1e3:.2f} | {ts * 1e3:.2f} | {td / ts:.2f}x | {chose} | "
                      f"{ta * 1e3:.2f} | {td / ta:.2f}x |", flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
