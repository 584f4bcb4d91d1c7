"""Structured pruning of transformer blocks: attention heads, FFN neurons and whole layers.

Removing a head or a neuron slices rows out of the projections that produce it and columns out of
the projection that consumes it, so the result is a smaller *dense* block that runs faster on any
hardware. `shrink_attention` and `shrink_ffn` do this to a module in place, given the units to
keep. Attention layouts recognised by `attention_parts` (head counts read from the projections'
shapes, head_dim from the module):

- separate q, k, v and output projections: pysparse's BERT layer (query/key/value/attn_out),
  Hugging Face BERT / RoBERTa / ELECTRA / Swin-v1-style (self.query/key/value + output.dense),
  ALBERT (query/key/value/dense), the LLaMA family and ViT / DeiT / Swin (q_proj/k_proj/v_proj/
  o_proj), OPT / BART / CLIP / Whisper (q_proj/k_proj/v_proj/out_proj), DistilBERT (q_lin/k_lin/
  v_lin/out_lin), T5 (q/k/v/o; its shared position bias is split per layer first by
  `t5_own_position_bias`); rotary where the module's config names a RoPE;
- one fused projection: GPT-2's c_attn (Conv1D, made the nn.Linear it equals first by
  `linear_conv1d_attention`; rows [q | k | v]), Phi-3's qkv_proj (rows [q | k | v], GQA),
  GPT-NeoX's query_key_value (rows per head [q_h | k_h | v_h]).

Per-head parameters go with their heads (Swin's relative position bias table, T5's bias tables).
Feed-forward layouts (`ffn_parts`): ffn_in/ffn_out, intermediate.dense/output.dense,
gate_proj/up_proj/down_proj, Phi-3's fused gate_up_proj, T5's wi/wo and wi_0/wi_1/wo, lin1/lin2,
fc1/fc2, c_fc/c_proj (GPT-2, via `linear_conv1d_ffn`), dense_h_to_4h/dense_4h_to_h, ALBERT's
ffn/ffn_output. Mixture-of-experts modules whose experts are 3-D tensors (Mixtral's
gate_up_proj/down_proj) lose neurons per expert (`shrink_experts`, the same count in each).

With grouped-query attention the unit removed is a whole key/value group (one K/V head and the
query heads that read it), so the number of query heads per group stays what the module expects.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .ffn import neuron_norms


class AttentionParts(NamedTuple):
    q: torch.nn.Linear  # the query projection; with fused projections, the one linear making q, k and v
    k: torch.nn.Linear  # (== q when fused)
    v: torch.nn.Linear  # (== q when fused)
    o: torch.nn.Linear
    heads: int          # query heads
    kv_heads: int       # key/value heads (== heads without GQA)
    head_dim: int
    rotary: bool        # LLaMA-style: q/k are rotated after the projection
    residual_is_input: bool  # post-norm (BERT): the block's residual is q's input, added to o's output
    replace: Callable[[str, torch.nn.Linear], None]   # replace("q" | "k" | "v" | "o" | "qkv", new)
    set_heads: Callable[[int, int], None]             # record new (heads, kv_heads)
    fused: str = ""     # "" (q, k, v separate) | "blocks": rows [q | k | v] (GPT-2, Phi-3) |
                        # "heads": rows per head [q_h | k_h | v_h] (GPT-NeoX)
    extras: Tuple[Tuple[str, int], ...] = ()  # per-head parameters: (path under the module, head axis)

    @property
    def units(self) -> int:
        """Prunable units: heads, or key/value groups under GQA."""
        return self.kv_heads

    @property
    def unit_width(self) -> int:
        """Columns of o (and rows of q) per unit."""
        return self.heads // self.kv_heads * self.head_dim

    def qkv_rows(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of q, k and v in the (fused) projection: (units, unit_width), (units, head_dim) x 2."""
        hq, hk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused == "heads":
            base = torch.arange(self.heads).view(-1, 1) * 3 * self.head_dim + torch.arange(self.head_dim)
            return base, base + self.head_dim, base + 2 * self.head_dim
        off = (0, hq, hq + hk) if self.fused == "blocks" else (0, 0, 0)
        return (off[0] + torch.arange(hq).view(self.units, -1), off[1] + torch.arange(hk).view(self.units, -1),
                off[2] + torch.arange(hk).view(self.units, -1))

    def split(self, out: torch.Tensor, which: str) -> torch.Tensor:
        """q, k or v (`which`) out of the output of self.q (fused) or of its own projection."""
        if not self.fused:
            return out
        rows = self.qkv_rows()["qkv".index(which)].flatten()
        return out.index_select(-1, rows.to(out.device))


