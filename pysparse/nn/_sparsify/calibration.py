"""What sparsify learns from the calibration inputs: input norms and shapes of the linears,
per-unit output contributions and attention entropies of the structured modules (one no-grad pass
through hooks), and the gradient-based "fisher" scores (a backward pass per calibration call)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ... import prune
from ...prune import structured as st
from .recipe import Calibration


class Stats:
    """Everything one calibration pass records."""

    def __init__(self):
        self.sq: Dict[str, torch.Tensor] = {}        # linear name -> sum of x^2 per input feature
        self.shape: Dict[str, tuple] = {}            # linear name -> input shape of the last call
        self.unit: Dict[str, torch.Tensor] = {}      # struct key -> activation score per unit
        self.entropy: Dict[str, torch.Tensor] = {}


def record(model, linears, structs, calibration) -> Stats:
    """One no-grad pass: per-feature input norms and shapes of every linear, per-unit output
    contributions of the structured modules, attention entropies where asked.

    linears: [(name, nn.Linear | nn.Conv2d)]; structs: {key: (what, parts, rule)}, what "heads" or
    "neurons" and parts from ``pysparse.prune.structured``."""
    s = Stats()
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
    run(model, calibration, handles)
    for key, (what, parts, _) in structs.items():
        if what == "neurons" and key in s.unit:
            s.unit[key] = s.unit[key] * parts.down.weight.detach().double().square().sum(0)
    return s


def _entropy_hooks(p: st.AttentionParts, key: str, s: Stats):
    """Mean entropy of each head's attention rows, from the q and k projections (every key of the
    calibration sequence counts, padding included: calibrate on unpadded batches)."""
    cache = {}

    def q_hook(mod, args, out):
        cache["q"] = p.split(out.detach().float(), "q")

    def k_hook(mod, args, out):
        q, k = cache.pop("q"), p.split(out.detach().float(), "k")
        B = q.shape[0]
        Lq, Lk = (q.shape[-2], k.shape[-2]) if q.dim() == 3 else (1, 1)  # cross-attention: keys of another length
        q = q.reshape(B, Lq, p.heads, p.head_dim).transpose(1, 2)
        k = k.reshape(B, Lk, p.kv_heads, p.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / p.head_dim ** 0.5, dim=-1)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        s.entropy[key] = s.entropy.get(key, 0) + ent.double()
    return [p.q.register_forward_hook(q_hook), p.k.register_forward_hook(k_hook)]  # fused: q is k, in that order


def _batch_call(batch, where: str):
    """One batch as a callable f(model): a callable as it is; a tensor -> model(x); a tuple or list
    -> model(*batch) (positional arguments, as a DataLoader yields them); a mapping -> model(**batch)
    (keyword arguments: a tokenizer's BatchEncoding)."""
    if callable(batch) and not isinstance(batch, torch.nn.Module):
        return batch
    if isinstance(batch, torch.Tensor):
        return lambda m: m(batch)
    if isinstance(batch, (tuple, list)):
        return lambda m: m(*batch)
    if isinstance(batch, Mapping):
        return lambda m: m(**batch)
    raise ValueError(f"sparsify: calibration {where} is a {type(batch).__name__}; a batch is a callable f(model), a "
                     f"tensor (model(x)), a tuple of positional arguments or a dict of keyword arguments")


def calls(calibration: Calibration) -> list:
    """The calibration as callables, one per batch. Calibration is one batch (a callable, a
    tensor, a dict, or a tuple of positional arguments) or a list, DataLoader or other iterable of
    batches. A list of tensors whose later ones look like the first one's attention mask (same
    shape, 0/1, the first holding token ids) is refused: one batch's (ids, mask) passed as a list
    would run as two batches, the mask read as ids."""
    if isinstance(calibration, tuple) and calibration and all(callable(c) for c in calibration):
        return list(calibration)  # callables given as a tuple: one per batch
    if callable(calibration) or isinstance(calibration, (torch.Tensor, tuple, Mapping)):
        return [_batch_call(calibration, "")]
    try:
        batches = list(calibration)
    except TypeError:
        raise ValueError(f"sparsify: calibration must be a batch (a callable f(model), a tensor, a tuple of "
                         f"positional arguments, a dict of keyword arguments) or an iterable of them, got "
                         f"{type(calibration).__name__}") from None
    if (isinstance(calibration, list) and len(batches) > 1 and all(isinstance(b, torch.Tensor) for b in batches)
            and not batches[0].is_floating_point()
            and all(b.shape == batches[0].shape and bool(((b == 0) | (b == 1)).all()) for b in batches[1:])):
        raise ValueError("sparsify: calibration is a list of tensors that looks like one batch's input ids and "
                         "attention mask, which a list would run as separate batches; pass one batch as a tuple "
                         "(model(ids, mask)) or a dict (model(**batch)), several as a list of those")
    return [_batch_call(b, f"batch {i}") for i, b in enumerate(batches)]


class _Stop(Exception):
    """Raised by a hook to end a calibration call once what it records has run (run catches it)."""


def run(model, calibration: Calibration, hooks: list, after_call: Optional[Callable[[], None]] = None) -> None:
    """Run every calibration call on `model` without grad (a hook may end one early by raising
    _Stop), after_call() after each, then remove `hooks` (also on error)."""
    try:
        for f in calls(calibration):
            with torch.no_grad():
                try:
                    f(model)
                except _Stop:
                    pass
            if after_call is not None:
                after_call()
    finally:
        for h in hooks:
            h.remove()


def input_hessians(model, names: Sequence[str], calibration: Calibration) -> Dict[str, torch.Tensor]:
    """X^T X (fp64) of the inputs module names[0] receives over the calibration calls, run on the
    model as it is now (one no-grad pass), and of those later modules names[1:] that receive the
    very same input tensor, once, in every call (a query projection's key and value siblings:
    pruning one of them leaves the others' input as it was, so one pass serves all three). Once
    the first call has shown that each module kept runs once, later calls end right after the
    last of them has run (what follows cannot change what they saw). A module absent from the
    result: no call reaches it (names[0]), or it is no such sibling."""
    mods = [model.get_submodule(n) for n in names]
    H: Dict[int, torch.Tensor] = {}
    keep = set(range(len(names)))  # names[0] and the siblings not yet ruled out
    seen: List[int] = []           # this call's hook order
    first: Dict[str, object] = {"x": None, "stop": None}

    def hook(i):
        def pre(m, args):
            x = args[0]
            if i == 0 and first["x"] is None:
                first["x"] = x
            if i == 0:
                H[0] = prune.hessian(x) if 0 not in H else prune.hessian(x, out=H[0])
            elif i in keep and not (x is first["x"] and i not in seen):
                keep.discard(i)  # a sibling reads names[0]'s input once per call: its Hessian is names[0]'s
            seen.append(i)
            if first["stop"] == i and keep.issubset(seen):
                raise _Stop
        return pre

    def after_call():
        calls_of = {i: seen.count(i) for i in set(seen)}
        for i in list(keep):
            if i != 0 and (calls_of.get(i) != 1 or calls_of.get(0) != 1):
                keep.discard(i)
        if first["stop"] is None and calls_of.get(0) == 1:  # after the first call: where later ones may end
            first["stop"] = max(keep, key=seen.index) if all(calls_of.get(i) == 1 for i in keep) else -1
        first["x"] = None
        seen.clear()
    run(model, calibration, [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)], after_call)
    if 0 not in H:
        return {}
    return {names[i]: H[0] if i == 0 else H[0].clone() for i in sorted(keep)}


def fisher_scores(model, calibration, units: Dict[str, tuple], weights: Dict[str, torch.nn.Module]):
    """Criterion "fisher": squared first-order Taylor terms of the loss, summed over the
    calibration data (the Fisher form; Molchanov et al. 2019). Returns (unit scores, weight scores).

    Units: the input x of the output projection (o-proj / down-proj) is watched; removing unit j
    at one token changes the loss by about -sum_{c in j} x_c dL/dx_c, whose square is summed over
    tokens. Weights: (w dL/dw)^2, with dL/dw the gradient of one calibration call's loss, summed
    over calibration calls.
    units: {key: (output projection, units, columns per unit)}; weights: {name: layer}."""
    unit_scores: Dict[str, torch.Tensor] = {}
    weight_scores: Dict[str, torch.Tensor] = {}
    handles = []
    for key, (lin, n_units, width) in units.items():
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
        for f in calls(calibration):
            with torch.enable_grad():
                loss = f(model)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                    raise ValueError("sparsify: criterion 'fisher' needs calibration callables that return a scalar "
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
