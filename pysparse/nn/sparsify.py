"""``sparsify(model, recipe, calibration=None)``: prune a model and swap in sparse layers, keeping a
layer dense wherever no sparse kernel is faster on this machine.

A recipe maps module-name patterns (fnmatch: ``*`` matches across dots) to a rule, or to None to
leave the matching modules alone::

    {"layers.*": {"heads": 0.25, "neurons": 0.4, "criterion": "activation", "reconstruct": True},
     "*.ffn_*": {"format": "nm", "n": 2, "m": 4, "criterion": "wanda"},
     "layers.5": {"drop": True},
     "layers.0.*": None}

Structured rules (on attention / feed-forward modules, see ``pysparse.prune.structured``):
``heads`` (fraction of attention heads, or key/value groups, removed), ``neurons`` (fraction of FFN
intermediate neurons removed), ``drop`` (the module becomes a passthrough), ``criterion``
("magnitude" | "activation" | "taylor" | "entropy" (heads only)), ``scope`` ("local" | "global":
rank units across every module the rule matches), ``reconstruct`` (refit the output projection by
least squares so the pruned block reproduces the dense block's output on the calibration inputs).
Weight rules (on nn.Linear and nn.Conv2d, a conv's weight pruned as its (Cout, Cin*kh*kw)
matrix and swapped for ``SparseConv2d``): ``format`` ("csr" | "bsr" | "nm"), ``sparsity``, ``n``/``m``,
``blocksize``, ``criterion`` ("magnitude" | "wanda": |W| * ||x|| | "taylor": (w dL/dw)^2 summed
over calibration batches), ``scope`` ("local" | "global": csr only, one threshold over every
linear the rule matches), ``kernel`` ("auto" | "sparse" | "dense"), ``min_speedup`` (default 1.0).
For each module, the last matching pattern wins among the rules that apply to it (weight rules
for linears; for heads, the rules that set ``heads``; for neurons, those that set ``neurons``). By default the first and last nn.Linear / nn.Conv2d
of the model are skipped (the most sensitive; ``skip_ends=False`` prunes them too).

Calibration is a callable ``f(model)`` (or a list of them, one per batch) that runs the model on
representative inputs. Criteria "activation", "entropy", "wanda" and ``reconstruct`` record
activations through hooks; "taylor" needs ``f`` to return a scalar loss, which is back-propagated.
For a model without labels, a random projection of the output (``(model(x) * r).sum()`` with a
fresh Gaussian ``r``) makes the Taylor scores the expected squared first-order output change.
"""
from __future__ import annotations

import copy
import fnmatch
import sys
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..prune import structured as st
from . import _choice
from .conv import SparseConv2d
from .linear import SparseLinear

_STRUCT_KEYS = {"heads", "neurons", "drop", "reconstruct"}  # "scope" and "criterion" belong to both kinds
_WEIGHT_KEYS = {"format", "sparsity", "n", "m", "blocksize", "kernel", "min_speedup"}
Calibration = Union[Callable[[torch.nn.Module], object], Sequence[Callable[[torch.nn.Module], object]]]


def _kind(rule: Optional[dict]) -> Optional[str]:
    if rule is None:
        return None
    keys = set(rule)
    if keys & _STRUCT_KEYS and keys & _WEIGHT_KEYS:
        raise ValueError(f"sparsify: a rule mixes structured keys {sorted(keys & _STRUCT_KEYS)} with weight keys "
                         f"{sorted(keys & _WEIGHT_KEYS)}; give them separate patterns")
    return "struct" if keys & _STRUCT_KEYS else "weight"


def _rule_for(name: str, recipe: Dict[str, Optional[dict]], kind: str) -> Optional[dict]:
    """The last matching rule of this kind (a matching None clears it)."""
    rule = None
    for pattern, r in recipe.items():
        if fnmatch.fnmatchcase(name, pattern) and (r is None or _kind(r) == kind):
            rule = r
    return rule


def _progress(items: list, desc: str, enabled: bool):
    for i, item in enumerate(items):
        if enabled:
            sys.stderr.write(f"\r{desc}: {i + 1}/{len(items)}")
            sys.stderr.flush()
        yield item
    if enabled and items:
        sys.stderr.write("\n")


class _Stats:
    """Everything one calibration pass records."""

    def __init__(self):
        self.sq: Dict[str, torch.Tensor] = {}        # linear name -> sum of x^2 per input feature
        self.shape: Dict[str, tuple] = {}            # linear name -> input shape of the last call
        self.unit: Dict[str, torch.Tensor] = {}      # struct key -> activation score per unit
        self.entropy: Dict[str, torch.Tensor] = {}


