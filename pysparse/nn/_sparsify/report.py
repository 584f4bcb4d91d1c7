"""sparsify's report: the list of changes it always was, plus the layers it left alone and why,
and a table with totals for people (the command line prints it)."""
from __future__ import annotations

import json
import math
from typing import Dict


class SparsifyReport(list):
    """One dict per changed module (list items, as before), and ``skipped``: {module name: why}
    for the layers a rule matched that sparsify left as they were (the model's first and last
    linear-like layers under ``skip_ends``, ``ignore`` and ``filter_fn``); ``totals()``,
    ``table()`` (text) and ``to_json()``."""

    def __init__(self):
        super().__init__()
        self.skipped: Dict[str, str] = {}

    def totals(self) -> Dict[str, float]:
        """Of the layers the weight rules changed: how many (on sparse kernels, kept dense), their
        weights and the fraction kept; and how many structured changes, faster activations and
        skipped layers."""
        t = dict(layers=0, on_sparse_kernels=0, kept_dense=0, weights=0, weights_kept=0.0,
                 structured_changes=sum(r.get("kind") in ("heads", "neurons", "drop") for r in self),
                 activations=sum(r.get("kind") == "activation" for r in self), skipped=len(self.skipped))
        for r in self:
            if "format" in r:
                shape = r.get("shape")
                numel = math.prod(shape) if isinstance(shape, tuple) else 0
                on_sparse = r.get("kernel") not in (None, "dense")
                t["layers"] += 1
                t["on_sparse_kernels" if on_sparse else "kept_dense"] += 1
                t["weights"] += numel
                t["weights_kept"] += numel * (1.0 - r.get("sparsity", 0.0))
        t["fraction_kept"] = t["weights_kept"] / t["weights"] if t["weights"] else 1.0
        return t

    def to_json(self, **kwargs) -> str:
        """The report as JSON: {"changes": rows, "skipped": {name: why}, "totals": totals()}."""
        return json.dumps(dict(changes=list(self), skipped=self.skipped, totals=self.totals()), default=str, **kwargs)

    def table(self) -> str:
        """The changes as a text table, the totals of the weight rules and the skipped layers."""
        lines = [f"{'module':40s} {'kind':8s} {'shape':>14s}  change"]
        for r in self:
            shape = r.get("shape")
            shape_s = "x".join(str(d) for d in shape) if isinstance(shape, tuple) else str(shape)
            if "format" in r:
                on_sparse = r.get("kernel") not in (None, "dense")
                speed = f", {r['speedup']:.2f}x dense" if isinstance(r.get("speedup"), (int, float)) else ""
                change = (f"{r['format']} at {r.get('sparsity', 0.0):.0%} sparsity, "
                          f"{'runs ' + str(r.get('kernel')) if on_sparse else 'kept dense (pruned)'}{speed}")
            else:
                change = f"-> {r.get('after', '?')}"
            lines.append(f"{r.get('name', '?'):40s} {r.get('kind', '?'):8s} {shape_s:>14s}  {change}")
        t = self.totals()
        if t["weights"]:
            lines.append(f"weight rules: {t['layers']} layers pruned ({t['on_sparse_kernels']} on sparse kernels, "
                         f"{t['kept_dense']} dense), {t['fraction_kept']:.1%} of their {int(t['weights']):,} weights kept")
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)
