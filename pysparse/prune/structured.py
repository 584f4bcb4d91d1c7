"""Structured pruning of transformer blocks: attention heads, FFN neurons and whole layers.

Removing a head or a neuron slices rows out of the projections that produce it and columns out of
the projection that consumes it, so the result is a smaller *dense* block that runs faster on any
hardware. `shrink_attention` and `shrink_ffn` do this to a module in place, given the units to
keep. These layouts are recognised (`attention_parts` / `ffn_parts`):

- pysparse's own BERT layer (`pysparse.models.minilm.BertLayer`: query/key/value/attn_out, heads;
  ffn_in/ffn_out),
- Hugging Face BERT-style modules (`BertAttention`: self.query/key/value + output.dense; a layer
  with intermediate.dense + output.dense),
- LLaMA-style modules (`q_proj/k_proj/v_proj/o_proj` with `head_dim`, grouped-query attention;
  `gate_proj/up_proj/down_proj`); rotary where the module's config names a RoPE (LLaMA, Qwen2,
  Mistral), not in Hugging Face's ViT, which uses the same names (with `mlp.fc1/fc2`),
- DistilBERT (`q_lin/k_lin/v_lin/out_lin` with `attention_head_size`; `ffn.lin1/lin2`),
- GPT-2's MLP (`c_fc/c_proj`, Hugging Face Conv1D: made the nn.Linear each equals first, by
  `linear_conv1d_ffn`; GPT-2's attention fuses q, k and v in one `c_attn` and is not recognised).

With grouped-query attention the unit removed is a whole key/value group (one K/V head and the
query heads that read it), so the number of query heads per group stays what the module expects.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from .ffn import neuron_norms


class AttentionParts(NamedTuple):
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    heads: int          # query heads
    kv_heads: int       # key/value heads (== heads without GQA)
    head_dim: int
    rotary: bool        # LLaMA-style: q/k are rotated after the projection
    residual_is_input: bool  # post-norm (BERT): the block's residual is q's input, added to o's output
    replace: Callable[[str, torch.nn.Linear], None]   # replace("q" | "k" | "v" | "o", new)
    set_heads: Callable[[int, int], None]             # record new (heads, kv_heads)

    @property
    def units(self) -> int:
        """Prunable units: heads, or key/value groups under GQA."""
        return self.kv_heads

    @property
    def unit_width(self) -> int:
        """Columns of o (and rows of q) per unit."""
        return self.heads // self.kv_heads * self.head_dim


class FFNParts(NamedTuple):
    up: torch.nn.Linear              # the projection the activation is applied to (LLaMA: gate_proj)
    gate: Optional[torch.nn.Linear]  # the linear factor it is multiplied by (LLaMA: up_proj); None for BERT
    down: torch.nn.Linear
    residual_is_input: bool  # post-norm (BERT): the block's residual is up's input, added to down's output
    replace: Callable[[str, torch.nn.Linear], None]   # replace("up" | "gate" | "down", new)


def attention_parts(module: torch.nn.Module) -> Optional[AttentionParts]:
    """The projections of an attention module in one of the recognised layouts, else None."""
    lin = lambda o, *names: all(isinstance(getattr(o, n, None), torch.nn.Linear) for n in names)  # noqa: E731
    if lin(module, "query", "key", "value", "attn_out") and isinstance(getattr(module, "heads", None), int):
        slots = {"q": (module, "query"), "k": (module, "key"), "v": (module, "value"), "o": (module, "attn_out")}
        h = module.heads
        return AttentionParts(module.query, module.key, module.value, module.attn_out, h, h,
                              module.query.out_features // h, False, True, _replacer(slots),
                              lambda nh, nkv: setattr(module, "heads", nh))
    s, out = getattr(module, "self", None), getattr(module, "output", None)
    if s is not None and out is not None and lin(s, "query", "key", "value") and lin(out, "dense") \
            and hasattr(s, "attention_head_size"):
        slots = {"q": (s, "query"), "k": (s, "key"), "v": (s, "value"), "o": (out, "dense")}
        hd = s.attention_head_size
        h = s.query.out_features // hd

        def set_heads(nh, nkv):
            s.num_attention_heads, s.all_head_size = nh, nh * hd
        return AttentionParts(s.query, s.key, s.value, out.dense, h, h, hd, False, True, _replacer(slots), set_heads)
    if lin(module, "q_proj", "k_proj", "v_proj", "o_proj") and hasattr(module, "head_dim"):
        hd = module.head_dim
        h, kv = module.q_proj.out_features // hd, module.k_proj.out_features // hd
        slots = {"q": (module, "q_proj"), "k": (module, "k_proj"), "v": (module, "v_proj"), "o": (module, "o_proj")}

        def set_heads(nh, nkv):
            for name, val in (("num_heads", nh), ("num_attention_heads", nh), ("num_key_value_heads", nkv)):
                if hasattr(module, name):
                    setattr(module, name, val)
        # Rotary unless the module's config says otherwise (ViT: the same names, no RoPE); without
        # a config, LLaMA-style is taken as rotary (the entropy criterion then refuses it).
        cfg = getattr(module, "config", None)
        rotary = cfg is None or any(hasattr(cfg, a) for a in ("rope_theta", "rope_scaling", "rope_parameters"))
        return AttentionParts(module.q_proj, module.k_proj, module.v_proj, module.o_proj, h, kv, hd, rotary, False,
                              _replacer(slots), set_heads)
    if lin(module, "q_lin", "k_lin", "v_lin", "out_lin") and hasattr(module, "attention_head_size"):
        hd = module.attention_head_size
        h = module.q_lin.out_features // hd
        slots = {"q": (module, "q_lin"), "k": (module, "k_lin"), "v": (module, "v_lin"), "o": (module, "out_lin")}

        def set_heads(nh, nkv):
            module.n_heads = nh
        return AttentionParts(module.q_lin, module.k_lin, module.v_lin, module.out_lin, h, h, hd, False, True,
                              _replacer(slots), set_heads)
    return None


def ffn_parts(module: torch.nn.Module) -> Optional[FFNParts]:
    """The projections of a feed-forward block in one of the recognised layouts, else None."""
    lin = lambda o, *names: all(isinstance(getattr(o, n, None), torch.nn.Linear) for n in names)  # noqa: E731
    if lin(module, "ffn_in", "ffn_out"):
        return FFNParts(module.ffn_in, None, module.ffn_out, True,
                        _replacer({"up": (module, "ffn_in"), "down": (module, "ffn_out")}))
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if inter is not None and out is not None and lin(inter, "dense") and lin(out, "dense") \
            and out.dense.in_features == inter.dense.out_features:
        return FFNParts(inter.dense, None, out.dense, True, _replacer({"up": (inter, "dense"), "down": (out, "dense")}))
    if lin(module, "gate_proj", "up_proj", "down_proj"):
        return FFNParts(module.gate_proj, module.up_proj, module.down_proj, False,
                        _replacer({"up": (module, "gate_proj"), "gate": (module, "up_proj"), "down": (module, "down_proj")}))
    if lin(module, "lin1", "lin2") and module.lin2.in_features == module.lin1.out_features:  # DistilBERT (post-norm)
        return FFNParts(module.lin1, None, module.lin2, True, _replacer({"up": (module, "lin1"), "down": (module, "lin2")}))
    if lin(module, "fc1", "fc2") and module.fc2.in_features == module.fc1.out_features:  # ViT's MLP (pre-norm)
        return FFNParts(module.fc1, None, module.fc2, False, _replacer({"up": (module, "fc1"), "down": (module, "fc2")}))
    if lin(module, "c_fc", "c_proj") and module.c_proj.in_features == module.c_fc.out_features:  # GPT-2 (pre-norm)
        return FFNParts(module.c_fc, None, module.c_proj, False,
                        _replacer({"up": (module, "c_fc"), "down": (module, "c_proj")}))
    return None


def linear_conv1d_ffn(module: torch.nn.Module) -> bool:
    """GPT-2's MLP with Hugging Face Conv1D layers (weight stored (in, out)): c_fc and c_proj
    become the nn.Linear each equals, in place (marked, so save_sparse records them and load_sparse
    converts a fresh model's the same way), so ffn_parts reads them. True if it converted."""
    from ..nn.linear import is_conv1d, linear_from_conv1d  # pysparse.nn imports pysparse.prune

    fc, proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
    if not (is_conv1d(fc) and is_conv1d(proj)):
        return False
    module.c_fc, module.c_proj = linear_from_conv1d(fc), linear_from_conv1d(proj)
    return True


def _replacer(slots):
    return lambda key, new: setattr(slots[key][0], slots[key][1], new)


def _slice(lin: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear with the rows (dim 0) or input columns (dim 1) of `lin` at idx."""
    w = lin.weight.detach()
    w = w[idx] if dim == 0 else w[:, idx]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias[idx] if dim == 0 else lin.bias)
    new.train(lin.training)
    if getattr(lin, "_pysparse_conv1d", False):  # a Conv1D made linear stays recorded as one
        new._pysparse_conv1d = True
    return new


def _columns(units: Sequence[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in sorted(units)])


def head_scores_magnitude(p: AttentionParts) -> torch.Tensor:
    """L2 norm of each unit's rows of Q, K, V and columns of O."""
    g, hd = p.unit_width, p.head_dim
    with torch.no_grad():
        q = p.q.weight.double().view(p.units, g, -1).square().sum((1, 2))
        k = p.k.weight.double().view(p.units, hd, -1).square().sum((1, 2))
        v = p.v.weight.double().view(p.units, hd, -1).square().sum((1, 2))
        o = p.o.weight.double().view(p.o.out_features, p.units, g).square().sum((0, 2))
    return (q + k + v + o).sqrt()


def shrink_attention(module: torch.nn.Module, keep: Sequence[int]) -> None:
    """Cut an attention module down, in place, to its units (heads; key/value groups under GQA)
    at indices `keep`: the projections are replaced by smaller dense nn.Linear layers."""
    p = attention_parts(module)
    if p is None:
        raise ValueError(f"pysparse.prune: {type(module).__name__} is not an attention module this library "
                         f"recognises (BERT-style query/key/value or LLaMA-style q_proj/k_proj/v_proj/o_proj)")
    keep = sorted(set(int(u) for u in keep))
    if not keep or keep[0] < 0 or keep[-1] >= p.units:
        raise ValueError(f"pysparse.prune.shrink_attention: keep must name 1..{p.units} distinct units in "
                         f"[0, {p.units}), got {keep}")
    qcols, kvcols = _columns(keep, p.unit_width), _columns(keep, p.head_dim)
    p.replace("q", _slice(p.q, qcols, 0))
    p.replace("k", _slice(p.k, kvcols, 0))
    p.replace("v", _slice(p.v, kvcols, 0))
    p.replace("o", _slice(p.o, qcols, 1))
    per_group = p.heads // p.kv_heads
    p.set_heads(len(keep) * per_group, len(keep))


def shrink_ffn(module: torch.nn.Module, keep: torch.Tensor) -> None:
    """Cut a feed-forward module down, in place, to its intermediate neurons at indices `keep`: the
    projections are replaced by smaller dense nn.Linear layers. (``pysparse.prune.ffn_neurons``
    does the same to weight tensors, choosing the neurons itself.)"""
    linear_conv1d_ffn(module)
    p = ffn_parts(module)
    if p is None:
        raise ValueError(f"pysparse.prune: {type(module).__name__} is not a feed-forward block this library "
                         f"recognises (ffn_in/ffn_out, intermediate.dense/output.dense, gate/up/down_proj, "
                         f"lin1/lin2, fc1/fc2 or c_fc/c_proj)")
    keep = torch.as_tensor(keep, dtype=torch.int64).unique()
    if keep.numel() == 0 or keep[0] < 0 or keep[-1] >= p.down.in_features:
        raise ValueError(f"pysparse.prune.shrink_ffn: keep must name 1..{p.down.in_features} neurons")
    p.replace("up", _slice(p.up, keep, 0))
    if p.gate is not None:
        p.replace("gate", _slice(p.gate, keep, 0))
    p.replace("down", _slice(p.down, keep, 1))


def neuron_scores_magnitude(p: FFNParts) -> torch.Tensor:
    """||W_up[j]|| + ||W_down[:, j]|| (+ ||W_gate[j]||), L2."""
    return neuron_norms(p.up.weight, p.down.weight, None if p.gate is None else p.gate.weight)


def _deprecated(old: str, new: Callable) -> Callable:
    def alias(*args, **kwargs):
        warnings.warn(f"pysparse.prune.{old} is deprecated, use pysparse.prune.{new.__name__} (the same function)",
                      DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)
    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated name of `{new.__name__}`."
    return alias


prune_heads = _deprecated("prune_heads", shrink_attention)
prune_neurons = _deprecated("prune_neurons", shrink_ffn)


class Passthrough(torch.nn.Module):
    """What a dropped layer becomes: returns its input hidden states unchanged."""

    def __init__(self, dropped: str = ""):
        super().__init__()
        self.dropped = dropped

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def extra_repr(self) -> str:
        return f"dropped={self.dropped}"


def top_units(scores: torch.Tensor, ratio: float) -> List[int]:
    """Indices of the round(n * (1 - ratio)) highest scores (at least one), ascending."""
    n = scores.numel()
    keep = max(1, round(n * (1.0 - float(ratio))))
    return sorted(torch.topk(scores.double(), keep).indices.tolist())
