"""End to end: a BERT-base-sized encoder (random weights: 12 layers, hidden 768, 12 heads, FFN 3072)
at batch 8 x 32 tokens, dense vs pysparse.sparsify with 80% unstructured (CSR) and 2:4 in every
encoder linear. Each recipe runs twice: kernel="sparse" (every layer swapped, whatever its speed)
and kernel="auto" (sparsify's timed choice: a layer stays dense where no sparse kernel is faster).
Then every layer the auto runs swapped is re-timed against its dense version at the tuned shape.

Bars: 80% unstructured >= 1.4x dense end to end; 2:4 (auto) never slower than dense; no swapped
layer slower than the dense layer it replaced.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import pysparse
from pysparse.bench import alternating, median_us
from pysparse.models.minilm import MiniLM

BERT_BASE = dict(hidden_size=768, layer_norm_eps=1e-12, vocab_size=30522, max_position_embeddings=512,
                 type_vocab_size=2, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
RECIPES = {
    "80% unstructured (CSR)": {"layers.*": {"format": "csr", "sparsity": 0.8}},
    "2:4": {"layers.*": {"format": "nm"}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "sparsify_bert_base.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = MiniLM(BERT_BASE).eval()
    ids = torch.randint(1000, 30000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    n = args.batch * args.tokens
    info = pysparse.info()
    print(f"BERT-base-sized encoder, random weights | batch {args.batch} x {args.tokens} tokens | pysparse "
          f"{info['pysparse']} | torch {info['torch_runtime']} | {info['cpu_isa_selected']} | {info['threads']} threads\n")
    print("| recipe | kernel choice | swapped | dense ms | sparse ms | speedup | max |diff| vs dense-pruned |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows, layer_checks = [], []
    with torch.no_grad():
        for label, recipe in RECIPES.items():
            for kernel in ("sparse", "auto"):
                rule = {k: dict(v, kernel=kernel) for k, v in recipe.items()}
                model = copy.deepcopy(dense)
                report = pysparse.sparsify(model, rule, skip_ends=False, shapes=[n])
                pruned_dense = copy.deepcopy(model)  # same zeros, every layer dense: the reference
                for name, m in list(pruned_dense.named_modules()):
                    if isinstance(m, pysparse.nn.SparseLinear):
                        pruned_dense.set_submodule(name, m.to_linear())
                diff = (model(ids, mask) - pruned_dense(ids, mask)).abs().max().item()
                td, ts = alternating(lambda: dense(ids, mask), lambda: model(ids, mask), rounds=5, reps=5)
                swapped = sum(r["kernel"] != "dense" for r in report)
                rows.append({"recipe": label, "kernel": kernel, "swapped": swapped, "layers": len(report),
                             "dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "speedup": td / ts, "max_diff": diff})
                print(f"| {label} | {kernel} | {swapped}/{len(report)} | {td * 1e3:.1f} | {ts * 1e3:.1f} | "
                      f"{td / ts:.2f}x | {diff:.1e} |", flush=True)
                if kernel == "auto":
                    for r in report:
                        if r["kernel"] == "dense":
                            continue
                        sl = model.get_submodule(r["name"])
                        dl = sl.to_linear()
                        x = torch.randn(n, sl.in_features)
                        t_d = median_us(lambda: dl(x), 0.1)
                        t_s = median_us(lambda: sl(x), 0.1)
                        layer_checks.append({"recipe": label, "layer": r["name"], "dense_us": t_d, "sparse_us": t_s})
    slow = [c for c in layer_checks if c["sparse_us"] > c["dense_us"]]
    worst = min((c["dense_us"] / c["sparse_us"] for c in layer_checks), default=float("nan"))
    csr = next(r for r in rows if r["recipe"].startswith("80%") and r["kernel"] == "sparse")
    nm_auto = next(r for r in rows if r["recipe"] == "2:4" and r["kernel"] == "auto")
    print(f"\nbar 80% unstructured >= 1.4x: {'PASS' if csr['speedup'] >= 1.4 else 'MISS'} ({csr['speedup']:.2f}x)")
    print(f"bar 2:4 (auto) never slower than dense: {'PASS' if nm_auto['speedup'] >= 1.0 else 'MISS'} "
          f"({nm_auto['speedup']:.2f}x)")
    print(f"bar no swapped layer slower than dense (re-timed, {len(layer_checks)} layers): "
          f"{'PASS' if not slow else 'MISS'} (worst {worst:.2f}x; slower: {[c['layer'] for c in slow][:5]})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "layers": layer_checks}, indent=1))


if __name__ == "__main__":
    main()
