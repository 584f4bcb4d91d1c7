"""Training step of one layer: SparseLinear (pattern fixed, values trained) forward + backward
(input, value and bias gradients) against nn.Linear's forward + backward (dense training) and
masked dense training (torch.nn.utils.prune's way: the weight times its mask in every forward),
side by side in alternating rounds, 2 threads, fp32. Two SparseLinear columns per format:
train_kernel="sparse" (the sparse ops forward and backward) and "auto" (the default: the faster
of that and the dense fall-back, timed once per token count). Then masked_attention forward +
backward against SDPA's, and the peak memory of training steps with Adam (parameters, gradients, optimizer state, the step's temporaries), each layer in a
fresh process.

    python benchmarks/bench_backward.py [--json PATH] [--formats csr,bsr,nm] [--no-attention] [--no-memory]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the pysparse package is at the root

import pysparse  # noqa: E402  (after the path line above)
from pysparse import _attention_grad  # noqa: E402
from pysparse.bench import alternating  # noqa: E402
from pysparse.nn import kernel_choice  # noqa: E402

SHAPES = [(3072, 768), (4096, 4096)]
TOKENS = [128, 512, 2048]
# format -> (label, from_linear arguments) for each pattern measured
PATTERNS = {
    "csr": [("90%", dict(sparsity=0.9)), ("70%", dict(sparsity=0.7))],
    "bsr": [("90% 32x32", dict(sparsity=0.9, blocksize=(32, 32)))],
    "nm": [("2:4", dict(n=2, m=4))],
}


class MaskedLinear(torch.nn.Module):
    """Masked dense training as torch.nn.utils.prune runs it: y = x (W * mask)^T + b."""

    def __init__(self, linear: torch.nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach() * mask)
        self.bias = torch.nn.Parameter(linear.bias.detach().clone())
        self.register_buffer("mask", mask)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight * self.mask, self.bias)


def step_of(layer, x, g):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)
    return step


def speed(formats) -> list:
    print(f"{torch.get_num_threads()} threads, fp32; forward + backward per call (input, weight/value and "
          f"bias gradients)\n")
    print("| layer (out x in) | pattern | n | nn.Linear ms | masked dense ms | sparse kernels ms | vs nn.Linear | "
          "vs masked | auto: chose | auto ms | auto vs masked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    rows = []
    for M, K in SHAPES:
        dense = torch.nn.Linear(K, M)
        for fmt in formats:
            for label, kw in PATTERNS[fmt]:
                sparse = pysparse.nn.SparseLinear.from_linear(dense, fmt, **kw)
                sparse.train_kernel = "sparse"
                auto = pysparse.nn.SparseLinear.from_linear(dense, fmt, **kw)
                masked = MaskedLinear(dense, sparse.weight.to_dense() != 0)
                for n in TOKENS:
                    x = torch.randn(n, K, requires_grad=True)
                    g = torch.randn(n, M)
                    step_of(auto, x, g)()  # auto's one-time timing, outside the measurement
                    chose = auto._train_choice[kernel_choice.bucket(n)]
                    reps = 3 if M * K * n > 4096 * 4096 * 512 else 5
                    td, tm, ts = alternating(step_of(dense, x, g), step_of(masked, x, g), step_of(sparse, x, g),
                                             rounds=5, reps=reps)
                    tm2, ta = alternating(step_of(masked, x, g), step_of(auto, x, g), rounds=5, reps=reps)
                    ta *= tm / tm2  # on the scale of the first run's masked time
                    rows.append({"M": M, "K": K, "format": fmt, "pattern": label, "n": n, "dense_s": td,
                                 "masked_s": tm, "sparse_s": ts, "auto_choice": chose, "auto_s": ta})
                    print(f"| {M}x{K} | {fmt} {label} | {n} | {td * 1e3:.2f} | {tm * 1e3:.2f} | {ts * 1e3:.2f} | "
                          f"{td / ts:.2f}x | {tm / ts:.2f}x | {chose} | {ta * 1e3:.2f} | {tm / ta:.2f}x |", flush=True)
    return rows


def attention(shape=(2, 12, 2048, 64), block=64) -> list:
    """masked_attention forward + backward (q, k, v gradients) against SDPA's with the same mask
    as a bool tensor (is_causal for causal), fp32."""
    B, H, L, D = shape
    print(f"\nmasked_attention forward + backward, q, k, v {shape} fp32, {block}x{block} tiles:\n")
    print("| mask | active tiles | SDPA ms | masked_attention ms | speedup | gathered-tile backward ms | fused vs gathered |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    nb = L // block
    # ~90% of the tiles inactive: each tile active with probability 0.1, the diagonal always
    tiles = (torch.rand(nb, nb, generator=gen) < 0.1) | torch.eye(nb, dtype=torch.bool)
    sparse_mask = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)
    cases = {"90% tiles inactive": (pysparse.BlockMask.from_dense_mask(sparse_mask, (block, block)), sparse_mask, False),
             "causal": (pysparse.BlockMask.causal(L, block_size=(block, block)), None, True)}
    q, k, v = (torch.randn(B, H, L, D, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(B, H, L, D, generator=gen)
    rows = []
    for name, (bm, dense_mask, causal) in cases.items():
        def ours():
            for t in (q, k, v):
                t.grad = None
            pysparse.masked_attention(q, k, v, block_mask=bm).backward(g)

        def sdpa():
            for t in (q, k, v):
                t.grad = None
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, is_causal=causal).backward(g)

        def gathered():  # the gathered-tile backward other devices run, on CPU
            _attention_grad._FUSED_CPU = False
            try:
                ours()
            finally:
                _attention_grad._FUSED_CPU = True
        ts, to, tg = alternating(sdpa, ours, gathered, rounds=3, reps=3)
        active = 1.0 - bm.sparsity
        rows.append({"mask": name, "shape": list(shape), "active_tiles": active, "sdpa_s": ts, "ours_s": to,
                     "gathered_s": tg})
        print(f"| {name} | {active:.0%} | {ts * 1e3:.1f} | {to * 1e3:.1f} | {ts / to:.2f}x | {tg * 1e3:.1f} "
              f"| {tg / to:.2f}x |", flush=True)
    return rows


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak resident set size
        f.write("5")


def memory_child(kind: str, M: int, K: int, n: int) -> None:
    """Run 3 Adam steps of one layer; print the peak RSS growth over the process before it
    (after the same steps on a small layer of the kind: the code and thread pools they touch
    are resident before the measurement starts)."""
    def make(M, K):
        if kind == "dense":
            return torch.nn.Linear(K, M)
        fmt, sparsity = kind.split(":")
        layer = pysparse.nn.SparseLinear.from_linear(torch.nn.Linear(K, M), fmt, sparsity=float(sparsity))
        layer.train_kernel = "sparse"
        return layer

    def train(layer, x, g):
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            layer(x).backward(g)
            opt.step()

    torch.manual_seed(0)
    train(make(256, 256), torch.randn(n, 256, requires_grad=True), torch.randn(n, 256))
    x, g = torch.randn(n, K, requires_grad=True), torch.randn(n, M)
    gc.collect()
    _reset_peak()
    before = _peak_rss()
    layer = make(M, K)
    gc.collect()
    if kind != "dense":
        _reset_peak()  # the dense layer it was pruned from is gone: not part of training it
    train(layer, x, g)
    print(json.dumps({"peak_bytes": _peak_rss() - before}))


def memory(M: int = 4096, K: int = 4096, n: int = 128) -> list:
    print(f"\nPeak memory of 3 Adam steps, {M}x{K} fp32, {n} tokens (peak RSS growth, fresh process each):\n")
    print("| layer | MiB | vs nn.Linear |")
    print("|---|---:|---:|")
    rows, base = [], None
    for kind in ("dense", "csr:0.9", "csr:0.7"):
        # glibc's allocator with fixed thresholds: blocks over 128 KiB are mapped and unmapped
        # at once, so the peak RSS is the peak of live memory, not of what glibc kept cached
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(M), str(K), str(n)],
                             check=True, capture_output=True, text=True, env=env).stdout
        peak = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
        base = base or peak
        rows.append({"layer": kind, "M": M, "K": K, "n": n, "peak_bytes": peak})
        print(f"| {'nn.Linear' if kind == 'dense' else 'SparseLinear ' + kind} | {peak / 2**20:.1f} | "
              f"{peak / base:.2f} |", flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], *(int(a) for a in sys.argv[3:6]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "backward.json"))
    ap.add_argument("--formats", default="csr,bsr,nm")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-attention", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in PATTERNS]
    if unknown:
        ap.error(f"unknown formats {unknown}; choose from {sorted(PATTERNS)}")
    result = {"speed": speed(formats)} if formats else {}
    if not args.no_attention:
        result["attention"] = attention()
    if not args.no_memory:
        result["memory"] = memory()
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
