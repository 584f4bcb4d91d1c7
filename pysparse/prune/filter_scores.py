"""Filter-pruning criteria: one score per prunable channel of each coupled group, and which
channels to remove (the scoring part of `pysparse.prune.filters`)."""
from __future__ import annotations

import math
from typing import Dict, List, Set

import torch
from torch import nn

from .channels import PREFIX, ChannelGroup, Channels, SlicedLayer

#: The criteria of `pysparse.prune.filters` (its docstring gives each formula).
CRITERIA = ("l1", "l2", "bn", "geometric_median", "taylor")


def taylor_scores(model: nn.Module, recs: List[SlicedLayer], calibration) -> Dict[str, torch.Tensor]:
    """Criterion "taylor": |sum of activation * gradient| per output channel of each layer, over all
    positions, samples and calibration losses: the first-order Taylor estimate of the loss change
    when the channel is zeroed (not squared: sparsify's and Iterative's "fisher" square it)."""
    calls = [calibration] if callable(calibration) else list(calibration)
    acc: Dict[str, torch.Tensor] = {}

    def hook(name):
        def forward_hook(module, inputs, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                a = out.detach().clone()  # a later in-place op (ReLU(inplace=True)) must not change it

                def backward_hook(grad):
                    prod = (a * grad).double()
                    v = prod.sum([d for d in range(prod.dim()) if d != 1])
                    acc[name] = acc[name] + v if name in acc else v
                out.register_hook(backward_hook)
        return forward_hook

    state = {k: v.clone() for k, v in model.state_dict().items()}  # train-mode BN stats change
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = [(m, m.training) for m in model.modules()]
    handles = [r.module.register_forward_hook(hook(r.name)) for r in recs]
    try:
        with torch.enable_grad():
            for p in flags:
                p.requires_grad_(True)
            for f in calls:
                loss = f(model)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ValueError(PREFIX + "each calibration callable must return a scalar loss computed with the model")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.load_state_dict(state)
        for m, t in modes:
            m.training = t
    if recs and not acc:
        raise ValueError(PREFIX + "calibration produced no gradient at the pruned layers")
    return {k: v.abs() for k, v in acc.items()}


def channel_scores(ch: Channels, groups: List[ChannelGroup], criterion: str, calibration,
                   model) -> List[List[float]]:
    """Per group, one score per unit: the sum of its channels' scores over the group's layers.
    "bn" and "taylor" read the group's BatchNorms, or its convs/Linears when it has none."""
    where: Dict[int, tuple] = {}
    for gi, g in enumerate(groups):
        for ui, r in enumerate(g.units):
            where[r] = (gi, ui)
    has_bn = {where[ch.find(e)][0] for r in ch.recs.values() if r.kind == "bn" for e in r.out}
    by_bn = criterion in ("bn", "taylor")

    def wanted(rec, e):
        gi = where[ch.find(e)][0]
        return not groups[gi].reason and (not by_bn or (gi in has_bn) == (rec.kind == "bn"))

    used = [r for r in ch.recs.values() if r.kind not in ("ln", "param") and (by_bn or r.kind != "bn")
            and any(wanted(r, e) for e in r.out)]  # LayerNorms and layer scales do not score
    taylor = taylor_scores(model, used, calibration) if criterion == "taylor" else {}
    scores = [[0.0] * len(g.units) for g in groups]
    for rec in used:
        if criterion == "taylor":
            s = taylor.get(rec.name, torch.zeros(len(rec.out), dtype=torch.float64))
        elif rec.kind == "bn":
            s = rec.module.weight.detach().abs() if rec.module.weight is not None else torch.ones(len(rec.out))
        else:
            w = rec.module.weight.detach().flatten(1)
            if criterion == "l2":
                s = w.norm(dim=1, dtype=torch.float64)
            elif criterion == "geometric_median":
                w = w.double()
                s = torch.cdist(w, w).sum(1)  # FPGM: near the others' geometric median = redundant
            else:  # "l1", and "bn" for groups without a BatchNorm
                s = w.abs().sum(1, dtype=torch.float64)
        for e, v in zip(rec.out, s.tolist()):
            if wanted(rec, e):
                gi, ui = where[ch.find(e)]
                scores[gi][ui] += v
    return scores


def select_channels(groups: List[ChannelGroup], scores: List[List[float]], ratio: float, scope: str,
                    min_channels) -> Set[int]:
    """The units (union-find roots) to remove: `ratio` of each group (scope "local") or of all
    groups ranked together after dividing each group's scores by their mean ("global"), every
    group keeping at least max(min_channels, 1)."""
    removable, candidates, total, pruned = {}, [], 0, set()
    for gi, g in enumerate(groups):
        if g.reason:
            continue
        n = len(g.units)
        keep = math.ceil(min_channels * n) if isinstance(min_channels, float) else min_channels
        removable[gi] = max(0, n - max(1, keep))
        s = scores[gi]
        if scope == "local":
            order = sorted(range(n), key=lambda u: (s[u], u))
            pruned.update(g.units[u] for u in order[:min(removable[gi], math.floor(ratio * n + 0.5))])
            continue
        mean = sum(s) / n
        candidates += [(v / mean if mean > 0 else v, gi, u) for u, v in enumerate(s)]
        total += n
    budget = math.floor(ratio * total + 0.5)
    for _, gi, u in sorted(candidates):
        if budget == 0:
            break
        if removable[gi] > 0:
            removable[gi] -= 1
            budget -= 1
            pruned.add(groups[gi].units[u])
    return pruned

