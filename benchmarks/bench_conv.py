"""CNNs on CPU: ResNet-50-shaped layers and a whole ResNet-50-style network (224x224, batch 1 and 8).

1. Layers: nn.Conv2d (dense) vs pysparse.nn.SparseConv2d at 70% / 90% unstructured (CSR) and 2:4,
   on every distinct 1x1 and 3x3 convolution shape of ResNet-50.
2. Network: dense vs 30/50/70% filter-pruned (pysparse.prune.filters, L1, global: a smaller dense
   network) vs every conv but the stem swapped for SparseConv2d at 70/90% unstructured and 2:4.
Every pair is timed side by side in alternating rounds (medians), 2 threads, fp32, random weights,
BatchNorm in eval mode.

Bars: 50% filter pruning >= 1.6x end to end; SparseConv2d at 90% on ResNet-50's 1x1 layers >= 2x.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import pysparse
from pysparse.bench import alternating
from pysparse.models.cnn import resnet50
from pysparse.nn import SparseConv2d

# (Cin, Cout, kernel, stride, spatial of the input) of ResNet-50's distinct conv shapes (v1.5:
# the stride sits on the 3x3).
LAYERS = [
    (64, 64, 1, 1, 56), (64, 256, 1, 1, 56), (256, 64, 1, 1, 56), (256, 128, 1, 1, 56),
    (128, 512, 1, 1, 28), (512, 128, 1, 1, 28), (512, 256, 1, 1, 28),
    (256, 1024, 1, 1, 14), (1024, 256, 1, 1, 14), (1024, 512, 1, 1, 14),
    (512, 2048, 1, 1, 7), (2048, 512, 1, 1, 7),
    (64, 64, 3, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7),
]
PATTERNS = [("70% csr", "csr", 0.7), ("90% csr", "csr", 0.9), ("2:4", "nm", 0.5)]


def swap_convs(model, fmt, sparsity):
    """Every Conv2d except the stem (the first) -> SparseConv2d; depthwise ones stay dense."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for name, conv in convs[1:]:
        model.set_submodule(name, SparseConv2d.from_conv(conv, fmt, sparsity=sparsity))  # nm ignores sparsity
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="batch 1 only, fewer layers")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "conv.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    info = pysparse.info()
    print(f"pysparse {info['pysparse']} | torch {info['torch_runtime']} | {info['cpu_isa_selected']} | "
          f"{info['threads']} threads | fp32\n")
    batches = (1,) if args.quick else (1, 8)
    out = {"info": info, "layers": [], "network": []}
    print("| conv (Cin->Cout, k, spatial) | batch | dense ms | " + " | ".join(f"{p} x" for p, _, _ in PATTERNS) + " |")
    print("|---|---:|---:|" + "---:|" * len(PATTERNS))
    with torch.no_grad():
        for cin, cout, k, stride, hw in (LAYERS[::3] if args.quick else LAYERS):
            conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False).eval()
            for b in batches:
                x = torch.randn(b, cin, hw, hw)
                ratios, t_dense = [], None
                for label, fmt, sp in PATTERNS:
                    sc = SparseConv2d.from_conv(conv, fmt, sparsity=sp)
                    dense = sc.to_conv()  # the same pruned weights, run by torch
                    td, ts = alternating(lambda: dense(x), lambda: sc(x), rounds=3)
                    t_dense = td if t_dense is None else min(t_dense, td)
                    ratios.append(td / ts)
                    out["layers"].append({"cin": cin, "cout": cout, "k": k, "hw": hw, "batch": b, "pattern": label,
                                          "dense_ms": td * 1e3, "sparse_ms": ts * 1e3})
                print(f"| {cin}->{cout}, {k}x{k}, {hw}x{hw} | {b} | {t_dense * 1e3:.2f} | "
                      + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)

        print("\n| ResNet-50-style, 224x224 | batch | dense ms | variant ms | speedup | conv params |")
        print("|---|---:|---:|---:|---:|---:|")
        base = resnet50().eval()
        n_params = lambda m: sum(p.numel() for n, p in m.named_parameters() if "conv" in n or "downsample.0" in n)  # noqa: E731
        example = torch.randn(1, 3, 224, 224)
        variants = [(f"{int(r * 100)}% filters pruned (L1, global)", lambda r=r: pysparse.prune.filters(base, example, r))
                    for r in (0.3, 0.5, 0.7)]
        variants += [(f"SparseConv2d {label}", lambda fmt=fmt, sp=sp: swap_convs(copy.deepcopy(base), fmt, sp))
                     for label, fmt, sp in PATTERNS]
        for label, make in variants:
            model = make().eval()
            for b in batches:
                x = torch.randn(b, 3, 224, 224)
                td, tv = alternating(lambda: base(x), lambda: model(x), rounds=3, reps=3)
                row = {"variant": label, "batch": b, "dense_ms": td * 1e3, "ms": tv * 1e3, "speedup": td / tv}
                out["network"].append(row)
                print(f"| {label} | {b} | {td * 1e3:.0f} | {tv * 1e3:.0f} | {td / tv:.2f}x | "
                      f"{n_params(model) / 1e6 if 'filters' in label else n_params(base) / 1e6:.1f} M |", flush=True)
    one = [r for r in out["layers"] if r["k"] == 1 and r["pattern"] == "90% csr"]
    worst = min(r["dense_ms"] / r["sparse_ms"] for r in one)
    f50 = [r["speedup"] for r in out["network"] if r["variant"].startswith("50% filters")]
    print(f"\nbar SparseConv2d 90% on 1x1 layers >= 2x: {'PASS' if worst >= 2 else 'MISS'} (worst {worst:.2f}x "
          f"over {len(one)} layer x batch cases)")
    print(f"bar 50% filter pruning >= 1.6x end to end: {'PASS' if min(f50) >= 1.6 else 'MISS'} "
          f"({', '.join(f'{s:.2f}x' for s in f50)} at batch {', '.join(map(str, batches))})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
