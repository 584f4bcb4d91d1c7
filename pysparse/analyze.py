"""Which layers tolerate pruning: prune one layer at a time and measure how far the output moves.

    model.eval()                          # dropout would add noise to every measurement
    report = pysparse.analyze.sensitivity(model, (x,), levels=(0.5, 0.7, 0.9))
    print(report.table())                 # Markdown: one row per layer, one column per level
    report.suggest(budget=0.01)           # {layer: highest level within the budget}
    report.plot("sensitivity.png")

Each layer is pruned alone, so the numbers rank layers; they do not add up when several layers
are pruned together.

After ``sparsify``, ``profile(model, inputs).table()`` gives what the swap bought: each pysparse
layer's time against the dense layer it equals, and the whole model's against its dense twin.
"""
from __future__ import annotations

import fnmatch
import math
import sys
import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional

import torch
from torch import nn

from . import prune
from .nn.linear import is_conv1d

_P = "pysparse.analyze.sensitivity: "
KINDS = ("unstructured", "block", "nm", "neurons")
_METRIC_TEXT = {"cosine": "1 - mean cosine similarity along the last dim", "relative_l2": "||y - y0|| / ||y0||"}
METRICS = tuple(_METRIC_TEXT)


class SensitivityReport:
    """What sensitivity() measured. rows: one dict per (layer, level) with layer, shape (of the
    weight), level, change (the metric) and max_abs (largest |y - y0|), in model order.
    levels: the table's columns, ascending ("n:m" strings for kind="nm"). skipped: {layer: why}."""

    def __init__(self, rows: List[dict], levels: list, metric: str, kind: str, skipped: Dict[str, str]):
        self.rows, self.levels, self.metric, self.kind, self.skipped = rows, list(levels), metric, kind, skipped

    def _by_layer(self) -> Dict[str, dict]:
        out: Dict[str, dict] = {}
        for r in self.rows:
            out.setdefault(r["layer"], {})[r["level"]] = r
        return out

    def table(self) -> str:
        """Markdown table of the change, one row per layer (model order), one column per level."""
        head = ["layer", "shape"] + [str(lv) for lv in self.levels]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, by in self._by_layer().items():
            shape = "x".join(map(str, by[self.levels[0]]["shape"]))
            lines.append(f"| {name} | {shape} | " + " | ".join(f"{by[lv]['change']:.3g}" for lv in self.levels) + " |")
        lines.append(f"\n{self.kind} pruning of one layer at a time; change = {_METRIC_TEXT[self.metric]}.")
        lines += [f"Skipped {name}: {why}." for name, why in self.skipped.items()]
        return "\n".join(lines)

    _repr_markdown_ = table

    def most_sensitive(self, k: int = 5) -> List[str]:
        """The k layers whose output moves most at the highest level, most sensitive first."""
        top = self.levels[-1]
        by = self._by_layer()
        return sorted(by, key=lambda name: -by[name][top]["change"])[:k]

    def suggest(self, budget: float) -> dict:
        """{layer: the highest level whose change, and that of every lower level, is <= budget},
        0.0 where even the lowest level is over budget. A lower level over budget stops the walk
        because a higher one that passes is measurement noise, not a safe choice."""
        out = {}
        for name, by in self._by_layer().items():
            out[name] = 0.0
            for lv in self.levels:
                if by[lv]["change"] > budget:
                    break
                out[name] = lv
        return out

    def plot(self, path) -> str:
        """Write a PNG of the change per layer (one line per level; bars for a single level)."""
        try:
            # A bare Figure renders with Agg without touching pyplot's global backend, so a
            # notebook's inline plotting keeps working (matplotlib.use("Agg") would switch it off).
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("pysparse.analyze.SensitivityReport.plot needs matplotlib: "
                              "pip install matplotlib") from None
        by = self._by_layer()
        names, x = list(by), list(range(len(by)))
        fig = Figure(figsize=(max(8.0, 0.25 * len(names)), 4.5))
        ax = fig.add_subplot()
        for lv in self.levels:
            ys = [by[name][lv]["change"] for name in names]
            if len(self.levels) == 1:
                ax.bar(x, ys, label=str(lv))
            else:
                ax.plot(x, ys, marker="o", markersize=3, label=str(lv))
        pos = [r["change"] for r in self.rows if r["change"] > 0]
        if pos and max(pos) > 100 * min(pos):
            ax.set_yscale("log")
        ax.set_xticks(x)
        # the tail of a qualified name (layers.11.mlp.fc1) says more than its head
        ax.set_xticklabels([n if len(n) <= 28 else "…" + n[-27:] for n in names], rotation=60, ha="right",
                           fontsize=7)
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel(f"output change: {_METRIC_TEXT[self.metric]}", fontsize=8)
        ax.set_title(f"Output change ({self.metric}) with one layer at a time under {self.kind} pruning")
        ax.legend(title="level")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return str(path)


