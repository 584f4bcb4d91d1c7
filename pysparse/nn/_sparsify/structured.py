"""sparsify's structured stage: attention heads, FFN neurons and whole layers removed, in model
order, each pruned block optionally refitted by least squares against the dense model."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch

from ...prune import structured as st
from . import calibration as cal
from .recipe import criterion_of, progress, rule_for

UNIT_CRITERIA = {
    "magnitude": "L2 norm of the unit's weights",
    "activation": "the unit's output contribution ||x_j W_j^T||^2 on the calibration inputs",
    "fisher": "(sum_{c in unit} x_c dL/dx_c)^2 summed over calibration tokens",
    "entropy": "mean attention entropy (heads only; the most uniform go first)",
}


def reconstruct(model, ref, name: str, residual: Optional[str], calibration, ridge: float = 1e-3) -> None:
    """Refit the Linear `name` of `model` (bias included) by ridge least squares on the calibration
    inputs, given the pruned model's own inputs to it. Target: the same Linear's output in the
    dense reference model; with `residual` (the Linear whose input is the block's residual, in
    post-norm blocks) the target is dense residual + dense output - pruned residual, so the fit
    also absorbs the error that earlier pruned layers left in the residual stream."""
    lin, dense = model.get_submodule(name), ref.get_submodule(name)
    targets: List[torch.Tensor] = []

    def flat(t):
        return t.detach().reshape(-1, t.shape[-1]).double()
    hooks = [dense.register_forward_hook(lambda m, a, out: targets.append(flat(out)))]
    if residual:
        res_in: List[torch.Tensor] = []
        hooks.append(ref.get_submodule(residual).register_forward_pre_hook(lambda m, a: res_in.append(flat(a[0]))))
    cal.run(ref, calibration, hooks)
    if residual:
        targets = [t + r for t, r in zip(targets, res_in)]
    k = lin.in_features
    G = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    C = torch.zeros(k + 1, lin.out_features, dtype=torch.float64)
    it, cur = iter(targets), {}

    def acc(mod, args):
        x = flat(args[0])
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        y = next(it) - cur.pop("res") if residual else next(it)
        G.add_(x.T @ x)
        C.add_(x.T @ y)
    hooks = [lin.register_forward_pre_hook(acc)]
    if residual:
        hooks.append(model.get_submodule(residual).register_forward_pre_hook(lambda m, a: cur.__setitem__("res", flat(a[0]))))
    cal.run(model, calibration, hooks)
    G.diagonal().add_(ridge * G.diagonal().mean())
    if lin.bias is None:  # no bias to absorb the mean: refit without the constant column
        G, C = G[:-1, :-1], C[:-1]
    sol = torch.linalg.solve(G, C)
    with torch.no_grad():
        lin.weight.copy_(sol[:k].T)
        if lin.bias is not None:
            lin.bias.copy_(sol[k])


def _unit_scores(model, key: str, entry: tuple, calibration) -> torch.Tensor:
    """Importance of each unit of one structured module under its rule's criterion."""
    what, p, rule = entry
    crit = criterion_of(rule)
    if crit == "magnitude":
        return st.head_scores_magnitude(p) if what == "heads" else st.neuron_scores_magnitude(p)
    if crit == "fisher":
        watch = (p.o, p.units, p.unit_width) if what == "heads" else (p.down, p.down.in_features, 1)
        return cal.fisher_scores(model, calibration, {key: watch}, {})[0][key]
    stats = cal.record(model, [], {key: entry}, calibration)
    if crit == "activation":
        return stats.unit[key]
    # entropy: heads whose attention is closest to uniform (highest entropy) go first
    return -stats.entropy[key].view(p.units, -1).mean(1)


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


# Class-name words of modules a heads / neurons rule must not pass over silently.
_LOOKS_LIKE = {"heads": ("attention",), "neurons": ("mlp", "feedforward", "ffn")}
_EXPECTED = {"heads": "separate q/k/v/output projections with a head size, or GPT-2 / Phi-3 / GPT-NeoX fused ones",
             "neurons": "an up (and gate) projection into the intermediate neurons and a down projection out of them"}