def _record(model, linears, structs, calibration) -> _Stats:
    """One no-grad pass: per-feature input norms and shapes of every linear, per-unit output
    contributions of the structured modules, attention entropies where asked."""
    s = _Stats()
    handles = []

    def lin_hook(name):
        def f(mod, args, out):
            x = args[0].detach().float()
            # per input feature: the last dim of a linear's input, the channel dim of a conv's
            # ((N,) C, H, W); summed in place of a transposed copy
            x = x.unsqueeze(0) if x.dim() == 1 else x
            feat = x.dim() - 3 if isinstance(mod, torch.nn.Conv2d) else x.dim() - 1
            s.sq[name] = s.sq.get(name, 0) + x.square().sum([d for d in range(x.dim()) if d != feat])
            s.shape[name] = tuple(args[0].shape)
        return f
    handles += [m.register_forward_hook(lin_hook(n)) for n, m in linears]

    for key, (what, parts, rule) in structs.items():
        if what == "heads":
            def attn_hook(mod, args, key=key, p=parts):
                x = args[0].detach().reshape(-1, p.o.in_features).float()
                w = p.o.weight.detach().float()
                g = p.unit_width
                sc = torch.stack([(x[:, u * g:(u + 1) * g] @ w[:, u * g:(u + 1) * g].T).square().sum()
                                  for u in range(p.units)])
                s.unit[key] = s.unit.get(key, 0) + sc.double()
            handles.append(parts.o.register_forward_pre_hook(attn_hook))
            if rule.get("criterion") == "entropy":
                handles += _entropy_hooks(parts, key, s)
        elif what == "neurons":
            def ffn_hook(mod, args, key=key):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s.unit[key] = s.unit.get(key, 0) + x.square().sum(0)
            handles.append(parts.down.register_forward_pre_hook(ffn_hook))
    _run(model, calibration, handles)
    for key, (what, parts, _) in structs.items():
        if what == "neurons" and key in s.unit:
            s.unit[key] = s.unit[key] * parts.down.weight.detach().double().square().sum(0)
    return s


def _entropy_hooks(p: st.AttentionParts, key: str, s: _Stats):
    """Mean entropy of each head's attention rows, from the q and k projections (every key of the
    calibration sequence counts, padding included: calibrate on unpadded batches)."""
    cache = {}

    def q_hook(mod, args, out):
        cache["q"] = out.detach().float()

    def k_hook(mod, args, out):
        q, k = cache.pop("q"), out.detach().float()
        B, L = q.shape[0], q.shape[-2] if q.dim() == 3 else 1
        q = q.reshape(B, L, p.heads, p.head_dim).transpose(1, 2)
        k = k.reshape(B, L, p.kv_heads, p.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / p.head_dim ** 0.5, dim=-1)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        s.entropy[key] = s.entropy.get(key, 0) + ent.double()
    return [p.q.register_forward_hook(q_hook), p.k.register_forward_hook(k_hook)]


def _calls(calibration: Calibration):
    return list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]


def _run(model, calibration: Calibration, hooks: list) -> None:
    """Run every calibration call on `model` without grad, then remove `hooks` (also on error)."""
    try:
        for f in _calls(calibration):
            with torch.no_grad():
                f(model)
    finally:
        for h in hooks:
            h.remove()


def _taylor(model, calibration, units: Dict[str, tuple], weights: Dict[str, torch.nn.Module]):
    """First-order Taylor importance, squared and summed over calibration tokens (Fisher form).

    Units: the input x of the output projection (o-proj / down-proj) is watched; removing unit j
    at one token changes the loss by about -sum_{c in j} x_c dL/dx_c, whose square is summed over
    tokens. Weights: (w dL/dw)^2 summed over calibration calls."""
    unit_scores: Dict[str, torch.Tensor] = {}
    weight_scores: Dict[str, torch.Tensor] = {}
    handles = []
    for key, (lin, n_units, width) in units.items():  # (output projection, units, columns per unit)
        def pre(mod, args, key=key, units=n_units, width=width):
            x = args[0]
            if x.requires_grad:
                def on_grad(g, x=x.detach()):
                    t = (x * g).reshape(-1, units, width).sum(-1).double().square().sum(0)
                    unit_scores[key] = unit_scores.get(key, 0) + t
                x.register_hook(on_grad)
        handles.append(lin.register_forward_pre_hook(pre))
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    # Only the scored weights need gradients; with none (unit scores) the watched activations
    # need a path to the loss, so every parameter requires grad (their .grad is cleared after).
    for p in params:
        p.requires_grad_(not weights)
    for lin in weights.values():
        lin.weight.requires_grad_(True)
    try:
        for f in _calls(calibration):
            with torch.enable_grad():
                loss = f(model)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                    raise ValueError("sparsify: criterion 'taylor' needs calibration callables that return a scalar "
                                     "loss computed from the model's output")
                loss.backward()
            for n, lin in weights.items():
                t = (lin.weight.detach() * lin.weight.grad).double().square()
                weight_scores[n] = weight_scores.get(n, 0) + t
                lin.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, req):
            p.requires_grad_(r)
            p.grad = None
    return unit_scores, weight_scores


