"""sparsify's weight stage: every nn.Linear / nn.Conv2d (and Hugging Face Conv1D, as the
nn.Linear it equals) a weight rule matches is pruned (csr, bsr
or nm, by magnitude, Wanda or Fisher scores, or by SparseGPT, which also updates the kept
weights), then timed as its format, as CSR and as the dense pruned layer; the fastest that beats
dense at every tuned shape replaces it."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ... import prune
from .. import kernel_choice
from ...prune import structured as st
from ..conv import SparseConv2d
from ..linear import SparseLinear, is_conv1d, linear_from_conv1d
from . import calibration as cal
from .recipe import criterion_of, progress, rule_for

WEIGHT_CRITERIA = {
    "magnitude": "|W|",
    "wanda": "|W| * ||x||, x the layer's calibration inputs",
    "fisher": "(w dL/dw)^2 summed over calibration batches",
    "sparsegpt": "SparseGPT: OBS saliency from the layer's input Hessian, the kept weights updated "
                 "(nn.Linear; layers in model order, each calibrated on the already pruned ones)",
}


def apply_weights(model, recipe, calibration, *, skip_ends: bool, time_layers: bool,
                  shapes: Optional[Sequence[int]], cache: bool, show_progress: bool, report) -> None:
    """Prune and swap every linear / conv a weight rule matches (the first and last of the model
    left alone with skip_ends, and entered in report.skipped); appends one report row per layer."""
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or is_conv1d(m)]
    if not linears:
        raise ValueError("sparsify: the model has no nn.Linear, nn.Conv2d or Conv1D layers")
    ends = {linears[0][0], linears[-1][0]} if skip_ends else set()
    for n, where in ((linears[0][0], "first"), (linears[-1][0], "last")):
        if n in ends and rule_for(n, recipe, "weight") is not None:
            report.skipped[n] = (f"the model's {where} linear-like layer, kept as it was (skip_ends=True: the ends are "
                                 f"the most sensitive; skip_ends=False prunes them too)")
    for n, m in model.named_modules():  # no silent skip: 3-D expert weights have no sparse kernel
        if st.expert_parts(m) is not None and rule_for(n, recipe, "weight") is not None:
            report.skipped[n] = ("mixture-of-experts weights stored as 3-D tensors: no sparse format takes them; a "
                                 "\"neurons\" rule prunes them (per expert)")
    # A Conv1D a rule matches becomes the nn.Linear it equals (marked: save_sparse records it), and
    # goes the linears' way from here on.
    for i, (n, m) in enumerate(linears):
        if is_conv1d(m) and n not in ends and rule_for(n, recipe, "weight") is not None:
            linears[i] = (n, linear_from_conv1d(m))
            model.set_submodule(n, linears[i][1])
    linears = [(n, m) for n, m in linears if not is_conv1d(m)]
    todo = [(n, m, rule_for(n, recipe, "weight")) for n, m in linears]
    todo = [(n, m, r) for n, m, r in todo if r is not None and n not in ends]
    stats = cal.record(model, linears, {}, calibration) if calibration is not None else cal.Stats()
    wf = {n: m for n, m, r in todo if criterion_of(r) == "fisher"}
    for crit in ("fisher", "sparsegpt"):
        needs = [n for n, m, r in todo if criterion_of(r) == crit]
        if needs and calibration is None:
            raise ValueError(f"sparsify: criterion {crit!r} for {needs[0]!r} needs calibration inputs")
    for alloc, why in (("owl", "its outliers are those of |W| * ||x||"),
                       ("sensitivity", "it measures the output change each layer's pruning makes")):
        needs = [n for n, m, r in todo if r.get("allocation") == alloc]
        if needs and calibration is None:
            raise ValueError(f"sparsify: allocation {alloc!r} for {needs[0]!r} needs calibration inputs ({why})")
    fisher = cal.fisher_scores(model, calibration, {}, wf)[1] if wf else {}
    scores = {name: _weight_scores(name, lin, rule, stats, fisher) for name, lin, rule in todo}
    sparsity = {**_global_sparsity(todo, scores), **_owl_sparsity(todo, stats),
                **_sensitivity_sparsity(model, todo, calibration)}
    later_sparsegpt = [n for n, m, r in todo if criterion_of(r) == "sparsegpt"]
    hessians: Dict[str, torch.Tensor] = {}  # siblings' Hessians from the last SparseGPT pass (_sparsegpt)
    for name, lin, rule in progress(todo, "sparsify: layers", show_progress):
        crit = criterion_of(rule)
        rule = dict(rule)
        fmt = rule.pop("format", "csr")
        rule.pop("criterion", None)
        for key in ("scope", "allocation", "spread", "owl_m"):
            rule.pop(key, None)
        min_speedup = float(rule.pop("min_speedup", 1.0))
        kernel = rule.pop("kernel", "auto")  # checked with the recipe (recipe.check)
        if name in sparsity:
            rule["sparsity"] = sparsity[name]
        if crit == "sparsegpt":
            later_sparsegpt.remove(name)
            rule = _sparsegpt(model, name, lin, fmt, rule, calibration, hessians, later_sparsegpt)
        else:
            hessians.clear()  # this layer's pruning may reach what they saw
        if scores[name] is not None:
            rule["scores"] = scores[name]
            if fmt != "nm":
                rule = _prune_by_scores(lin, fmt, rule)
        conv = isinstance(lin, torch.nn.Conv2d)
        if conv:
            rule.pop("index_dtype", None)
            sparse = SparseConv2d.from_conv(lin, fmt, **rule)
            dense = sparse.to_conv()
        else:
            sparse = SparseLinear.from_linear(lin, fmt, **rule)
            dense = sparse.to_linear()
        nnz = dense.weight.count_nonzero().item()
        row = {"name": name, "kind": "conv" if conv else "linear", "shape": tuple(lin.weight.shape), "format": sparse.format_name,
               "sparsity": round(1.0 - nnz / lin.weight.numel(), 4)}
        choice = sparse
        if kernel == "dense":
            choice = dense
        elif time_layers and kernel == "auto":
            choice = _choose(name, sparse, dense, stats, shapes, min_speedup, cache, row)
        row["kernel"] = "dense" if choice is dense else choice.format_name
        # A layer kept dense still carries the pruning (its zeros), so quality is the recipe's; the
        # mark lets pysparse.recover train its kept weights with the zeros held.
        if choice is dense:
            dense._pysparse_pruned = True
        if getattr(lin, "_pysparse_conv1d", False):
            choice._pysparse_conv1d = True
        model.set_submodule(name, choice)
        report.append(row)


def _weight_scores(name, lin, rule, stats, fisher) -> Optional[torch.Tensor]:
    """Importance of every weight under the rule's criterion (None: magnitude, the format's own)."""
    criterion = criterion_of(rule)
    if criterion == "wanda":
        return _wanda(name, lin, stats)
    if criterion == "fisher":
        return fisher[name]
    if criterion == "sparsegpt":
        if isinstance(lin, torch.nn.Conv2d):
            raise ValueError(f"sparsify: criterion 'sparsegpt' is for nn.Linear layers; {name!r} is an nn.Conv2d")
        return None  # the mask comes with the weight update, layer by layer (_sparsegpt)
    if criterion != "magnitude":
        raise ValueError("sparsify: criterion must be 'magnitude', 'wanda', 'fisher' or 'sparsegpt' ("
                         + "; ".join(f"{c}: {f}" for c, f in WEIGHT_CRITERIA.items()) + f"), got {criterion!r}")
    return None


def _sparsegpt(model, name: str, lin: torch.nn.Linear, fmt: str, rule: dict, calibration,
               hessians: Dict[str, torch.Tensor], later: List[str]) -> dict:
    """Prune `lin` in place by SparseGPT with the Hessian of the inputs it receives in the model
    as pruned so far; the rule, left to store the zeros as they are. hessians: what the last pass
    recorded for the siblings it found among the `later` SparseGPT layers (their shared input is
    unchanged while only they are pruned); a layer not there gets a fresh pass, which replaces them."""
    H = hessians.pop(name, None)
    if H is None:
        hessians.clear()
        hessians.update(cal.input_hessians(model, [name] + later, calibration))
        H = hessians.pop(name, None)
    if H is None:
        raise ValueError(f"sparsify: criterion 'sparsegpt' for {name!r} needs calibration inputs that reach it")
    if fmt == "nm":
        kw = {"n": int(rule.get("n", 2)), "m": int(rule.get("m", 4))}
    else:
        kw = {"sparsity": float(rule.pop("sparsity", 0.0))}
        if fmt == "bsr":
            kw["blocksize"] = tuple(rule.get("blocksize", (32, 32)))
    with torch.no_grad():
        lin.weight.copy_(prune.sparsegpt(lin.weight, H, **kw))
    return rule


def _global_sparsity(todo, scores) -> Dict[str, float]:
    """Per-layer sparsity for rules with scope "global": one threshold over the scores of every
    layer the rule matches, so the rule's sparsity holds over all of them together and each
    layer loses what falls under it (magnitude: |W|, comparable across layers only when their
    scales are; Wanda and Fisher scores are in loss/output units)."""
    groups: Dict[int, list] = {}
    for name, lin, rule in todo:
        if rule.get("scope") == "global":
            if rule.get("format", "csr") != "csr":
                raise ValueError(f"sparsify: scope 'global' for {name!r} needs format 'csr' (N:M and blocks are "
                                 f"ranked within their groups and blocks)")
            groups.setdefault(id(rule), []).append((name, lin, rule))
    out = {}
    for members in groups.values():
        flat = torch.cat([(scores[n] if scores[n] is not None else lin.weight.detach().abs()).float().flatten()
                          for n, lin, _ in members])
        drop = round(float(members[0][2].get("sparsity", 0.0)) * flat.numel())
        if drop == 0:
            continue
        thr = flat.kthvalue(drop).values
        for n, lin, _ in members:
            sc = (scores[n] if scores[n] is not None else lin.weight.detach().abs()).float()
            out[n] = (sc <= thr).float().mean().item()
    return out


def _wanda(name, lin, stats, what: str = "criterion 'wanda'") -> torch.Tensor:
    """|W| * ||x|| (a conv's weight against its input channels' norms); errors say `what` asked."""
    if name not in stats.sq:
        raise ValueError(f"sparsify: {what} for {name!r} needs calibration inputs that reach it")
    norms = stats.sq[name].sqrt()
    if isinstance(lin, torch.nn.Conv2d):
        if lin.groups != 1:
            raise ValueError(f"sparsify: {what} for {name!r} needs a conv with groups=1")
        return lin.weight.detach().abs() * norms[None, :, None, None]  # one norm per input channel
    return lin.weight.detach().abs() * norms[None, :]


def _rule_groups(todo, allocation: str) -> List[list]:
    """The (name, layer, rule) entries of todo whose rule asks for `allocation`, one list per rule
    (a rule spreads its sparsity over the layers it matches)."""
    groups: Dict[int, list] = {}
    for name, lin, rule in todo:
        if rule.get("allocation") == allocation:
            groups.setdefault(id(rule), []).append((name, lin, rule))
    return list(groups.values())


def _block_of(name: str) -> str:
    """The layer's block: its name up to the first numbered part ("encoder.layer.3.attention.q"
    and "layers.3.ffn.0" -> their layer 3), or the name itself where no part is a number."""
    parts = name.split(".")
    nums = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[:nums[0] + 1]) if nums else name


def _owl_sparsity(todo, stats) -> Dict[str, float]:
    """Per-layer sparsity for rules with allocation "owl" (outlier-weighted layerwise sparsity,
    Yin et al. 2023). As in OWL, the unit is a block (the layers under one numbered module, such as
    a transformer layer: the first number in their names; a layer alone where its name has none): a block's outlier ratio is
    the share of its layers' |W| * ||x|| scores above owl_m times their mean; the ratios, scaled to
    [0, 2 spread], raise the kept share of the blocks with more outliers, shifted so that the
    rule's sparsity holds over its layers weighted by their sizes (clipped to [0, 0.999])."""
    out = {}
    for members in _rule_groups(todo, "owl"):
        rule = members[0][2]
        target, lam, m = float(rule["sparsity"]), float(rule.get("spread", 0.08)), float(rule.get("owl_m", 5.0))
        blocks: Dict[str, list] = {}
        for name, lin, _ in members:
            blocks.setdefault(_block_of(name), []).append((name, lin))
        ratios, sizes = [], []
        for layers in blocks.values():
            outliers = total = 0
            for name, lin in layers:
                sc = _wanda(name, lin, stats, "allocation 'owl'").float()
                outliers += int((sc > m * sc.mean()).sum())
                total += sc.numel()
            ratios.append(outliers / total)
            sizes.append(total)
        r, w = torch.tensor(ratios, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)
        spread = r.max() - r.min()
        keep = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
        keep = keep - (keep * w).sum() / w.sum() + (1.0 - target)
        for layers, k in zip(blocks.values(), keep.tolist()):
            for name, _ in layers:
                out[name] = min(max(1.0 - k, 0.0), 0.999)
    return out


