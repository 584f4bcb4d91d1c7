"""pysparse against the engines a user would pick instead, end to end on CPU: torch eager and
torch.compile (dense), ONNX Runtime (dense kernels) and DeepSparse 1.8.0 (sparse kernels), on the
same zeroed weights.

Models (random weights, seeded; nothing downloaded): the BERT-base encoder of transformers
(12 layers, 768 / 3072, 12 heads) at batch 1 x 128 and 8 x 128, unpruned, 80% and 90%
unstructured and 2:4 in every encoder linear; a LLaMA-style stack (8 layers, 2048 / 5632, 16
heads; LlamaModel without the embedding) decoding one token (no KV cache) at 70% unstructured.
pysparse.sparsify prunes by magnitude with kernel choice "auto" (its timed choice per layer at
the benchmark's token count); the zeroed weights it leaves are what every other engine runs
(ONNX graphs from benchmarks/engines/onnx_graphs.py).

Method: each engine is a long-lived worker process (benchmarks/engines/worker.py) in its own
virtualenv (or this interpreter, where it has the peer's package), on `--threads` threads; the engines take turns in alternating rounds (each round:
`reps` calls per engine, its median), so machine noise hits all alike; the table gives the median
over rounds and, in the JSON, every round's median (the spread). Outputs are checked against
torch eager on the same weights before timing. A peer whose virtualenv is missing or fails to
load is skipped with the reason (`make bench-engines` creates .venv-ort and .venv-deepsparse).

    python benchmarks/bench_engines.py [--only bert-8x128] [--engines torch,pysparse,ort]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the pysparse package is at the root
WORKER = Path(__file__).resolve().parent / "engines" / "worker.py"
VENVS = {"ort": ROOT / ".venv-ort", "deepsparse": ROOT / ".venv-deepsparse"}
MODULES = {"ort": "onnxruntime", "deepsparse": "deepsparse"}  # what a venv-less run needs importable
ALL_ENGINES = ["torch", "torch-compile", "pysparse", "pysparse-compile", "ort", "deepsparse"]
LABELS = {"torch": "torch eager", "torch-compile": "torch.compile", "pysparse": "pysparse",
          "pysparse-compile": "pysparse + compile", "ort": "ONNX Runtime", "deepsparse": "DeepSparse"}

BERT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            vocab_size=30522, layer_norm_eps=1e-12, hidden_act="gelu")
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=256, rms_norm_eps=1e-6, hidden_act="silu")
PATTERNS = {
    "unpruned": None,
    "80%": {"format": "csr", "sparsity": 0.8},
    "90%": {"format": "csr", "sparsity": 0.9},
    "2:4": {"format": "nm", "n": 2, "m": 4},
    "70%": {"format": "csr", "sparsity": 0.7},
}
# (key, model, cfg, batch, seq, pattern, module pattern of the recipe)
CONFIGS = [
    (f"bert-{b}x128-{p}", "bert", BERT, b, 128, p, "encoder.layer.*")
    for b in (1, 8) for p in ("unpruned", "80%", "90%", "2:4")
] + [("llama-decode-70%", "llama", LLAMA, 1, 1, "70%", "layers.*")]


class Worker:
    """One engine's process; requests and answers as in worker.py's docstring."""

    def __init__(self, engine: str, threads: int, log):
        py = sys.executable
        if engine in VENVS and os.path.exists(VENVS[engine] / "bin" / "python"):
            py = str(VENVS[engine] / "bin" / "python")
        elif engine in VENVS and importlib.util.find_spec(MODULES[engine]) is None:
            raise RuntimeError(f"no virtualenv {VENVS[engine].name} and no {MODULES[engine]} here "
                               f"(make bench-engines creates it)")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT),
                   NM_BIND_THREADS_TO_CORES="1")
        self.engine = engine
        self.p = subprocess.Popen([py, str(WORKER), engine], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=log, text=True, env=env, cwd=str(ROOT))

    def ask(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"{self.engine} worker exited (code {self.p.wait()}); see the log")

    def close(self):
        try:
            if self.p.poll() is None:
                self.ask(cmd="quit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        self.p.kill() if self.p.poll() is None else None
        self.p.wait()


def run_config(key, model, cfg, batch, seq, pattern, scope, engines, args, log, tmp):
    x = np.random.default_rng(0).standard_normal((batch, seq, cfg["hidden_size"])).astype(np.float32)
    xp, wp = str(tmp / "x.npy"), str(tmp / "w.npz")
    np.save(xp, x)
    rule = PATTERNS[pattern]
    recipe = {scope: dict(rule, kernel="auto")} if rule else None
    # The weights every engine runs: pysparse's zeroed ones (or torch's seeded ones if unpruned).
    base = "pysparse" if recipe else "torch"
    order = [base] + [e for e in engines if e != base and not (e.startswith("pysparse") and not recipe)]
    row = {"key": key, "model": model, "batch": batch, "seq": seq, "pattern": pattern, "engines": {}}
    workers, ref = {}, None
    try:
        for e in order:
            res = row["engines"].setdefault(e, {})
            try:
                w = Worker(e, args.threads, log)
                workers[e] = w
                load = w.ask(cmd="load", model=model, cfg=cfg, input=xp, threads=args.threads,
                             weights=None if e == base else wp, recipe=recipe,
                             save_weights=wp if e == base else None)
                if not load.get("ok"):
                    raise RuntimeError(load.get("error"))
                res.update(load_s=load["load_s"], detail=load.get("detail", ""))
                op = str(tmp / f"out_{e}.npy")
                if not w.ask(cmd="output", path=op).get("ok"):
                    raise RuntimeError("no output")
                out = np.load(op)
                if ref is None and e in ("torch", base):
                    ref = out
                if ref is not None:
                    res["max_rel_diff"] = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
            except Exception as exc:  # a peer that cannot run is skipped, with the reason
                res["skipped"] = str(exc)
                if e in workers:
                    workers.pop(e).close()
                if e == base:
                    raise RuntimeError(f"{key}: the {base} engine failed ({exc}); nothing to compare")
                print(f"  {key}: {e} skipped: {exc}", file=sys.stderr, flush=True)
        live = [e for e in order if e in workers]
        rounds = {e: [] for e in live}
        for r in range(args.rounds):
            for e in live[r % len(live):] + live[: r % len(live)]:  # rotate who goes first
                time.sleep(0.2)  # let the previous engine's spinning threads go idle
                t = workers[e].ask(cmd="time", reps=args.reps)["times"]
                rounds[e].append(sorted(t)[len(t) // 2])
        for e in live:
            rs = sorted(rounds[e])
            row["engines"][e].update(median_s=rs[len(rs) // 2], rounds_s=rounds[e])
    finally:
        for w in workers.values():
            w.close()
    return row


def _ms(row, e):
    r = row["engines"].get(e, {})
    return r.get("median_s")


def markdown(rows, engines) -> str:
    cols = [e for e in engines if any(_ms(r, e) for r in rows)]
    head = "| model | batch x seq | pattern | " + " | ".join(LABELS[e] + " ms" for e in cols)
    head += " | pysparse / DeepSparse | pysparse / ORT | spread (pysparse rounds) |"
    lines = [head, "|" + "---|" * 3 + "---:|" * (len(cols) + 3)]
    for r in rows:
        cells = []
        for e in cols:
            t = _ms(r, e)
            cells.append(f"{t * 1e3:.1f}" if t else "-")
        ps = _ms(r, "pysparse") or (_ms(r, "torch") if r["pattern"] == "unpruned" else None)

        def ratio(peer):
            t = _ms(r, peer)
            if not (ps and t):
                return "-"
            q = t / ps
            return f"{q:.2f}x faster" if q >= 1 else f"{1 / q:.2f}x slower"
        rs = r["engines"].get("pysparse", {}).get("rounds_s") or []
        spread = f"{min(rs) * 1e3:.1f}-{max(rs) * 1e3:.1f}" if rs else "-"
        name = "BERT-base encoder" if r["model"] == "bert" else "LLaMA-style 8 layers, decode"
        lines.append(f"| {name} | {r['batch']} x {r['seq']} | {r['pattern']} | " + " | ".join(cells)
                     + f" | {ratio('deepsparse')} | {ratio('ort')} | {spread} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated substrings of config keys, e.g. bert-8x128,llama")
    ap.add_argument("--engines", default=",".join(ALL_ENGINES), help=f"comma-separated subset of {ALL_ENGINES}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "engines.json"))
    ap.add_argument("--log", default=str(ROOT / "benchmarks" / "results" / "engines.log"),
                    help="the workers' stderr (engine banners, tracebacks)")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ALL_ENGINES]
    if bad:
        raise SystemExit(f"bench_engines: unknown engines {bad}; choose from {ALL_ENGINES}")
    only = [s for s in args.only.split(",") if s]
    configs = [c for c in CONFIGS if not only or any(s in c[0] for s in only)]
    if not configs:
        raise SystemExit(f"bench_engines: --only {args.only!r} matches no config of {[c[0] for c in CONFIGS]}")

    import pysparse
    from pysparse.bench import roofline

    info = pysparse.info()
    rf = roofline(args.threads)
    print(f"pysparse {info['pysparse']} | torch {info['torch_runtime']} | {info['cpu_isa_selected']} | "
          f"{args.threads} threads | FMA peak fp32 {rf.fp32_gflops:.0f} GFLOP/s | "
          f"{args.rounds} rounds x {args.reps} calls\n", flush=True)
    rows = []
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "w") as log, tempfile.TemporaryDirectory() as tmp:
        for key, model, cfg, b, s, p, scope in configs:
            print(f"  {key} ...", file=sys.stderr, flush=True)
            rows.append(run_config(key, model, cfg, b, s, p, scope, engines, args, log, Path(tmp)))
            Path(args.json).write_text(json.dumps({"roofline": rf.as_dict(), "info": info, "rows": rows},
                                                  indent=1, default=str))
    print(markdown(rows, engines))
    worst = max((r["engines"][e].get("max_rel_diff", 0) for r in rows for e in r["engines"]), default=0)
    print(f"\noutputs vs torch eager on the same weights: max |diff| / max |ref| = {worst:.1e}")
    for r in rows:
        for e, v in r["engines"].items():
            if "skipped" in v:
                print(f"{r['key']}: {e} skipped: {v['skipped']}")


if __name__ == "__main__":
    main()