def _refuse_unknown(model, recipe) -> None:
    """A module a heads (neurons) rule matches whose class name says attention (MLP) but which no
    layout of pysparse.prune.structured recognises, in itself, above or below, is a ValueError
    naming it: a rule never skips a block silently."""
    known = {"heads": [], "neurons": []}
    for name, mod in model.named_modules():
        if st.attention_parts(mod) is not None:
            known["heads"].append(name)
        if st.ffn_parts(mod) is not None or st.expert_parts(mod) is not None:
            known["neurons"].append(name)
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        for what, words in _LOOKS_LIKE.items():
            if not name or not any(w in cls.lower() for w in words):
                continue
            rule = rule_for(name, {k: v for k, v in recipe.items() if v is None or what in v}, "struct")
            if rule is None or not rule.get(what):
                continue
            if any(k == name or k.startswith(name + ".") or name.startswith(k + ".") for k in known[what]):
                continue
            raise ValueError(f"sparsify: the {what} rule matches {name!r} ({cls}), whose layout pysparse.prune.structured "
                             f"does not recognise (expected {_EXPECTED[what]}); narrow the rule's pattern or leave the "
                             f"module out with ignore=[{name!r}]")


def _structs(model, recipe, calibration):
    """{key "name:heads" | "name:neurons": (what, parts, rule)} and the names of dropped layers,
    with every rule checked."""
    structs: Dict[str, tuple] = {}
    drops = []
    for name, mod in model.named_modules():
        rule = rule_for(name, recipe, "struct") if name else None
        if rule is None:
            continue
        if rule.get("drop"):
            drops.append(name)
            continue
        of = {what: rule_for(name, {k: v for k, v in recipe.items() if v is None or what in v}, "struct")
              for what in ("heads", "neurons")}
        if of["neurons"] is not None and of["neurons"].get("neurons"):
            st.linear_conv1d_ffn(mod)  # GPT-2's Conv1D MLP and attention, as the linears they equal
        if of["heads"] is not None and of["heads"].get("heads"):
            st.linear_conv1d_attention(mod)
        experts = mod if st.expert_parts(mod) is not None else None  # 3-D experts: neurons per expert
        for what, unit, parts in (("heads", "heads", st.attention_parts(mod)), ("neurons", "neurons", st.ffn_parts(mod)),
                                  ("experts", "neurons", experts)):
            r = of[unit]
            if r is not None and r.get(unit) and parts is not None:
                structs[f"{name}:{unit}"] = (what, parts, r)
    _refuse_unknown(model, recipe)
    wanted = {w for r in recipe.values() if r for w in ("heads", "neurons") if r.get(w)}
    for w in sorted(wanted):
        if not any(v[0] == w or (w, v[0]) == ("neurons", "experts") for v in structs.values()):
            raise ValueError(f"sparsify: the recipe prunes {w} but no module matching its pattern is a recognised "
                             f"{'attention' if w == 'heads' else 'feed-forward'} module")
    for key, (what, parts, rule) in structs.items():
        crit = criterion_of(rule)
        if what == "experts":
            if crit != "magnitude" or rule.get("reconstruct") or rule.get("scope") == "global":
                raise ValueError(f"sparsify: neurons of the 3-D experts of {key.split(':')[0]!r} are chosen by magnitude, "
                                 f"locally, without reconstruct (their inputs are routed inside the module, out of "
                                 f"hooks' reach); got criterion {crit!r}, scope {rule.get('scope', 'local')!r}, "
                                 f"reconstruct {bool(rule.get('reconstruct'))}")
            continue
        allowed = tuple(c for c in UNIT_CRITERIA if what == "heads" or c != "entropy")
        if crit not in allowed:
            raise ValueError(f"sparsify: criterion for {what} must be one of {allowed} ("
                             + "; ".join(f"{c}: {UNIT_CRITERIA[c]}" for c in allowed) + f"), got {crit!r}")
        if crit == "entropy" and (parts.rotary or parts.extras or
                                  hasattr(model.get_submodule(key.split(":")[0]), "key_value_proj_dim")):
            why = "rotary (LLaMA-style) modules" if parts.rotary else "modules with a position bias (T5, Swin)"
            raise ValueError(f"sparsify: criterion 'entropy' for {key.split(':')[0]!r}: the attention probabilities of "
                             f"{why} are not visible to hooks; use 'fisher' or 'activation'")
        if (crit != "magnitude" or rule.get("reconstruct")) and calibration is None:
            raise ValueError(f"sparsify: criterion {crit!r} / reconstruct for {key.split(':')[0]!r} needs calibration inputs")
    return structs, drops