def _sensitivity_sparsity(model, todo, calibration, steps: int = 4) -> Dict[str, float]:
    """Per-layer sparsity for rules with allocation "sensitivity": each layer alone is pruned (by
    magnitude) at sparsities on a grid of `steps` intervals over target +- spread and the change
    of the model's output on the first calibration batch measured (pysparse.analyze.sensitivity,
    relative L2); then, from every layer at the grid's low end, the step with the smallest output
    change per pruned weight is taken, again and again, until the rule's sparsity holds over its
    layers weighted by size (the last step taken in part to land on it). Changes are assumed to
    add up across layers, as in any per-layer allocation."""
    from ...analyze import sensitivity  # not at the top: pysparse.analyze imports pysparse.nn

    out: Dict[str, float] = {}
    groups = _rule_groups(todo, "sensitivity")
    if not groups:
        return out
    first = cal.calls(calibration)[0]
    for members in groups:
        rule = members[0][2]
        target, spread = float(rule["sparsity"]), float(rule.get("spread", 0.08))
        lo, hi = max(0.0, target - spread), min(0.99, target + spread)
        grid = [lo + (hi - lo) * i / steps for i in range(steps + 1)]
        names = [n for n, _, _ in members]
        was = model.training  # measured without dropout (and restored)
        model.eval()
        try:
            rep = sensitivity(model, first, grid, layers=names, metric="relative_l2")
        finally:
            model.train(was)
        change = {(r["layer"], r["level"]): r["change"] for r in rep.rows}
        sizes = {n: lin.weight.numel() for n, lin, _ in members}
        level = {n: 0 for n in names}  # grid index of each layer
        need = (target - lo) * sum(sizes.values())  # weights still to prune beyond the low end
        frac = {n: 0.0 for n in names}
        while need > 1e-9:
            movable = [n for n in names if level[n] < steps]
            if not movable:
                break
            cost = {n: (change[(n, grid[level[n] + 1])] - change[(n, grid[level[n]])]) /
                    (sizes[n] * (grid[level[n] + 1] - grid[level[n]])) for n in movable}
            n = min(movable, key=lambda k: (cost[k], names.index(k)))
            step_w = sizes[n] * (grid[level[n] + 1] - grid[level[n]])
            if step_w >= need:
                frac[n] = need / step_w
                need = 0.0
            else:
                level[n] += 1
                need -= step_w
        for n in names:
            s = grid[level[n]]
            if frac[n]:
                s += frac[n] * (grid[level[n] + 1] - grid[level[n]])
            out[n] = s
    return out