def _reconstruct(model, ref, name: str, residual: Optional[str], calibration, ridge: float = 1e-3) -> None:
    """Refit the Linear `name` of `model` (bias included) by ridge least squares on the calibration
    inputs, given the pruned model's own inputs to it. Target: the same Linear's output in the
    dense reference model; with `residual` (the Linear whose input is the block's residual, in
    post-norm blocks) the target is dense residual + dense output - pruned residual, so the fit
    also absorbs the error that earlier pruned layers left in the residual stream."""
    lin, dense = model.get_submodule(name), ref.get_submodule(name)
    targets: List[torch.Tensor] = []
    flat = lambda t: t.detach().reshape(-1, t.shape[-1]).double()  # noqa: E731
    hooks = [dense.register_forward_hook(lambda m, a, out: targets.append(flat(out)))]
    if residual:
        res_in: List[torch.Tensor] = []
        hooks.append(ref.get_submodule(residual).register_forward_pre_hook(lambda m, a: res_in.append(flat(a[0]))))
    _run(ref, calibration, hooks)
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
    _run(model, calibration, hooks)
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
    crit = rule.get("criterion", "magnitude")
    if crit == "magnitude":
        return st.head_scores_magnitude(p) if what == "heads" else st.neuron_scores_magnitude(p)
    if crit == "taylor":
        watch = (p.o, p.units, p.unit_width) if what == "heads" else (p.down, p.down.in_features, 1)
        return _taylor(model, calibration, {key: watch}, {})[0][key]
    stats = _record(model, [], {key: entry}, calibration)
    if crit == "activation":
        return stats.unit[key]
    # entropy: heads whose attention is closest to uniform (highest entropy) go first
    return -stats.entropy[key].view(p.units, -1).mean(1)


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _apply_structure(model, recipe, calibration, progress, report) -> None:
    """Heads, neurons and dropped layers, in model order (each reconstruction sees the already
    pruned layers before it)."""
    structs: Dict[str, tuple] = {}   # key "name:heads" | "name:neurons" -> (what, parts, rule)
    drops = []
    for name, mod in model.named_modules():
        rule = _rule_for(name, recipe, "struct") if name else None
        if rule is None:
            continue
        if rule.get("drop"):
            drops.append(name)
            continue
        for what, parts in (("heads", st.attention_parts(mod)), ("neurons", st.ffn_parts(mod))):
            r = _rule_for(name, {k: v for k, v in recipe.items() if v is None or what in v}, "struct")
            if r is not None and r.get(what) and parts is not None:
                structs[f"{name}:{what}"] = (what, parts, r)
    wanted = {w for r in recipe.values() if r for w in ("heads", "neurons") if r.get(w)}
    for w in sorted(wanted):
        if not any(v[0] == w for v in structs.values()):
            raise ValueError(f"sparsify: the recipe prunes {w} but no module matching its pattern is a recognised "
                             f"{'attention' if w == 'heads' else 'feed-forward'} module")
    for key, (what, parts, rule) in structs.items():
        if not 0.0 <= float(rule[what]) < 1.0:
            raise ValueError(f"sparsify: {what} for {key.split(':')[0]!r} must be a fraction in [0, 1), got {rule[what]}")
        crit = rule.get("criterion", "magnitude")
        allowed = ("magnitude", "activation", "taylor") + (("entropy",) if what == "heads" else ())
        if crit not in allowed:
            raise ValueError(f"sparsify: criterion for {what} must be one of {allowed}, got {crit!r}")
        if crit == "entropy" and parts.rotary:
            raise ValueError(f"sparsify: criterion 'entropy' for {key.split(':')[0]!r}: the attention probabilities of "
                             f"rotary (LLaMA-style) modules are not visible to hooks; use 'taylor' or 'activation'")
        if (crit != "magnitude" or rule.get("reconstruct")) and calibration is None:
            raise ValueError(f"sparsify: criterion {crit!r} / reconstruct for {key.split(':')[0]!r} needs calibration inputs")
    ref = copy.deepcopy(model) if any(r.get("reconstruct") for _, _, r in structs.values()) else None

    for key, (what, p, rule) in structs.items():
        if rule.get("scope", "local") not in ("local", "global"):
            raise ValueError(f"sparsify: scope must be 'local' or 'global', got {rule['scope']!r}")
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

    for key in _progress(list(structs), "sparsify: structured pruning", progress):
        what, p, rule = structs[key]
        name = key.split(":")[0]
        mod = model.get_submodule(name)
        p = st.attention_parts(mod) if what == "heads" else st.ffn_parts(mod)  # current projections
        if key not in keep:
            keep[key] = st.top_units(_unit_scores(model, key, (what, p, rule), calibration), float(rule[what]))
        if what == "heads":
            before = (p.heads, p.q.in_features)
            st.prune_heads(mod, keep[key])
            after = st.attention_parts(mod)
            target = _name_of(model, after.o)
            residual = _name_of(model, after.q) if after.residual_is_input else None
            row = {"name": name, "kind": "heads", "shape": f"{before[0]} heads", "after": f"{after.heads} heads"}
        else:
            before = p.down.in_features
            st.prune_neurons(mod, torch.tensor(keep[key]))
            after = st.ffn_parts(mod)
            target = _name_of(model, after.down)
            residual = _name_of(model, after.up) if after.residual_is_input else None
            row = {"name": name, "kind": "neurons", "shape": f"{before} neurons", "after": f"{after.down.in_features} neurons"}
        if rule.get("reconstruct"):
            _reconstruct(model, ref, target, residual, calibration)
        row.update(criterion=rule.get("criterion", "magnitude"), reconstructed=bool(rule.get("reconstruct")))
        report.append(row)
    for name in drops:
        model.set_submodule(name, st.Passthrough(type(model.get_submodule(name)).__name__))
        report.append({"name": name, "kind": "drop", "shape": "layer", "after": "passthrough"})