class FFNParts(NamedTuple):
    up: torch.nn.Linear              # the projection the activation is applied to (LLaMA: gate_proj)
    gate: Optional[torch.nn.Linear]  # the linear factor it is multiplied by (LLaMA: up_proj); None for BERT
    down: torch.nn.Linear
    residual_is_input: bool  # post-norm (BERT): the block's residual is up's input, added to down's output
    replace: Callable[[str, torch.nn.Linear], None]   # replace("up" | "gate" | "down", new)
    fused: bool = False  # up == gate, one linear with rows [activated | linear factor] (Phi-3's gate_up_proj)

    @property
    def neurons(self) -> int:
        return self.down.in_features

    def weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(activated rows, linear-factor rows or None, down) weights, one row/column per neuron."""
        n = self.neurons
        if self.fused:
            return self.up.weight[:n], self.up.weight[n:], self.down.weight
        return self.up.weight, None if self.gate is None else self.gate.weight, self.down.weight


def _config(module):
    return getattr(module, "config", None)


def _rotary(module) -> bool:
    """Rotary unless the module's config says otherwise (ViT, OPT, BART, CLIP, Whisper, Swin: no
    RoPE); without a config, a LLaMA-style module is taken as rotary (the entropy criterion then
    refuses it)."""
    cfg = _config(module)
    return cfg is None or any(hasattr(cfg, a) for a in ("rope_theta", "rope_scaling", "rope_parameters"))


def _post_norm(module) -> bool:
    """Whether the block around a q_proj/out_proj attention normalises after the residual add
    (BART; OPT-350m), so the block's residual is the attention's input."""
    cfg = _config(module)
    kind = getattr(cfg, "model_type", "")
    return kind == "bart" or (kind == "opt" and not getattr(cfg, "do_layer_norm_before", True))


def _setter(module, names, per_layer_config: bool = False):
    """set_heads for a module whose head counts live in `names` = (query attrs, key/value attrs);
    `per_layer_config`: its forward reads the counts from its config (Phi-3), which becomes the
    module's own copy."""
    def set_heads(nh, nkv):
        if per_layer_config and module.config.num_attention_heads != nh:
            module.config = copy.copy(module.config)
        targets = [module, module.config] if per_layer_config else [module]
        for t in targets:
            for attr in names[0]:
                if hasattr(t, attr):
                    setattr(t, attr, nh)
            for attr in names[1]:
                if hasattr(t, attr):
                    setattr(t, attr, nkv)
    return set_heads


_QUERY_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_heads")
_KV_ATTRS = ("num_key_value_heads",)