def _prune_by_scores(lin: torch.nn.Linear, fmt: str, rule: dict) -> dict:
    """CSR/BSR with a score criterion: zero by score here, then store the zeros as the format."""
    W = lin.weight.detach()
    scores = rule.pop("scores").float().reshape(W.shape[0], -1)  # a conv's weight as its (Cout, K) matrix
    if fmt == "csr":
        mask = prune.magnitude(scores, rule.pop("sparsity", 0.0)) != 0
    elif fmt == "bsr":
        bs = rule.get("blocksize", (32, 32))
        mask = prune.blocks(scores, rule.pop("sparsity", 0.0), bs) != 0
    else:
        raise ValueError(f"sparsify: format must be 'csr', 'bsr' or 'nm', got {fmt!r}")
    with torch.no_grad():
        lin.weight.mul_(mask.reshape(W.shape).to(W.dtype))
    return rule


def _candidates(sparse, dense) -> Dict[str, torch.nn.Module]:
    """The stored format, CSR (which holds any zero pattern), and the dense pruned layer."""
    out = {sparse.format_name: sparse}
    if sparse.format_name != "csr":
        out["csr"] = (SparseConv2d.from_conv(dense, "csr") if isinstance(dense, torch.nn.Conv2d)
                      else SparseLinear.from_linear(dense, "csr"))
    out["dense"] = dense
    return out


