"""sparsify's report: the list of changes it always was, plus the layers it left alone and why,
and a table with totals for people (the command line prints it)."""
from __future__ import annotations

import math
from typing import Dict


class SparsifyReport(list):
    """One dict per changed module (list items, as before), and ``skipped``: {module name: why}
    for the layers a weight rule matched that sparsify left as they were (the model's first and
    last linear-like layers under ``skip_ends``)."""

    def __init__(self):
        super().__init__()
        self.skipped: Dict[str, str] = {}

    def table(self) -> str:
        """The changes as a text table, the totals of the weight rules and the skipped layers."""
        lines = [f"{'module':40s} {'kind':8s} {'shape':>14s}  change"]
        swapped = dense = 0
        weights = kept = 0.0
        for r in self:
            shape = r.get("shape")
            shape_s = "x".join(str(d) for d in shape) if isinstance(shape, tuple) else str(shape)
            if "format" in r:
                numel = math.prod(shape) if isinstance(shape, tuple) else 0
                weights += numel
                kept += numel * (1.0 - r.get("sparsity", 0.0))
                on_sparse = r.get("kernel") not in (None, "dense")
                swapped += on_sparse
                dense += not on_sparse
                speed = f", {r['speedup']:.2f}x dense" if isinstance(r.get("speedup"), (int, float)) else ""
                change = (f"{r['format']} at {r.get('sparsity', 0.0):.0%} sparsity, "
                          f"{'runs ' + str(r.get('kernel')) if on_sparse else 'kept dense (pruned)'}{speed}")
            else:
                change = f"-> {r.get('after', '?')}"
            lines.append(f"{r.get('name', '?'):40s} {r.get('kind', '?'):8s} {shape_s:>14s}  {change}")
        if weights:
            lines.append(f"weight rules: {swapped + dense} layers pruned ({swapped} on sparse kernels, {dense} dense), "
                         f"{kept / weights:.1%} of their {int(weights):,} weights kept")
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)