def _first_tensor(out) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def _output(model, inputs) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        out = model(inputs)
    elif isinstance(inputs, Mapping):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    elif callable(inputs):
        out = inputs(model)
    else:
        raise ValueError(_P + f"inputs must be a tensor, tuple, dict or callable, got {type(inputs).__name__}")
    y = _first_tensor(out)
    if y is None:
        raise ValueError(_P + f"the model's output ({type(out).__name__}) holds no tensor; "
                         "pass inputs=lambda m: <a tensor>")
    # float64 so that 1 - cosine resolves changes far below fp32's epsilon; copy=True because a
    # model may hand back the same buffer on every call
    return y.detach().to(torch.float64, copy=True)


def _change(y: torch.Tensor, y0: torch.Tensor, metric: str):
    d = y - y0
    if metric == "cosine":
        a, b = y.reshape(-1, y.shape[-1] if y.dim() else 1), y0.reshape(-1, y0.shape[-1] if y0.dim() else 1)
        den = a.norm(dim=-1) * b.norm(dim=-1)
        # an unchanged row scores exactly 1 (not 1 - rounding), a zero row 0 unless unchanged
        same = (a == b).all(-1)
        sim = torch.where(same, 1.0, torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), 0.0))
        change = max(0.0, 1.0 - float(sim.mean()))
    else:
        change = float(d.norm() / y0.norm())
    return change, float(d.abs().max())


def _prune(W: torch.Tensor, kind: str, level, n: int, m: int, blocksize) -> torch.Tensor:
    if kind == "unstructured":
        return prune.magnitude(W, level)
    if kind == "block":
        return prune.blocks(W, level, blocksize)
    if kind == "nm":
        return prune.nm(W, n, m)
    drop = W.float().norm(dim=1).topk(round(level * W.shape[0]), largest=False).indices
    out = W.clone()
    out[drop] = 0
    return out