def apply_structure(model, recipe, calibration, show_progress: bool, report: List[dict]) -> None:
    """Heads, neurons and dropped layers, in model order (each reconstruction sees the already
    pruned layers before it); appends one report row per changed module."""
    structs, drops = _structs(model, recipe, calibration)
    if any(w == "heads" and hasattr(model.get_submodule(k.split(":")[0]), "key_value_proj_dim") for k, (w, _, _) in
           structs.items()):
        st.t5_own_position_bias(model)  # T5: each layer its own position bias, so layers can keep different heads
    ref = copy.deepcopy(model) if any(r.get("reconstruct") for _, _, r in structs.values()) else None

    # Global scope ranks the units of every module a rule matches together, so their scores come
    # from one pass over the unpruned model. Local scores are taken just before each module is
    # pruned, on the model as pruned (and reconstructed) so far, so later layers adapt to earlier ones.
    keep: Dict[str, List[int]] = {}
    groups: Dict[tuple, List[str]] = {}
    for key, (what, p, rule) in structs.items():
        if rule.get("scope") == "global":
            groups.setdefault((id(rule), what), []).append(key)
    for (_, what), group in groups.items():
        scores = {k: _unit_scores(model, k, structs[k], calibration) for k in group}
        ratio = float(structs[group[0]][2][what])
        flat = torch.cat([scores[k] for k in group])
        owner = torch.cat([torch.full((scores[k].numel(),), i) for i, k in enumerate(group)])
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.topk(flat, max(len(group), round(flat.numel() * (1 - ratio)))).indices] = True
        for i, k in enumerate(group):
            sel = chosen[owner == i].nonzero().flatten().tolist()
            keep[k] = sel or [int(scores[k].argmax())]  # every module keeps at least one unit

    for key in progress(list(structs), "sparsify: structured pruning", show_progress):
        what, p, rule = structs[key]
        name = key.split(":")[0]
        mod = model.get_submodule(name)
        if what == "experts":
            scores = st.expert_scores_magnitude(mod)
            n = scores.shape[1]
            # a multiple of 8 neurons: transformers' grouped matmul wants 16-byte strides
            k = min(n, -(-max(1, round(n * (1.0 - float(rule["neurons"])))) // 8) * 8)
            st.shrink_experts(mod, torch.topk(scores, k, dim=1).indices)
            report.append({"name": name, "kind": "neurons", "shape": f"{scores.shape[0]} experts x {n} neurons",
                           "after": f"{scores.shape[0]} experts x {k} neurons", "criterion": "magnitude",
                           "reconstructed": False})
            continue
        p = st.attention_parts(mod) if what == "heads" else st.ffn_parts(mod)  # current projections
        if key not in keep:
            keep[key] = st.top_units(_unit_scores(model, key, (what, p, rule), calibration), float(rule[what]))
        if what == "heads":
            before = (p.heads, p.q.in_features)
            st.shrink_attention(mod, keep[key])
            after = st.attention_parts(mod)
            target = _name_of(model, after.o)
            residual = _name_of(model, after.q) if after.residual_is_input else None
            row = {"name": name, "kind": "heads", "shape": f"{before[0]} heads", "after": f"{after.heads} heads"}
        else:
            before = p.down.in_features
            st.shrink_ffn(mod, torch.tensor(keep[key]))
            after = st.ffn_parts(mod)
            target = _name_of(model, after.down)
            residual = _name_of(model, after.up) if after.residual_is_input else None
            row = {"name": name, "kind": "neurons", "shape": f"{before} neurons", "after": f"{after.down.in_features} neurons"}
        if rule.get("reconstruct"):
            reconstruct(model, ref, target, residual, calibration)
        row.update(criterion=criterion_of(rule), reconstructed=bool(rule.get("reconstruct")))
        report.append(row)
    for name in drops:
        model.set_submodule(name, st.Passthrough(type(model.get_submodule(name)).__name__))
        report.append({"name": name, "kind": "drop", "shape": "layer", "after": "passthrough"})
