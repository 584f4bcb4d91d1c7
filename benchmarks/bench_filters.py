"""Filter pruning on the structures of modern CNNs (issue 21, item 6): ResNeXt-, RegNetY-,
ConvNeXt- and EfficientNet-style networks and a small vision transformer from pysparse.models.cnn
(random weights), pruned by `pysparse.prune.filters` at ratio 0.5 (global L1): parameters kept,
what stayed unprunable and why, and the latency of the pruned network against the original
(2 threads, alternating rounds, medians) at batch 8.

Bar: <= 35% of the parameters kept on the four CNNs (a dependency-graph pruner keeps 26-32% of
their full-size versions); the vision transformer pruned at all, outputs of the right shape.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pysparse.bench import alternating
from pysparse.models import cnn
from pysparse.prune import filter_groups, filters

MODELS = {"resnext": {}, "regnet": {}, "convnext": {}, "efficientnet": {}, "vit": {"image": 64}, "resnet50": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "filters_modern.json"))
    args = ap.parse_args()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"prune.filters ratio {args.ratio}, global L1, batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"{torch.get_num_threads()} threads\n")
    print("| network | params | kept | dense ms | pruned ms | speedup | left unprunable (why) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = []
    for name, kw in MODELS.items():
        torch.manual_seed(0)
        m = getattr(cnn, name)(num_classes=10, **kw).eval()
        small = filters(m, x, args.ratio).eval()
        with torch.no_grad():
            assert small(x).shape == m(x).shape
            td, ts = alternating(lambda: m(x), lambda: small(x), rounds=5, reps=5)
        n0, n1 = (sum(p.numel() for p in net.parameters()) for net in (m, small))
        why = sorted({g["reason"] for g in filter_groups(m, x) if not g["prunable"]})
        rows.append({"network": name, "params": n0, "kept": n1 / n0, "dense_ms": td * 1e3, "pruned_ms": ts * 1e3,
                     "unprunable": why})
        print(f"| {name} | {n0} | {n1 / n0:.1%} | {td * 1e3:.2f} | {ts * 1e3:.2f} | {td / ts:.2f}x | {'; '.join(why)} |",
              flush=True)
    print()
    for r in rows:
        if r["network"] in ("resnext", "regnet", "convnext", "efficientnet"):
            print(f"bar {r['network']} keeps <= 35%: {'PASS' if r['kept'] <= 0.35 else 'MISS'} ({r['kept']:.1%})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