def _candidates(sparse, dense) -> Dict[str, torch.nn.Module]:
    """The stored format, CSR (which holds any zero pattern), and the dense pruned layer."""
    out = {sparse.format_name: sparse}
    if sparse.format_name != "csr":
        out["csr"] = (SparseConv2d.from_conv(dense, "csr") if isinstance(dense, torch.nn.Conv2d)
                      else SparseLinear.from_linear(dense, "csr"))
    out["dense"] = dense
    return out


@torch.no_grad()
def sparsify(model: torch.nn.Module, recipe: Dict[str, Optional[dict]], calibration: Optional[Calibration] = None,
             *, skip_ends: bool = True, time_layers: bool = True, shapes: Optional[Sequence[int]] = None,
             cache: bool = True, progress: Optional[bool] = None) -> List[dict]:
    """Prune ``model`` per ``recipe`` and swap its nn.Linear layers for the fastest kernel, in place;
    returns the report (one dict per changed module).

    Structured pruning (heads, neurons, layers) runs first, then weight pruning. Each pruned linear
    is timed (``time_layers``) as its stored format, as CSR and as the dense pruned layer, at the
    token counts in ``shapes`` (default: the calibration shape, else 1 token); the fastest that
    beats dense by ``min_speedup`` at every shape is kept, else the layer stays a dense (pruned)
    nn.Linear: a swapped layer is never slower than dense at the shapes it was tuned for. Timings
    are cached on disk (see ``pysparse.nn._choice``; ``cache=False`` re-times). ``progress``: a
    progress line on stderr (default: when stderr is a terminal).
    Report rows: name, kind ("heads" | "neurons" | "drop" | "linear"), shape before/after and, for
    linears and convs, format, sparsity, kernel kept, times in us per candidate at each shape
    (convs: at their calibration input; untimed without calibration), speedup.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    for pattern, rule in recipe.items():
        if rule is not None and not isinstance(rule, dict):
            raise ValueError(f"sparsify: the rule for {pattern!r} must be a dict or None, got {type(rule).__name__}")
        _kind(rule)
    report: List[dict] = []
    if any(_kind(r) == "struct" for r in recipe.values()):
        _apply_structure(model, recipe, calibration, progress, report)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    weight_rules = any(_kind(r) == "weight" for r in recipe.values())
    if not weight_rules:
        return report
    if not linears:
        raise ValueError("sparsify: the model has no nn.Linear or nn.Conv2d layers")
    ends = {linears[0][0], linears[-1][0]} if skip_ends else set()
    todo = [(n, m, _rule_for(n, recipe, "weight")) for n, m in linears]
    todo = [(n, m, r) for n, m, r in todo if r is not None and n not in ends]
    stats = _record(model, linears, {}, calibration) if calibration is not None else _Stats()
    wt = {n: m for n, m, r in todo if r.get("criterion") == "taylor"}
    if wt and calibration is None:
        raise ValueError(f"sparsify: criterion 'taylor' for {next(iter(wt))!r} needs calibration inputs")
    taylor = _taylor(model, calibration, {}, wt)[1] if wt else {}
    scores = {name: _weight_scores(name, lin, rule, stats, taylor) for name, lin, rule in todo}
    sparsity = _global_sparsity(todo, scores)
    for name, lin, rule in _progress(todo, "sparsify: layers", progress):
        rule = dict(rule)
        fmt = rule.pop("format", "csr")
        rule.pop("criterion", None)
        rule.pop("scope", None)
        min_speedup = float(rule.pop("min_speedup", 1.0))
        kernel = rule.pop("kernel", "auto")
        if kernel not in ("auto", "sparse", "dense"):
            raise ValueError(f"sparsify: kernel must be 'auto', 'sparse' or 'dense', got {kernel!r}")
        if name in sparsity:
            rule["sparsity"] = sparsity[name]
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
        # A layer kept dense still carries the pruning (its zeros), so quality is the recipe's.
        model.set_submodule(name, choice)
        report.append(row)
    return report


def _weight_scores(name, lin, rule, stats, taylor) -> Optional[torch.Tensor]:
    """Importance of every weight under the rule's criterion (None: magnitude, the format's own)."""
    criterion = rule.get("criterion", "magnitude")
    if criterion == "wanda":
        if name not in stats.sq:
            raise ValueError(f"sparsify: criterion 'wanda' for {name!r} needs calibration inputs that reach it")
        norms = stats.sq[name].sqrt()
        if isinstance(lin, torch.nn.Conv2d):
            if lin.groups != 1:
                raise ValueError(f"sparsify: criterion 'wanda' for {name!r} needs a conv with groups=1")
            return lin.weight.detach().abs() * norms[None, :, None, None]  # one norm per input channel
        return lin.weight.detach().abs() * norms[None, :]
    if criterion == "taylor":
        return taylor[name]
    if criterion != "magnitude":
        raise ValueError(f"sparsify: criterion must be 'magnitude', 'wanda' or 'taylor', got {criterion!r}")
    return None


def _global_sparsity(todo, scores) -> Dict[str, float]:
    """Per-layer sparsity for rules with scope "global": one threshold over the scores of every
    layer the rule matches, so the rule's sparsity holds over all of them together and each
    layer loses what falls under it (magnitude: |W|, comparable across layers only when their
    scales are; Wanda and Taylor scores are in loss/output units)."""
    groups: Dict[int, list] = {}
    for name, lin, rule in todo:
        scope = rule.get("scope", "local")
        if scope not in ("local", "global"):
            raise ValueError(f"sparsify: scope must be 'local' or 'global', got {scope!r}")
        if scope == "global":
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


def _prune_by_scores(lin: torch.nn.Linear, fmt: str, rule: dict) -> dict:
    """CSR/BSR with a score criterion: zero by score here, then store the zeros as the format."""
    from .. import prune

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


def _choose(name, sparse, dense, stats, shapes, min_speedup, cache, row):
    """Time the candidates at each tuned shape; keep the fastest one that beats dense by
    min_speedup at every shape (by geometric-mean speedup among those), else dense."""
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
        inputs = {t: ((t, dense.in_features), f"{dt}|{shape_key}|{sparse.format_name}|{density:.2f}|b{_choice.bucket(t)}")
                  for t in ([int(t) for t in shapes] if shapes else [lead])}
    cands = _candidates(sparse, dense)
    speed: Dict[str, List[float]] = {k: [] for k in cands if k != "dense"}
    row["times_us"], row["cached"] = {}, True
    for tokens, (shape, key) in inputs.items():
        x = torch.randn(shape, dtype=dt)
        times, hit = _choice.time_candidates(key, {k: (lambda m=m: m(x)) for k, m in cands.items()}, use_cache=cache)
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
