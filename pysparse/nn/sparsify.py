"""``sparsify(model, recipe, calibration=None)``: prune the model's linear layers and swap them for
sparse ones, keeping a layer dense wherever the sparse kernel would not be faster.

A recipe maps module-name patterns (fnmatch, e.g. ``"*.ffn_*"``) to a rule::

    {"*": {"format": "nm", "n": 2, "m": 4, "criterion": "wanda"},
     "layers.0.*": None}                       # None: leave these modules alone

Rule keys: ``format`` ("csr" | "bsr" | "nm"), ``sparsity`` (csr/bsr), ``n``/``m`` (nm),
``blocksize`` (bsr), ``criterion`` ("magnitude" | "wanda": |W| * ||x||, which needs calibration
inputs), ``min_speedup`` (default 1.0: the sparse layer must be at least this much faster than the
dense one at the calibration shape, else the layer stays dense). The last matching pattern wins.
By default the first and the last linear layer of the model are skipped (the most sensitive;
``skip_ends=False`` prunes them too).
"""
from __future__ import annotations

import fnmatch
import time
from typing import Callable, Dict, List, Optional

import torch

from .linear import SparseLinear


def _rule_for(name: str, recipe: Dict[str, Optional[dict]]) -> Optional[dict]:
    rule = None
    for pattern, r in recipe.items():
        if fnmatch.fnmatchcase(name, pattern):
            rule = r
    return rule


def _median_time(fn: Callable[[], torch.Tensor], reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def sparsify(model: torch.nn.Module, recipe: Dict[str, Optional[dict]], calibration: Optional[Callable[[torch.nn.Module], None]] = None,
             *, skip_ends: bool = True, time_layers: bool = True) -> List[dict]:
    """Prune and swap ``model``'s nn.Linear layers in place per ``recipe``; returns the report.

    calibration: a callable that runs the model on representative inputs (e.g.
    ``lambda m: m(ids, mask)``). It is run once with hooks that record, per linear layer, the L2
    norm of every input feature (for ``criterion="wanda"``) and the input shape (for timing).
    Report rows: name, shape, format, sparsity of the stored weight, kernel kept ("sparse" or
    "dense"), dense and sparse time in us at the calibration shape and their ratio.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("sparsify: the model has no nn.Linear layers")
    ends = {linears[0][0], linears[-1][0]} if skip_ends else set()
    stats: Dict[str, dict] = {}
    if calibration is not None:
        def hook(name):
            def record(mod, args, out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                s = stats.setdefault(name, {"sq": torch.zeros(x.shape[1]), "shape": tuple(args[0].shape)})
                s["sq"] += (x * x).sum(0)
            return record
        handles = [m.register_forward_hook(hook(n)) for n, m in linears]
        try:
            calibration(model)
        finally:
            for h in handles:
                h.remove()
    report = []
    for name, lin in linears:
        rule = _rule_for(name, recipe)
        if rule is None or name in ends:
            continue
        rule = dict(rule)
        fmt = rule.pop("format", "csr")
        criterion = rule.pop("criterion", "magnitude")
        min_speedup = float(rule.pop("min_speedup", 1.0))
        if criterion == "wanda":
            if name not in stats:
                raise ValueError(f"sparsify: criterion 'wanda' for {name!r} needs calibration inputs that reach it")
            if fmt != "nm":
                raise ValueError(f"sparsify: criterion 'wanda' is implemented for format 'nm', got {fmt!r} for {name!r}")
            rule["scores"] = lin.weight.detach().abs() * stats[name]["sq"].sqrt()[None, :]
        elif criterion != "magnitude":
            raise ValueError(f"sparsify: criterion must be 'magnitude' or 'wanda', got {criterion!r}")
        sparse = SparseLinear.from_linear(lin, fmt, **rule)
        row = {"name": name, "shape": tuple(lin.weight.shape), "format": sparse.format_name,
               "sparsity": round(1.0 - sparse.weight.to_dense().count_nonzero().item() / lin.weight.numel(), 4)}
        keep_sparse = True
        if time_layers:
            shape = stats.get(name, {}).get("shape", (1, lin.in_features))
            x = torch.randn(shape, dtype=lin.weight.dtype)
            dense = sparse.to_linear()
            t_dense, t_sparse = _median_time(lambda: dense(x)), _median_time(lambda: sparse(x))
            keep_sparse = t_dense / t_sparse >= min_speedup
            row.update(dense_us=round(t_dense * 1e6, 1), sparse_us=round(t_sparse * 1e6, 1),
                       speedup=round(t_dense / t_sparse, 2), timed_shape=tuple(shape))
        # A layer kept dense still carries the pruning (its zeros), so quality is the recipe's.
        replacement = sparse if keep_sparse else sparse.to_linear()
        row["kernel"] = "sparse" if keep_sparse else "dense"
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
        report.append(row)
    return report