def attention_parts(module: torch.nn.Module) -> Optional[AttentionParts]:
    """The projections of an attention module in one of the recognised layouts, else None. Head
    counts are read from the projections' shapes (head_dim from the module)."""
    lin = lambda o, *names: all(isinstance(getattr(o, n, None), torch.nn.Linear) for n in names)  # noqa: E731
    names = (_QUERY_ATTRS, _KV_ATTRS)

    def separate(o, q, k, v, out, hd, rotary, post, set_heads, extras=()):
        slots = {"q": (o, q), "k": (o, k), "v": (o, v)}
        slots["o"] = out
        qm, km, om = getattr(o, q), getattr(o, k), getattr(*out)
        if hd <= 0 or om.in_features % hd or km.out_features % hd or qm.out_features != om.in_features:
            return None
        h, kv = om.in_features // hd, km.out_features // hd
        if h % kv:
            return None
        return AttentionParts(qm, km, getattr(o, v), om, h, kv, hd, rotary, post, _replacer(slots), set_heads, "",
                              extras)

    if lin(module, "query", "key", "value", "attn_out") and isinstance(getattr(module, "heads", None), int):
        return separate(module, "query", "key", "value", (module, "attn_out"), module.query.out_features // module.heads,
                        False, True, _setter(module, names))
    s, out = getattr(module, "self", None), getattr(module, "output", None)
    if s is not None and out is not None and lin(s, "query", "key", "value") and lin(out, "dense") \
            and hasattr(s, "attention_head_size"):
        hd = s.attention_head_size

        def set_heads(nh, nkv):
            s.num_attention_heads, s.all_head_size = nh, nh * hd
        return separate(s, "query", "key", "value", (out, "dense"), hd, False, True, set_heads)
    if lin(module, "query", "key", "value", "dense") and hasattr(module, "attention_head_size"):  # ALBERT
        hd = module.attention_head_size

        def set_heads(nh, nkv):
            module.num_attention_heads, module.all_head_size = nh, nh * hd
        return separate(module, "query", "key", "value", (module, "dense"), hd, False, True, set_heads)
    for o_name in ("o_proj", "out_proj"):  # LLaMA family, ViT, Swin / OPT, BART, CLIP, Whisper
        if lin(module, "q_proj", "k_proj", "v_proj", o_name) and hasattr(module, "head_dim"):
            extras = ()
            table = getattr(getattr(module, "relative_position_bias", None), "relative_position_bias_table", None)
            if isinstance(table, torch.nn.Parameter):  # Swin: a bias per head
                extras = (("relative_position_bias.relative_position_bias_table", 1),)
            return separate(module, "q_proj", "k_proj", "v_proj", (module, o_name), module.head_dim,
                            _rotary(module) if o_name == "o_proj" else False, o_name == "out_proj" and _post_norm(module),
                            _setter(module, names), extras)
    if lin(module, "q_lin", "k_lin", "v_lin", "out_lin") and hasattr(module, "attention_head_size"):  # DistilBERT
        return separate(module, "q_lin", "k_lin", "v_lin", (module, "out_lin"), module.attention_head_size, False, True,
                        _setter(module, names))
    if lin(module, "q", "k", "v", "o") and hasattr(module, "key_value_proj_dim"):  # T5
        return separate(module, "q", "k", "v", (module, "o"), module.key_value_proj_dim, False, False,
                        _setter(module, (("n_heads",), ())), _t5_extras(module))
    fused = None
    if lin(module, "c_attn", "c_proj") and hasattr(module, "split_size") and not getattr(module, "is_cross_attention", False):
        fused = ("c_attn", "c_proj", module.head_dim, "blocks", False)  # GPT-2 (Conv1D made linear first)
    elif lin(module, "query_key_value", "dense") and hasattr(module, "head_size"):
        fused = ("query_key_value", "dense", module.head_size, "heads", True)  # GPT-NeoX
    elif lin(module, "qkv_proj", "o_proj") and hasattr(module, "head_dim"):
        fused = ("qkv_proj", "o_proj", module.head_dim, "blocks", _rotary(module))  # Phi-3
    if fused is None:
        return None
    qkv_name, o_name, hd, kind, rotary = fused
    qkv, o = getattr(module, qkv_name), getattr(module, o_name)
    if hd <= 0 or o.in_features % hd:
        return None
    h = o.in_features // hd
    rest = qkv.out_features - h * hd
    if rest <= 0 or rest % (2 * hd) or (kind == "heads" and rest != 2 * h * hd):
        return None
    kv = rest // (2 * hd)
    if h % kv:
        return None
    if qkv_name == "c_attn":
        def set_heads(nh, nkv):
            module.num_heads, module.split_size = nh, nh * hd
    else:
        set_heads = _setter(module, names, per_layer_config=qkv_name == "qkv_proj")
    slots = {"qkv": (module, qkv_name), "o": (module, o_name)}
    return AttentionParts(qkv, qkv, qkv, o, h, kv, hd, rotary, False, _replacer(slots), set_heads, kind)


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
    if lin(module, "gate_up_proj", "down_proj") and module.gate_up_proj.out_features == 2 * module.down_proj.in_features:
        return FFNParts(module.gate_up_proj, module.gate_up_proj, module.down_proj, False,  # Phi-3
                        _replacer({"up": (module, "gate_up_proj"), "down": (module, "down_proj")}), True)
    if lin(module, "wi_0", "wi_1", "wo"):  # T5 v1.1 (gated)
        return FFNParts(module.wi_0, module.wi_1, module.wo, False,
                        _replacer({"up": (module, "wi_0"), "gate": (module, "wi_1"), "down": (module, "wo")}))
    # (up, down, post-norm) pairs: DistilBERT, ViT / CLIP / Whisper / BART / OPT (fc1/fc2 at the layer),
    # GPT-2 (Conv1D made linear first), GPT-NeoX, ALBERT, T5
    for up, down, post in (("lin1", "lin2", True), ("fc1", "fc2", None), ("c_fc", "c_proj", False),
                           ("dense_h_to_4h", "dense_4h_to_h", False), ("ffn", "ffn_output", True), ("wi", "wo", False)):
        if lin(module, up, down) and getattr(module, down).in_features == getattr(module, up).out_features:
            if post is None:  # fc1/fc2 live in the decoder/encoder layer, which holds the norms
                post = _post_norm(getattr(module, "self_attn", module))
            return FFNParts(getattr(module, up), None, getattr(module, down), post,
                            _replacer({"up": (module, up), "down": (module, down)}))
    return None


