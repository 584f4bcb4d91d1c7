"""Where the time goes, per op, in the BERT-base encoder of transformers (random weights) at
batch 8 x 128: dense, and after pysparse.sparsify at 80% / 90% unstructured and 2:4 (kernel
choice "auto"). torch.profiler's self CPU time per op over `--calls` calls, grouped into the
parts of a transformer block, each with its share of the total and, for the matmuls, their
rate as a fraction of the measured FMA peak (pysparse.bench.roofline).

    python benchmarks/profile_bert.py [--batch 8] [--seq 128] [--json PATH]
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
from pysparse.bench import roofline  # noqa: E402

BERT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            vocab_size=30522, layer_norm_eps=1e-12, hidden_act="gelu")
RECIPES = {
    "dense": None,
    "80%": {"encoder.layer.*": {"format": "csr", "sparsity": 0.8}},
    "90%": {"encoder.layer.*": {"format": "csr", "sparsity": 0.9}},
    "2:4": {"encoder.layer.*": {"format": "nm", "n": 2, "m": 4}},
}
# op name (as the profiler names it) -> part of the block; anything else is "other".
GROUPS = [
    ("matmul (dense linear)", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm")),
    ("matmul (pysparse sparse linear)", ("pysparse::csr_linear", "pysparse::bsr_linear", "pysparse::nm_linear")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax",
                   "aten::softmax", "pysparse::masked_attention")),
    ("layernorm", ("aten::native_layer_norm", "aten::layer_norm")),
    ("gelu", ("aten::gelu",)),
    ("residual / bias add", ("aten::add",)),
    ("copies, views, reshapes", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::view", "aten::reshape",
                                 "aten::transpose", "aten::permute", "aten::t", "aten::empty", "aten::as_strided",
                                 "aten::_unsafe_view", "aten::expand", "aten::to", "aten::_to_copy",
                                 "aten::detach", "aten::slice", "aten::select", "aten::unsqueeze")),
]


def group_of(name: str) -> str:
    for g, prefixes in GROUPS:
        if any(name.startswith(p) for p in prefixes):
            return g
    return "other"


def profile(model, x, calls):
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    parts = {}
    for e in prof.key_averages():
        g = group_of(e.key)
        parts[g] = parts.get(g, 0.0) + e.self_cpu_time_total / calls / 1e3  # ms per call
    return parts


def linear_flops(batch, seq, cfg):
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return 2 * batch * seq * L * (4 * h * h + 2 * h * f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "profile_bert.json"))
    args = ap.parse_args()
    import transformers

    rf = roofline()
    x = torch.randn(args.batch, args.seq, BERT["hidden_size"])
    results = {}
    for label, recipe in RECIPES.items():
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=False).eval()
        if recipe:
            with torch.no_grad():
                pysparse.sparsify(model, {k: dict(v, kernel="auto") for k, v in recipe.items()},
                                  skip_ends=False, shapes=[args.batch * args.seq], progress=False)
        results[label] = profile(lambda t: model.encoder(t)[0], x, args.calls)
    groups = [g for g, _ in GROUPS] + ["other"]
    print(f"BERT-base encoder, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
          f"FMA peak fp32 {rf.fp32_gflops:.0f} GFLOP/s; self CPU ms per call (share of total)\n")
    print("| part | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for g in groups:
        cells = []
        for parts in results.values():
            tot = sum(parts.values())
            v = parts.get(g, 0.0)
            cells.append(f"{v:.1f} ({100 * v / tot:.0f}%)" if v else "-")
        print(f"| {g} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{sum(p.values()):.1f}**" for p in results.values()) + " |")
    dense_mm = results["dense"].get("matmul (dense linear)", 0.0)
    fl = linear_flops(args.batch, args.seq, BERT)
    if dense_mm:
        rate = fl / dense_mm / 1e6
        print(f"\ndense model, its linear layers: {rate:.0f} GFLOP/s = {rf.fraction(rate):.0%} of the FMA peak")
    Path(args.json).write_text(json.dumps({"roofline": rf.as_dict(), "batch": args.batch, "seq": args.seq,
                                           "ms_per_call": results}, indent=1))


if __name__ == "__main__":
    main()
