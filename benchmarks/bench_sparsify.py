"""End to end: a BERT-base-sized encoder (random weights: 12 layers, hidden 768, 12 heads, FFN 3072)
at batch 8 x 32 tokens, dense vs pysparse.sparsify with 80% unstructured (CSR) and 2:4 in every
encoder linear; or (--model gpt2) GPT-2 small from its transformers config (12 layers, 768, random
weights) with every Conv1D projection of its blocks pruned, at batch 8 x 128 (issue 21's bars:
2:4 >= 1.15x dense, 80% >= 1.5x). Each recipe runs twice: kernel="sparse" (every layer swapped,
whatever its speed) and kernel="auto" (sparsify's timed choice: a layer stays dense where no sparse
kernel is faster).
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
from pysparse.nn.fast_act import swap_gelu_tanh

BERT_BASE = dict(hidden_size=768, layer_norm_eps=1e-12, vocab_size=30522, max_position_embeddings=512,
                 type_vocab_size=2, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
RECIPES = {
    "80% unstructured (CSR)": {"layers.*": {"format": "csr", "sparsity": 0.8}},
    "2:4": {"layers.*": {"format": "nm"}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=("bert", "gpt2"), default="bert")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=None, help="default: 32 (bert), 128 (gpt2)")
    ap.add_argument("--json", default=None, help="default: results/sparsify_bert_base.json or sparsify_gpt2.json")
    args = ap.parse_args()
    gpt2 = args.model == "gpt2"
    args.tokens = args.tokens or (128 if gpt2 else 32)
    args.json = args.json or str(Path(__file__).parent / "results" /
                                 ("sparsify_gpt2.json" if gpt2 else "sparsify_bert_base.json"))
    torch.manual_seed(0)
    if gpt2:
        import transformers
        cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
        dense = transformers.GPT2Model(cfg).eval()
        recipes = {"80% unstructured (CSR)": {"h.*": {"format": "csr", "sparsity": 0.8}}, "2:4": {"h.*": {"format": "nm"}}}
        bars = {"80% unstructured (CSR)": 1.5, "2:4": 1.15}
    else:
        dense, recipes, bars = MiniLM(BERT_BASE).eval(), RECIPES, {"80% unstructured (CSR)": 1.4}
    ids = torch.randint(1000, 30000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)

    def run(m):
        return m(input_ids=ids).last_hidden_state if gpt2 else m(ids, mask)
    n = args.batch * args.tokens
    info = pysparse.info()
    what = "GPT-2 small (transformers config)" if gpt2 else "BERT-base-sized encoder"
    print(f"{what}, random weights | batch {args.batch} x {args.tokens} tokens | pysparse "
          f"{info['pysparse']} | torch {info['torch_runtime']} | {info['cpu_isa_selected']} | {info['threads']} threads\n")
    print("| recipe | kernel choice | swapped | dense ms | sparse ms | speedup | max |diff| vs dense-pruned |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows, layer_checks = [], []
    with torch.no_grad():
        for label, recipe in recipes.items():
            for kernel in ("sparse", "auto"):
                rule = {k: dict(v, kernel=kernel) for k, v in recipe.items()}
                model = copy.deepcopy(dense)
                report = [r for r in pysparse.sparsify(model, rule, skip_ends=False, shapes=[n])
                          if r["kind"] == "linear"]  # (GPT-2's GELUs made one kernel are rows too)
                pruned_dense = copy.deepcopy(model)  # same zeros, every layer dense: the reference
                for name, m in list(pruned_dense.named_modules()):
                    if isinstance(m, pysparse.nn.SparseLinear):
                        pruned_dense.set_submodule(name, m.to_linear())
                diff = (run(model) - run(pruned_dense)).abs().max().item()
                td, ts = alternating(lambda: run(dense), lambda: run(model), rounds=5, reps=5)
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
    if gpt2:  # the activation alone: GPT-2's own GELU, torch's tanh form, pysparse's, on the FFN's output
        h = torch.randn(args.batch * args.tokens, 3072)
        hf_gelu = dense.h[0].mlp.act
        t_hf, t_torch, t_ours = alternating(lambda: hf_gelu(h), lambda: torch.nn.functional.gelu(h, approximate="tanh"),
                                            lambda: pysparse.activations.apply("gelu_tanh", h), rounds=5, reps=7)
        gelu = {"shape": list(h.shape), "NewGELUActivation_ms": t_hf * 1e3, "torch_gelu_tanh_ms": t_torch * 1e3,
                "pysparse_gelu_tanh_ms": t_ours * 1e3}
        print(f"GELU on {tuple(h.shape)}: NewGELUActivation {t_hf * 1e3:.2f} ms, torch tanh form {t_torch * 1e3:.2f} ms, "
              f"pysparse {t_ours * 1e3:.2f} ms ({t_torch / t_ours:.2f}x torch's)")
    if gpt2:  # how much of the speedup is sparsify's FastGELUTanh alone (dense weights)
        fast = copy.deepcopy(dense)
        swap_gelu_tanh(fast)
        with torch.no_grad():
            td, tf = alternating(lambda: run(dense), lambda: run(fast), rounds=5, reps=5)
        rows.append({"recipe": "dense weights, FastGELUTanh only", "kernel": "-", "dense_ms": td * 1e3,
                     "sparse_ms": tf * 1e3, "speedup": td / tf})
        print(f"| dense weights, FastGELUTanh only | - | 0/48 | {td * 1e3:.1f} | {tf * 1e3:.1f} | {td / tf:.2f}x | - |")
    print()
    for label, bar in bars.items():
        r = next(r for r in rows if r["recipe"] == label and r["kernel"] == "sparse")
        print(f"bar {label} >= {bar}x: {'PASS' if r['speedup'] >= bar else 'MISS'} ({r['speedup']:.2f}x)")
    nm_auto = next(r for r in rows if r["recipe"] == "2:4" and r["kernel"] == "auto")
    print(f"bar 2:4 (auto) never slower than dense: {'PASS' if nm_auto['speedup'] >= 1.0 else 'MISS'} "
          f"({nm_auto['speedup']:.2f}x)")
    print(f"bar no swapped layer slower than dense (re-timed, {len(layer_checks)} layers): "
          f"{'PASS' if not slow else 'MISS'} (worst {worst:.2f}x; slower: {[c['layer'] for c in slow][:5]})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "layers": layer_checks,
                                           "gelu": gelu if gpt2 else None}, indent=1))


if __name__ == "__main__":
    main()
