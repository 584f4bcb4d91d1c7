"""Compare two runs of the CPU benchmark sweeps (folders holding spmm.csv, nm_spmm.csv,
masked_attention.csv, pruned_ffn.csv as the bench_*.py scripts write them), case by case: the
ratio new/old of each case's speedup over its yardstick, summarised per benchmark. Used to show
that a change moved no speed when both runs were made on the same machine in one session.

    PYTHONPATH=. .venv/bin/python benchmarks/compare_runs.py OLD_DIR NEW_DIR
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

# (columns naming a case, the speedup compared) per benchmark
SPECS = {
    "spmm": (["shape", "pattern", "sparsity", "format", "index_dtypes", "dtype", "mode", "n"], "x_vs_dense_fp32"),
    "nm_spmm": (["shape", "dtype", "mode", "n"], "x_vs_dense_fp32"),
    "masked_attention": (["shape", "mask", "block_size"], "x_vs_sdpa_mask"),
    "pruned_ffn": (["block", "variant", "info", "n", "mode"], "x_vs_torch"),
}


def _load(path: Path, keys, column):
    rows = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            try:
                rows[tuple(r[c] for c in keys)] = float(r[column])
            except (KeyError, ValueError):
                pass  # a case without that speedup (e.g. no peer)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    args = p.parse_args()
    print("| benchmark | cases | speedup new / old: median | geomean | 10th..90th percentile | min..max |")
    print("|---|---:|---:|---:|---|---|")
    for name, (keys, column) in SPECS.items():
        if not (args.old / f"{name}.csv").exists() or not (args.new / f"{name}.csv").exists():
            continue
        old, new = _load(args.old / f"{name}.csv", keys, column), _load(args.new / f"{name}.csv", keys, column)
        rel = sorted(new[k] / old[k] for k in new if k in old and old[k] > 0 and new[k] > 0)
        if not rel:
            continue
        pct = lambda f: rel[min(len(rel) - 1, int(f * len(rel)))]  # noqa: E731
        print(f"| {name} ({column}) | {len(rel)} | {statistics.median(rel):.3f} | {statistics.geometric_mean(rel):.3f} | "
              f"{pct(0.1):.2f}..{pct(0.9):.2f} | {rel[0]:.2f}..{rel[-1]:.2f} |")


if __name__ == "__main__":
    main()