def expert_parts(module: torch.nn.Module):
    """Mixture-of-experts weights stored as 3-D tensors (Mixtral, Qwen-MoE in transformers 5:
    gate_up_proj (experts, 2 x intermediate, hidden), down_proj (experts, hidden, intermediate)),
    as (gate_up, down) Parameters, else None."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    # Nothing else of its own (biases, scales: layouts such as GPT-OSS's, with interleaved gate and
    # up rows, are not this one).
    if {n for n, _ in module.named_parameters(recurse=False)} != {"gate_up_proj", "down_proj"}:
        return None
    if isinstance(gu, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gu.dim() == 3 \
            and down.dim() == 3 and gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2] \
            and gu.shape[2] == down.shape[1]:
        return gu, down
    return None


def expert_scores_magnitude(module: torch.nn.Module) -> torch.Tensor:
    """(experts, intermediate): ||gate row|| + ||up row|| + ||down column|| per expert and neuron."""
    gu, down = expert_parts(module)
    n = down.shape[2]
    with torch.no_grad():
        g = gu.detach().double()
        return g[:, :n].norm(dim=2) + g[:, n:].norm(dim=2) + down.detach().double().norm(dim=1)


def shrink_experts(module: torch.nn.Module, keep: torch.Tensor) -> None:
    """Cut every expert of a 3-D mixture-of-experts module down, in place, to its neurons at
    `keep` (experts, k): the same count per expert (the weights stay one tensor), each its own."""
    parts = expert_parts(module)
    if parts is None:
        raise ValueError(f"pysparse.prune: {type(module).__name__} holds no 3-D expert weights (gate_up_proj, down_proj)")
    gu, down = parts
    E, n = down.shape[0], down.shape[2]
    keep = torch.as_tensor(keep, dtype=torch.int64)
    if keep.dim() != 2 or keep.shape[0] != E or keep.shape[1] == 0 or keep.min() < 0 or keep.max() >= n \
            or any(row.unique().numel() != row.numel() for row in keep):
        raise ValueError(f"pysparse.prune.shrink_experts: keep must be ({E}, k) distinct neurons in [0, {n}) per expert, "
                         f"got shape {tuple(keep.shape)}")
    keep = keep.sort(1).values
    with torch.no_grad():
        rows = torch.cat([keep, keep + n], 1)
        new_gu = torch.stack([gu[e, rows[e]] for e in range(E)])
        new_down = torch.stack([down[e][:, keep[e]] for e in range(E)])
    module.gate_up_proj = torch.nn.Parameter(new_gu, requires_grad=gu.requires_grad)
    module.down_proj = torch.nn.Parameter(new_down, requires_grad=down.requires_grad)
    if hasattr(module, "intermediate_dim"):
        module.intermediate_dim = keep.shape[1]


def _linear_conv1d(module: torch.nn.Module, names) -> bool:
    from ..nn.linear import is_conv1d, linear_from_conv1d  # pysparse.nn imports pysparse.prune

    mods = [getattr(module, n, None) for n in names]
    if not all(is_conv1d(m) for m in mods):
        return False
    for n, m in zip(names, mods):
        setattr(module, n, linear_from_conv1d(m))
    return True


def linear_conv1d_ffn(module: torch.nn.Module) -> bool:
    """GPT-2's MLP with Hugging Face Conv1D layers (weight stored (in, out)): c_fc and c_proj
    become the nn.Linear each equals, in place (marked, so save_sparse records them and load_sparse
    converts a fresh model's the same way), so ffn_parts reads them. True if it converted."""
    return _linear_conv1d(module, ("c_fc", "c_proj"))


def linear_conv1d_attention(module: torch.nn.Module) -> bool:
    """GPT-2's attention: c_attn and c_proj (Conv1D) become the nn.Linear each equals, as
    linear_conv1d_ffn does for the MLP. True if it converted."""
    if getattr(module, "is_cross_attention", False) or not hasattr(module, "split_size"):
        return False
    return _linear_conv1d(module, ("c_attn", "c_proj"))


# ---- T5: the relative position bias is computed by the first layer of a stack and handed to the
# others, so every layer must have the same heads. To prune heads per layer, each attention gets
# its own copy of the bias table (columns of its own heads) and ignores the bias handed to it.

def _t5_ready(module) -> bool:
    return getattr(module, "_pysparse_own_bias", False)


def _t5_extras(module):
    return (("relative_attention_bias.weight", 1),) if getattr(module, "has_relative_attention_bias", False) else ()


def _drop_handed_bias(module, args, kwargs):
    kwargs["position_bias"] = None
    return args, kwargs


def t5_own_position_bias(model: torch.nn.Module) -> List[str]:
    """Give every T5-style attention of `model` (T5Attention: q, k, v, o, key_value_proj_dim) its
    own position bias, so that layers can lose different heads: self-attention layers get a copy of
    their stack's relative bias table (the first layer's), cross-attention layers compute their
    zero bias themselves, and each ignores the bias the previous layer hands on (same outputs).
    Idempotent; returns the names of the modules changed. save_sparse records them and load_sparse
    redoes this on a fresh model."""
    changed = []
    table = None
    for name, mod in model.named_modules():
        if not (hasattr(mod, "key_value_proj_dim") and hasattr(mod, "relative_attention_num_buckets")):
            continue
        if getattr(mod, "has_relative_attention_bias", False) and not _t5_ready(mod):
            table = mod.relative_attention_bias  # the first layer of a stack (stacks come in order)
        if _t5_ready(mod):
            continue
        is_self = table is not None and not _is_cross(name)
        if is_self and not mod.has_relative_attention_bias:
            mod.relative_attention_bias = copy.deepcopy(table)
            mod.has_relative_attention_bias = True
        mod.register_forward_pre_hook(_drop_handed_bias, with_kwargs=True)
        mod._pysparse_own_bias = True
        changed.append(name)
    return changed


def _is_cross(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "EncDecAttention"


def owner_of(module: torch.nn.Module, path: str):
    """(the submodule holding `path`'s last part, that part's name): where to set a parameter."""
    owner_path, _, attr = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), attr


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
    with torch.no_grad():
        score = p.o.weight.double().view(p.o.out_features, p.units, p.unit_width).square().sum((0, 2))
        for lin, rows in zip((p.q, p.k, p.v), p.qkv_rows()):
            score = score + lin.weight.double()[rows.flatten()].view(p.units, -1).square().sum(1)
    return score.sqrt()


def shrink_attention(module: torch.nn.Module, keep: Sequence[int]) -> None:
    """Cut an attention module down, in place, to its units (heads; key/value groups under GQA)
    at indices `keep`: the projections are replaced by smaller dense nn.Linear layers, per-head
    parameters (Swin's and T5's position bias tables) lose the same heads."""
    linear_conv1d_attention(module)
    p = attention_parts(module)
    if p is None:
        raise ValueError(f"pysparse.prune: {type(module).__name__} is not an attention module this library "
                         f"recognises (see pysparse.prune.structured)")
    if hasattr(module, "key_value_proj_dim") and not _t5_ready(module):
        raise ValueError("pysparse.prune.shrink_attention: a T5 attention shares its position bias with the other "
                         "layers of its stack; call pysparse.prune.t5_own_position_bias(model) first (sparsify does)")
    keep = sorted(set(int(u) for u in keep))
    if not keep or keep[0] < 0 or keep[-1] >= p.units:
        raise ValueError(f"pysparse.prune.shrink_attention: keep must name 1..{p.units} distinct units in "
                         f"[0, {p.units}), got {keep}")
    sel = torch.tensor(keep)
    rows = [r[sel] for r in p.qkv_rows()]  # (kept units, rows per unit) of q, k and v
    if p.fused:  # one projection: its kept rows per head (GPT-NeoX) or per block (GPT-2, Phi-3)
        order = torch.stack(rows, 1).flatten() if p.fused == "heads" else torch.cat([r.flatten() for r in rows])
        p.replace("qkv", _slice(p.q, order, 0))
    else:
        for key, lin, r in zip("qkv", (p.q, p.k, p.v), rows):
            p.replace(key, _slice(lin, r.flatten(), 0))
    p.replace("o", _slice(p.o, _columns(keep, p.unit_width), 1))
    per_head = torch.tensor([u * (p.heads // p.kv_heads) + i for u in keep for i in range(p.heads // p.kv_heads)])
    for path, axis in p.extras:
        owner, attr = owner_of(module, path)
        old = getattr(owner, attr)
        setattr(owner, attr, torch.nn.Parameter(old.detach().index_select(axis, per_head).clone(),
                                                requires_grad=old.requires_grad))
    p.set_heads(len(keep) * (p.heads // p.kv_heads), len(keep))


def shrink_ffn(module: torch.nn.Module, keep: torch.Tensor) -> None:
    """Cut a feed-forward module down, in place, to its intermediate neurons at indices `keep`: the
    projections are replaced by smaller dense nn.Linear layers. (``pysparse.prune.ffn_neurons``
    does the same to weight tensors, choosing the neurons itself.)"""
    linear_conv1d_ffn(module)
    p = ffn_parts(module)
    if p is None:
        raise ValueError(f"pysparse.prune: {type(module).__name__} is not a feed-forward block this library "
                         f"recognises (see pysparse.prune.structured)")
    keep = torch.as_tensor(keep, dtype=torch.int64).unique()
    if keep.numel() == 0 or keep[0] < 0 or keep[-1] >= p.down.in_features:
        raise ValueError(f"pysparse.prune.shrink_ffn: keep must name 1..{p.down.in_features} neurons")
    p.replace("up", _slice(p.up, torch.cat([keep, keep + p.neurons]) if p.fused else keep, 0))
    if p.gate is not None and not p.fused:
        p.replace("gate", _slice(p.gate, keep, 0))
    p.replace("down", _slice(p.down, keep, 1))


def neuron_scores_magnitude(p: FFNParts) -> torch.Tensor:
    """||W_up[j]|| + ||W_down[:, j]|| (+ ||W_gate[j]||), L2."""
    up, gate, down = p.weights()
    return neuron_norms(up, down, gate)


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
