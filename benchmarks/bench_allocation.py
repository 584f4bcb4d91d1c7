"""Layer sparsity allocations on all-MiniLM-L6-v2 (offline, CPU; issue 20): "uniform" against
"sensitivity" and "owl" (outlier-weighted layerwise sparsity).

sparsify prunes every encoder linear (`{"layers.*": {...}}`, skip_ends=False, no kernel timing) at
70% and 80% unstructured with Wanda and with SparseGPT, each with allocation "uniform" (every layer
at the target), "sensitivity" and "owl" (the target over all 36 layers weighted by size, each
layer within target +- `spread`);
fidelity of the sentence embeddings to the dense model's on the evaluation sentences (mean cosine,
top-10 neighbour agreement), the spread of the layers' sparsities, the time sparsify took.
Calibration and evaluation sentences are disjoint slices of the standard library's docstrings,
as in bench_sparsegpt.py.

    python benchmarks/bench_allocation.py [--eval 1000] [--calib 256]
        [--allocations uniform,sensitivity:0.1,owl:0.05,owl:0.1] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the pysparse package is at the root

import pysparse  # noqa: E402  (after the path line above)
from pysparse._demo import _batches as batches, _fidelity  # noqa: E402
from pysparse.models.corpus import stdlib_sentences  # noqa: E402
from pysparse.models.minilm import encode, load_minilm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--sparsities", default="0.7,0.8")
    ap.add_argument("--criteria", default="wanda,sparsegpt")
    ap.add_argument("--allocations", default="uniform,sensitivity:0.1,owl:0.05,owl:0.1",
                    help="comma-separated: uniform, or ALLOCATION:SPREAD")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "allocation.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = load_minilm()
    corpus = stdlib_sentences(100000)
    evals, calib = corpus[::2][:args.eval], corpus[1::4][:args.calib]
    ref = encode(dense, tok, evals)
    cal = [lambda m, b=b: m(*b) for b in batches(tok, calib)]
    rows = []
    print(f"{len(evals)} evaluation sentences, {len(calib)} calibration sentences\n")
    print("| sparsity | criterion | allocation | cosine | top-10 | layer sparsities | sparsify s |")
    print("|---:|---|---|---:|---:|---|---:|")
    for s in (float(v) for v in args.sparsities.split(",")):
        for crit in args.criteria.split(","):
            allocations = []
            for a in args.allocations.split(","):
                kind, _, spread = a.partition(":")
                allocations.append((a, {} if kind == "uniform" else {"allocation": kind, "spread": float(spread)}))
            for label, extra in allocations:
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                report = pysparse.sparsify(model, {"layers.*": {"format": "csr", "sparsity": s, "criterion": crit,
                                                                **extra}},
                                           cal, time_layers=False, skip_ends=False, progress=False)
                t = time.perf_counter() - t
                fid = _fidelity(encode(model, tok, evals), ref)
                per_layer = [r["sparsity"] for r in report if "sparsity" in r]
                weights = [r["shape"][0] * r["shape"][1] for r in report if "sparsity" in r]
                overall = sum(p * w for p, w in zip(per_layer, weights)) / sum(weights)
                rows.append({"sparsity": s, "criterion": crit, "allocation": label, **fid, "sparsify_s": t,
                             "layer_sparsities": per_layer, "overall_sparsity": overall})
                print(f"| {s:.0%} | {crit} | {label} | {fid['cosine']:.3f} | {fid['top10']:.3f} "
                      f"| {min(per_layer):.2f}-{max(per_layer):.2f} (overall {overall:.3f}) | {t:.0f} |", flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
