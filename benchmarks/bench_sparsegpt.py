"""SparseGPT against Wanda and magnitude pruning on all-MiniLM-L6-v2 (offline, CPU).

1. Per layer: every linear of the encoder layers pruned alone (2:4 and 70% unstructured) from the
   dense model's inputs to it on calibration sentences; the relative output error
   ||(W - W_pruned) X||^2 / ||W X||^2 on held-out sentences' inputs (Wanda: per output row, the
   smallest |w| * ||x||; SparseGPT: pysparse.prune.sparsegpt with the calibration Hessian).
2. End to end: sparsify with each criterion on every encoder linear (SparseGPT sequentially, each
   layer calibrated on the model pruned so far), fidelity of the sentence embeddings on the
   evaluation sentences (mean cosine to the dense model's, top-10 neighbour agreement).
3. With --recover SECONDS: the SparseGPT models then distilled towards the dense one by
   pysparse.recover (cosine loss on the embeddings, the sparse layers' values trained) on
   recovery sentences disjoint from the others, for that wall-clock budget each; --hidden adds
   layer-wise distillation (every encoder layer's output matched, recover's ``hidden``),
   --more-text the docstrings' later paragraphs to the recovery sentences.

Calibration, held-out and evaluation sentences are disjoint slices of the standard library's
docstrings (pysparse.models.corpus).

    python benchmarks/bench_sparsegpt.py [--eval 1000] [--calib 256] [--recover SECONDS] [--hidden] [--more-text]
        [--patterns 2:4,70%] [--json PATH]
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
from pysparse.prune import hessian, sparsegpt  # noqa: E402

PATTERNS = {"2:4": {"format": "nm", "n": 2, "m": 4}, "70%": {"format": "csr", "sparsity": 0.7}}


def layer_inputs(model, names, bs):
    """{linear name: (tokens, in) inputs} over the batches."""
    got = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for b in bs:
            model(*b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def wanda(W, X, pattern):
    scores = W.abs() * X.norm(dim=0)
    if pattern == "2:4":
        return pysparse.prune.nm(W, 2, 4, scores=scores)
    k = int(0.7 * W.shape[1])
    return W.clone().scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--recover", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--hidden", action="store_true", help="recover also matches every encoder layer's output")
    ap.add_argument("--more-text", action="store_true",
                    help="recover also on the docstrings' later paragraphs (disjoint from the evaluation sentences)")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of " + ",".join(PATTERNS))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sparsegpt.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = load_minilm()
    corpus = stdlib_sentences(100000)
    evals = corpus[::2][:args.eval]
    calib = corpus[1::4][:args.calib]
    held = corpus[3::4][:args.calib]
    recovery = corpus[3::4][args.calib:]  # disjoint from evaluation (even), calibration and held-out
    if args.more_text:  # sentences no first paragraph has: disjoint from all of the above
        recovery += stdlib_sentences(100000, paragraphs="rest")
    patterns = {p: PATTERNS[p] for p in args.patterns.split(",")}
    names = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    xc, xh = layer_inputs(dense, names, batches(tok, calib)), layer_inputs(dense, names, batches(tok, held))
    result = {"layers": [], "end_to_end": []}
    print(f"{len(names)} encoder linears; calibration {xc[names[0]].shape[0]} tokens, held-out "
          f"{xh[names[0]].shape[0]} tokens\n")
    print("| pattern | layers where SparseGPT <= Wanda | mean error SparseGPT | Wanda | magnitude | worst layer ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for pattern, rule in patterns.items():
        errs = {"sparsegpt": [], "wanda": [], "magnitude": []}
        for n in names:
            W = dense.get_submodule(n).weight.detach()
            X, Xe = xc[n], xh[n]
            kw = {"n": 2, "m": 4} if pattern == "2:4" else {"sparsity": 0.7}
            cands = {"sparsegpt": sparsegpt(W, hessian(X), **kw), "wanda": wanda(W, X, pattern),
                     "magnitude": pysparse.prune.nm(W, 2, 4) if pattern == "2:4" else pysparse.prune.magnitude(W, 0.7)}
            ref = (W @ Xe.t()).square().sum()
            for c, Wp in cands.items():
                errs[c].append(float(((W - Wp) @ Xe.t()).square().sum() / ref))
        wins = sum(s <= w for s, w in zip(errs["sparsegpt"], errs["wanda"]))
        worst = max(s / w for s, w in zip(errs["sparsegpt"], errs["wanda"]))
        mean = {c: sum(v) / len(v) for c, v in errs.items()}
        result["layers"].append({"pattern": pattern, "wins": wins, "layers": len(names), "errors": errs})
        print(f"| {pattern} | {wins}/{len(names)} | {mean['sparsegpt']:.4f} | {mean['wanda']:.4f} | "
              f"{mean['magnitude']:.4f} | {worst:.2f} |", flush=True)

    ref = encode(dense, tok, evals)
    cal = [lambda m, b=b: m(*b) for b in batches(tok, calib)]
    print(f"\nEnd to end, every encoder linear pruned, {len(evals)} evaluation sentences:\n")
    print("| pattern | criterion | cosine | top-10 | sparsify s |")
    print("|---|---|---:|---:|---:|")
    for pattern, rule in patterns.items():
        for crit in ("magnitude", "wanda", "sparsegpt"):
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            pysparse.sparsify(model, {"layers.*": dict(rule, criterion=crit)}, cal, time_layers=False, skip_ends=False,
                              progress=False)
            t = time.perf_counter() - t
            fid = _fidelity(encode(model, tok, evals), ref)
            result["end_to_end"].append({"pattern": pattern, "criterion": crit, **fid, "sparsify_s": t})
            print(f"| {pattern} | {crit} | {fid['cosine']:.3f} | {fid['top10']:.3f} | {t:.0f} |", flush=True)
            if crit == "sparsegpt" and args.recover:
                rb = [tuple(b) for b in batches(tok, recovery)]
                hidden = [f"layers.{i}" for i in range(len(dense.layers))] if args.hidden else ()
                rep = pysparse.recover(model, dense, rb, time_budget=args.recover, lr=args.lr, loss="cosine",
                                       hidden=hidden, progress=False)
                fid = _fidelity(encode(model, tok, evals), ref)
                result["end_to_end"].append({"pattern": pattern, "criterion": "sparsegpt + recover", **fid,
                                             "recover_s": rep["seconds"], "recover_steps": rep["steps"],
                                             "recovery_sentences": len(recovery), "hidden": bool(hidden)})
                print(f"| {pattern} | sparsegpt + recover ({rep['steps']} steps, {rep['seconds']:.0f} s) | "
                      f"{fid['cosine']:.3f} | {fid['top10']:.3f} | {t:.0f} |", flush=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
