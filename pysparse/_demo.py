"""The main job: prune all-MiniLM-L6-v2 with several recipes and show what each costs and buys.

For each recipe: parameters and bytes stored, end-to-end CPU latency against the dense model
(batch 32 x ~20 tokens and batch 1, timed side by side, alternating), and fidelity on >= 1000
sentences from the Python standard library's docstrings (mean cosine similarity of the sentence
embeddings to the dense model's, and top-10 nearest-neighbour agreement). Calibration sentences
come from the same library but are disjoint from the evaluation ones. Writes a speed-vs-fidelity
plot (PNG) and the numbers (JSON).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import analyze
from ._info import info
from .bench import alternating
from .nn import SparseLinear, sparsify
from .recover import _sparse_parameters, recover

# (label, recipe[, recovery seconds]). "layers.*" matches the encoder layers (attention + FFN
# modules) and every linear inside them; sparsify skips the model's first and last linear by
# default. With recovery seconds, the pruned model gets a second row after pysparse.recover has
# distilled it towards the dense one for that long (sparse values only, patterns fixed; a model
# with no sparse layer, pruned by structure only, trains all its parameters at its new shapes).
RECIPES = [
    ("2:4 all linears, magnitude", {"layers.*": {"format": "nm"}}),
    ("2:4 all linears, Wanda", {"layers.*": {"format": "nm", "criterion": "wanda"}}),
    ("2:4 all linears, SparseGPT", {"layers.*": {"format": "nm", "criterion": "sparsegpt"}}, 90),
    ("50% CSR all linears, SparseGPT", {"layers.*": {"format": "csr", "sparsity": 0.5, "criterion": "sparsegpt"}}),
    ("70% CSR all linears, SparseGPT", {"layers.*": {"format": "csr", "sparsity": 0.7, "criterion": "sparsegpt"}}, 90),
    ("80% CSR all linears, SparseGPT", {"layers.*": {"format": "csr", "sparsity": 0.8, "criterion": "sparsegpt"}}, 90),
    ("2:4 FFN, Wanda", {"*.ffn_*": {"format": "nm", "criterion": "wanda"}}),
    ("45% FFN neurons, magnitude", {"layers.*": {"neurons": 0.45}}),
    ("45% FFN neurons, activation + LS", {"layers.*": {"neurons": 0.45, "criterion": "activation", "reconstruct": True}}),
    ("25% heads, magnitude", {"layers.*": {"heads": 0.25}}),
    ("25% heads, activation + LS", {"layers.*": {"heads": 0.25, "criterion": "activation", "reconstruct": True}}),
    ("25% heads + 40% neurons, magnitude", {"layers.*": {"heads": 0.25, "neurons": 0.4}}),
    ("25% heads + 40% neurons, activation + LS",
     {"layers.*": {"heads": 0.25, "neurons": 0.4, "criterion": "activation", "reconstruct": True}}, 90),
]
QUICK = {"2:4 all linears, Wanda", "2:4 all linears, SparseGPT", "45% FFN neurons, activation + LS", "25% heads, magnitude"}
QUICK_RECOVER_S = 10  # the recovery budget of a quick run


def _fidelity(emb: torch.Tensor, ref: torch.Tensor, k: int = 10) -> Dict[str, float]:
    """Mean cosine to the dense embeddings and the mean overlap of each sentence's k nearest
    neighbours (by cosine, itself excluded) under the two models."""
    cos = (emb * ref).sum(1).mean().item()
    eye = torch.eye(len(ref), dtype=torch.bool)
    a = (ref @ ref.T).masked_fill(eye, -2).topk(k).indices
    b = (emb @ emb.T).masked_fill(eye, -2).topk(k).indices
    same = (a[:, :, None] == b[:, None, :]).any(-1).float().mean().item()
    return {"cosine": cos, "top10": same}


def _stored(model: torch.nn.Module) -> Dict[str, float]:
    """Weight values stored in the encoder layers, and bytes of every tensor of the model."""
    values = 0
    for m in model.layers.modules():
        if isinstance(m, SparseLinear):
            values += m.weight_values.numel()
        elif isinstance(m, torch.nn.Linear):
            values += m.weight.numel()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t is not None)
    return {"layer_params": values, "bytes": nbytes}


def _batches(tok, sentences: List[str]) -> list:
    """Batches of up to 32 sentences of equal token length: no padding rows in the statistics."""
    by_len: Dict[int, List[str]] = {}
    for s in sentences:
        by_len.setdefault(len(tok.encode(s)), []).append(s)
    return [tok(v[i:i + 32]) for _, v in sorted(by_len.items()) for i in range(0, len(v), 32)]


def run(quick: bool = False, plot: Optional[str] = None, out_json: Optional[str] = None,
        sensitivity_plot: Optional[str] = None, eval_sentences: int = 1000, calib_sentences: int = 1024) -> List[dict]:
    from .models.corpus import stdlib_sentences
    from .models.minilm import encode, load_minilm

    torch.manual_seed(0)
    t_start = time.perf_counter()
    parts = {"sparsify": 0.0, "recover": 0.0, "latency and fidelity": 0.0, "sensitivity": 0.0}
    if quick:
        eval_sentences, calib_sentences = 200, 128
    dense, tok = load_minilm()
    corpus = stdlib_sentences(100000)
    evals, calib = corpus[::2][:eval_sentences], corpus[1::2][:calib_sentences]
    if len(evals) < eval_sentences:
        print(f"note: the standard library here gives only {len(evals)} evaluation sentences")
    batches = _batches(tok, calib)
    calibration = [lambda m, b=b: m(*b) for b in batches]
    # Recovery trains on the sentences neither evaluation nor calibration uses: the rest of the
    # first paragraphs' and every later paragraph's (stdlib_sentences keeps those disjoint).
    recovery = [tuple(b) for b in _batches(tok, corpus[::2][eval_sentences:] + corpus[1::2][calib_sentences:]
                                           + stdlib_sentences(100000, paragraphs="rest"))]
    # Every len/8-th batch (all sentence lengths) is held out of the training: recovery keeps the
    # state whose embeddings are closest to the dense model's on them (keep_best), so a budget
    # that ends on a worse state than an earlier one (or than the untrained model) does not count.
    held_out = set(range(0, len(recovery), max(1, len(recovery) // 8)))
    recovery_eval = [b for i, b in enumerate(recovery) if i in held_out]
    recovery = [b for i, b in enumerate(recovery) if i not in held_out]
    hidden = [f"layers.{i}" for i in range(len(dense.layers))]  # layer-wise distillation
    # Latency inputs: 32 sentences of 18-22 tokens (padded to the longest), and one of ~20.
    near20 = [s for s in evals if 18 <= len(tok.encode(s)) <= 22]
    b32, b1 = tok(near20[:32]), tok(near20[:1])
    tuned = [b32[0].numel(), b1[0].numel()]  # token counts each swapped linear is tuned for
    ref = encode(dense, tok, evals)
    about = info()
    print(f"all-MiniLM-L6-v2 | pysparse {about['pysparse']} | torch {about['torch_runtime']} | "
          f"CPU kernels {about['cpu_isa_selected']} | {about['threads']} threads | {len(evals)} evaluation and "
          f"{len(calib)} calibration sentences | latency: batch {tuple(b32[0].shape)} and {tuple(b1[0].shape)}\n")
    base = _stored(dense)
    print("| recipe | layer params | MB | batch 32 vs dense | batch 1 vs dense | cosine | top-10 | swapped | sparsify s "
          "| recovery s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| dense | {base['layer_params'] / 1e6:.2f} M | {base['bytes'] / 2**20:.1f} | 1.00x | 1.00x | 1.000 | 1.000 "
          f"| - | - | - |")
    rows = []
    for label, recipe, *recover_s in RECIPES:
        if quick and label not in QUICK:
            continue
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = sparsify(model, recipe, calibration, shapes=tuned, progress=False)
        t_sparsify = time.perf_counter() - t0
        parts["sparsify"] += t_sparsify
        lin = [r for r in report if r["kind"] == "linear"]
        swapped = f"{sum(r['kernel'] != 'dense' for r in lin)}/{len(lin)}" if lin else "-"
        t0 = time.perf_counter()
        rows.append(_row(label, model, dense, tok, evals, ref, b32, b1, quick, swapped, t_sparsify, None))
        parts["latency and fidelity"] += time.perf_counter() - t0
        if recover_s:
            seconds = QUICK_RECOVER_S if quick else recover_s[0]
            rep = recover(model, dense, recovery, time_budget=seconds, hidden=hidden,
                          train="sparse" if _sparse_parameters(model)[0] else "all", progress=False,
                          eval_batches=recovery_eval, keep_best=True, eval_every=25)
            print(f"  (recovery: {rep['steps']} steps, kept the state after step {rep['best_step']}; held-out "
                  f"distance {rep['eval_before']:.4f} -> {rep['eval_after']:.4f})")
            parts["recover"] += rep["seconds"]
            t0 = time.perf_counter()
            rows.append(_row(f"{label} + recover {seconds:g} s", model, dense, tok, evals, ref, b32, b1, quick,
                             swapped, t_sparsify, rep["seconds"]))
            rows[-1].update(recover_steps=rep["steps"], recover_best_step=rep["best_step"])
            parts["latency and fidelity"] += time.perf_counter() - t0
    ok = [r for r in rows if r["speedup_b32"] >= 1.3 and r["cosine"] >= 0.95 and r["top10"] >= 0.8]
    print(f"\nbar (>= 1.3x at batch 32 with cosine >= 0.95 and top-10 >= 0.8): "
          f"{'PASS: ' + ', '.join(r['recipe'] for r in ok) if ok else 'MISS'}")
    print("LS = the output projection refitted by least squares on the calibration sentences (no gradient "
          "training); 'recover' = pysparse.recover, distillation towards the dense embeddings and every encoder "
          "layer's output on "
          f"{sum(len(b[0]) for b in recovery)} further sentences (only the kept values train; every parameter "
          f"after structured pruning alone), keeping the state closest to the dense model on "
          f"{sum(len(b[0]) for b in recovery_eval)} held-out ones; 'swapped' = linears "
          "kept sparse / pruned (the rest run dense where no sparse kernel was faster at both tuned shapes).")
    if sensitivity_plot:
        t0 = time.perf_counter()
        sens = analyze.sensitivity(dense, lambda m: m(*b32), levels=(0.5, 0.9) if quick else (0.5, 0.7, 0.9),
                                   layers=["layers.*"])
        parts["sensitivity"] = time.perf_counter() - t0
        print(f"\nsensitivity (unstructured magnitude pruning of one linear at a time, batch-32 embeddings): most "
              f"sensitive {', '.join(sens.most_sensitive(4))}; plot: {sens.plot(sensitivity_plot)}")
    total = time.perf_counter() - t_start
    print(f"\ndemo time {total / 60:.1f} min: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items())
          + f", the rest (model and corpus loading, dense reference) {total - sum(parts.values()):.0f} s")
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps({"info": about, "rows": rows, "seconds": dict(parts, total=total)},
                                             indent=1))
    if plot:
        _plot(rows, plot)
        print(f"plot: {plot}")
    return rows


def _row(label, model, dense, tok, evals, ref, b32, b1, quick, swapped, t_sparsify, t_recover) -> dict:
    """Size, latency against the dense model (alternating) and fidelity of one pruned model; printed."""
    from .models.minilm import encode

    fid = _fidelity(encode(model, tok, evals), ref)
    with torch.no_grad():
        d32, s32 = alternating(lambda: dense(*b32), lambda: model(*b32), rounds=3 if quick else 5)
        d1, s1 = alternating(lambda: dense(*b1), lambda: model(*b1), rounds=3 if quick else 5, reps=15)
    size = _stored(model)
    row = {"recipe": label, **size, "speedup_b32": d32 / s32, "speedup_b1": d1 / s1, **fid,
           "swapped": swapped, "sparsify_s": t_sparsify, "recover_s": t_recover, "dense_b32_ms": d32 * 1e3,
           "ms_b32": s32 * 1e3, "dense_b1_ms": d1 * 1e3, "ms_b1": s1 * 1e3}
    recovered = "-" if t_recover is None else f"{t_recover:.0f}"
    print(f"| {label} | {size['layer_params'] / 1e6:.2f} M | {size['bytes'] / 2**20:.1f} | {row['speedup_b32']:.2f}x "
          f"| {row['speedup_b1']:.2f}x | {fid['cosine']:.3f} | {fid['top10']:.3f} | {swapped} | {t_sparsify:.0f} "
          f"| {recovered} |", flush=True)
    return row


def _plot(rows: List[dict], path: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("(no plot: matplotlib is not installed; pip install matplotlib)")
        return
    fig = Figure(figsize=(8, 5.5), dpi=120)
    ax = fig.add_subplot()
    for r in rows:
        recovered = "recover" in r["recipe"]
        calib = any(k in r["recipe"] for k in ("Wanda", "LS", "SparseGPT"))
        ax.scatter(r["cosine"], r["speedup_b32"], marker="^" if recovered else "o" if calib else "s",
                   color="C2" if recovered else "C0" if calib else "C1")
        ax.annotate(r["recipe"], (r["cosine"], r["speedup_b32"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    # The frontier: the recipes no other recipe beats on both speed and fidelity.
    front = [r for r in rows if not any(o["cosine"] >= r["cosine"] and o["speedup_b32"] > r["speedup_b32"]
                                        or o["cosine"] > r["cosine"] and o["speedup_b32"] >= r["speedup_b32"]
                                        for o in rows)]
    front.sort(key=lambda r: r["cosine"])
    ax.plot([r["cosine"] for r in front], [r["speedup_b32"] for r in front], color="grey", lw=0.8, zorder=0)
    ax.scatter([1.0], [1.0], marker="*", s=120, color="k")
    ax.annotate("dense", (1.0, 1.0), fontsize=8, xytext=(-30, 6), textcoords="offset points")
    ax.axhline(1.3, color="grey", lw=0.6, ls="--")
    ax.axvline(0.95, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("mean cosine similarity to the dense embeddings")
    ax.set_ylabel("end-to-end speedup vs dense, batch 32 x ~20 tokens")
    ax.set_title("all-MiniLM-L6-v2 on this CPU: speed vs fidelity\n(circles: calibration-aware, triangles: after "
                 "recover; line: the frontier)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