def sensitivity(model: nn.Module, inputs, levels=(0.5, 0.7, 0.9), *, kind: str = "unstructured", layers=None,
                metric: str = "cosine", n: int = 2, m: int = 4, blocksize=(32, 32),
                progress: bool = False) -> SensitivityReport:
    """Prune each nn.Linear / nn.Conv2d / HF Conv1D alone at each level, run the model, measure the
    output change.

    inputs: a tensor or tuple of positional arguments (``model(*inputs)``), a dict of keyword
    arguments, or a callable ``f(model) -> output`` (e.g. ``lambda m: m(ids, mask)``). When the
    output is a tuple, list or dict, its first tensor (depth first) is compared.
    kind: "unstructured" (pysparse.prune.magnitude), "block" (pysparse.prune.blocks with
    `blocksize`; layers whose shape it does not divide are skipped), "nm" (pysparse.prune.nm, n:m
    along the inputs; `levels` is ignored) or "neurons" (zero the `level` fraction of output rows
    with the smallest L2 norm). A Conv2d weight is pruned as its (out, in*kh*kw) matrix.
    layers: fnmatch patterns of qualified module names (default: every Linear and Conv2d).
    metric: "cosine" (1 - mean cosine similarity along the last dim) or "relative_l2".
    The model's mode is left alone: call model.eval() first (dropout adds noise, and batch norm
    in training mode would update its running statistics). Every weight is restored bit for bit,
    also when the forward raises.
    """
    if kind not in KINDS:
        raise ValueError(_P + f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(_P + f"metric must be one of {METRICS}, got {metric!r}")
    if kind == "nm":
        try:  # a zero-width matrix: pysparse.prune.nm checks n and m, and no shape gets in the way
            prune.nm(torch.zeros(1, 0), n, m)
        except ValueError as e:
            raise ValueError(_P + str(e).split(": ", 1)[-1]) from None
        levels = [f"{n}:{m}"]
    else:
        given = levels
        try:
            levels = sorted({float(lv) for lv in ([levels] if isinstance(levels, (int, float)) else levels)})
        except (TypeError, ValueError):
            levels = []
        if not levels or not all(0 <= lv < 1 for lv in levels):
            raise ValueError(_P + f"levels must be a non-empty list of fractions in [0, 1), got {given!r}")
    if kind == "block" and not (isinstance(blocksize, (tuple, list)) and len(blocksize) == 2
                                and all(isinstance(b, int) and b > 0 for b in blocksize)):
        raise ValueError(_P + f"blocksize must be two positive integers, got {blocksize!r}")
    bh, bw = blocksize if kind == "block" else (1, 1)
    patterns = [layers] if isinstance(layers, str) else layers
    mods = [(name, mod) for name, mod in model.named_modules()
            if (isinstance(mod, (nn.Linear, nn.Conv2d)) or is_conv1d(mod))
            and (patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns))]
    if not mods:
        raise ValueError(_P + f"no nn.Linear, nn.Conv2d or Conv1D module matches layers={layers!r}")
    if model.training:
        warnings.warn(_P + "the model is in training mode; call model.eval() so dropout and batch norm do not "
                      "change the measurement", stacklevel=2)

    rows, skipped, done, total, width = [], {}, 0, len(mods) * len(levels), 0
    with torch.no_grad():
        y0 = _output(model, inputs)
        try:
            for name, mod in mods:
                W = mod.weight
                # a Conv1D (GPT-2) stores its weight (in, out): pruned as the (out, in) matrix it is
                t = is_conv1d(mod)
                M, K = (W.shape[1], W.shape[0]) if t else (W.shape[0], math.prod(W.shape[1:]))
                why = (f"shape {M}x{K} is not divisible by the block size {bh}x{bw}"
                       if kind == "block" and (M % bh or K % bw)
                       else f"{K} inputs are not a multiple of m = {m}" if kind == "nm" and K % m else None)
                if why:
                    skipped[name] = why
                    done += len(levels)
                    continue
                saved = W.detach().clone()
                try:
                    for lv in levels:
                        mat = saved.t() if t else saved.reshape(M, K)
                        pruned = _prune(mat, kind, lv, n, m, blocksize)
                        W.copy_(pruned.t() if t else pruned.reshape(W.shape))
                        change, max_abs = _change(_output(model, inputs), y0, metric)
                        rows.append(dict(layer=name, shape=tuple(W.shape), level=lv, change=change, max_abs=max_abs))
                        done += 1
                        if progress:
                            line = f"pysparse.analyze: {done}/{total} {name} @ {lv}"
                            print("\r" + line.ljust(width), end="", file=sys.stderr, flush=True)
                            width = len(line)
                finally:
                    W.copy_(saved)
        finally:
            if progress:
                print(file=sys.stderr, flush=True)
    if not rows:
        raise ValueError(_P + f"no layer could be pruned with kind={kind!r}: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return SensitivityReport(rows, levels, metric, kind, skipped)


# ---------------------------------------------------------------------------------------------
# profile: what the swapped layers gain, per layer and end to end.

class ProfileReport:
    """``rows``: one dict per pysparse layer (name, kind, format, sparse_us, dense_us, speedup);
    ``end_to_end``: the model's ms against the same model with every pysparse layer back to its
    dense (pruned) equivalent, and the speedup."""

    def __init__(self, rows: List[dict], end_to_end: dict):
        self.rows, self.end_to_end = rows, end_to_end

    def table(self) -> str:
        """Markdown: one row per layer, then the whole model."""
        lines = ["| layer | kind | format | sparse us | dense us | speedup |", "|---|---|---|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['name']} | {r['kind']} | {r['format']} | {r['sparse_us']:.1f} | {r['dense_us']:.1f} "
                         f"| {r['speedup']:.2f}x |")
        e = self.end_to_end
        lines.append(f"| **whole model** | | | {e['sparse_ms'] * 1e3:.1f} | {e['dense_ms'] * 1e3:.1f} | "
                     f"**{e['speedup']:.2f}x** |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dict(rows=self.rows, end_to_end=self.end_to_end)


def _run(model, inputs):
    """model on inputs: a tensor, a tuple of positional arguments, a dict of keyword arguments, or
    a callable f(model)."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if callable(inputs):
        return inputs(model)
    raise ValueError(f"pysparse.analyze.profile: inputs must be a tensor, tuple, dict or callable, got "
                     f"{type(inputs).__name__}")


@torch.no_grad()
def profile(model: nn.Module, inputs, *, rounds: int = 5, reps: int = 3) -> ProfileReport:
    """The latency of `model` (after ``sparsify``) on `inputs` against the same model with every
    pysparse layer (SparseLinear, SparseConv2d) back to the dense layer it equals, end to end and
    per layer (each layer on the input it receives in this forward), timed in alternating rounds
    (``pysparse.bench.alternating``: medians, so a busy moment hits both sides alike)."""
    import copy

    from .bench import alternating
    from .nn import SparseConv2d, SparseLinear

    dense_of = lambda m: m.to_linear() if isinstance(m, SparseLinear) else m.to_conv()  # noqa: E731
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    if not layers:
        raise ValueError("pysparse.analyze.profile: the model has no pysparse layers (SparseLinear, SparseConv2d): "
                         "run pysparse.sparsify first")
    seen: Dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: seen.setdefault(name, args)) for n, m in layers]
    try:
        _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, mod in layers:
        if name not in seen:
            continue  # not on this input's path
        args, dense = seen[name], dense_of(mod)
        sparse_s, dense_s = alternating(lambda: mod(*args), lambda: dense(*args), rounds=rounds, reps=reps)
        rows.append(dict(name=name, kind="linear" if isinstance(mod, SparseLinear) else "conv",
                         format=mod.format_name, sparse_us=sparse_s * 1e6, dense_us=dense_s * 1e6,
                         speedup=dense_s / sparse_s))
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            twin.set_submodule(name, dense_of(mod))
    sparse_s, dense_s = alternating(lambda: _run(model, inputs), lambda: _run(twin, inputs), rounds=rounds, reps=reps)
    return ProfileReport(rows, dict(sparse_ms=sparse_s * 1e3, dense_ms=dense_s * 1e3, speedup=dense_s / sparse_s))