def _choose(name, sparse, dense, stats, shapes, min_speedup, cache, row):
    """Time the candidates at each tuned shape (through ``kernel_choice``'s cache); keep the fastest one
    that beats dense by min_speedup at every shape (by geometric-mean speedup among those), else
    dense. Fills the row's times_us, cached and speedup."""
    calib = stats.shape.get(name)
    dt = dense.weight.dtype
    density = 1.0 - row["sparsity"]
    shape_key = "x".join(map(str, dense.weight.shape))
    if isinstance(dense, torch.nn.Conv2d):
        # A conv is timed at its calibration input (batch and spatial size matter, not tokens).
        if calib is None:
            row["times_us"], row["cached"] = None, False
            return sparse  # nothing to time it at: the requested format is kept (report says untimed)
        inputs = {calib[0]: (tuple(calib), f"{dt}|conv {shape_key} s{dense.stride} p{dense.padding} "
                                           f"in {'x'.join(map(str, calib))}|{sparse.format_name}|{density:.2f}")}
    else:
        lead = int(torch.Size(calib[:-1]).numel()) if calib else 1
        inputs = {t: ((t, dense.in_features), f"{dt}|{shape_key}|{sparse.format_name}|{density:.2f}|b{kernel_choice.bucket(t)}")
                  for t in ([int(t) for t in shapes] if shapes else [lead])}
    cands = _candidates(sparse, dense)
    speed: Dict[str, List[float]] = {k: [] for k in cands if k != "dense"}
    row["times_us"], row["cached"] = {}, True
    for tokens, (shape, key) in inputs.items():
        x = torch.randn(shape, dtype=dt)
        times, hit = kernel_choice.time_candidates(key, {k: (lambda m=m: m(x)) for k, m in cands.items()}, use_cache=cache)
        row["cached"] &= hit
        row["times_us"][tokens] = {k: round(v * 1e6, 1) for k, v in times.items()}
        for k in speed:
            speed[k].append(times["dense"] / times[k])
    ok = {k: v for k, v in speed.items() if min(v) >= min_speedup}
    row["speedup"] = round(max((min(v) for v in speed.values()), default=1.0), 2)
    if not ok:
        return dense
    best = max(ok, key=lambda k: sum(map(float, torch.tensor(ok[k]).log().tolist())))
    row["speedup"] = round(min(ok[best]), 2)
    return cands[best]
