"""Save and load a sparsified model as one safetensors file: plain tensors and JSON lists of the
swapped and dropped layers, no pickle, so loading never executes code; every index tensor is
validated. Structured pruning (fewer heads or neurons) is restored from the tensor shapes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from .._safetensors import load_file, save_file
from ..prune import structured as st
from .conv import SparseConv2d
from .fast_act import FastGELUTanh, swap_gelu_tanh
from .linear import SparseLinear, is_conv1d, linear_from_conv1d

_KEY = "pysparse.sparse_layers"
_DROPPED = "pysparse.dropped_layers"
_CONVS = "pysparse.sparse_convs"
_CONV1D = "pysparse.conv1d_as_linear"  # Hugging Face Conv1D layers that sparsify made nn.Linear
_FAST_ACT = "pysparse.fast_activations"  # tanh-form GELUs made FastGELUTanh (fast_act.py)
_OWN_BIAS = "pysparse.t5_own_position_bias"  # T5 attentions given their own position bias (heads pruned per layer)


def save_sparse(model: torch.nn.Module, path) -> None:
    """Write model.state_dict(), the names of its SparseLinear and dropped layers, the configs of
    its SparseConv2d layers, the names of the Hugging Face Conv1D layers sparsify turned into
    linears, of the T5 attentions given their own position bias and of the GELUs sparsify made
    FastGELUTanh to `path`."""
    layers = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    dropped = [n for n, m in model.named_modules() if isinstance(m, st.Passthrough)]
    convs = {n: m.config() for n, m in model.named_modules() if isinstance(m, SparseConv2d)}
    conv1d = [n for n, m in model.named_modules() if getattr(m, "_pysparse_conv1d", False)]
    own_bias = [n for n, m in model.named_modules() if getattr(m, "_pysparse_own_bias", False)]
    fast_act = [n for n, m in model.named_modules() if isinstance(m, FastGELUTanh)]
    tensors: Dict[str, torch.Tensor] = {k: v for k, v in model.state_dict().items() if v is not None}
    save_file(tensors, path, {_KEY: json.dumps(layers), _DROPPED: json.dumps(dropped), _CONVS: json.dumps(convs),
                              _CONV1D: json.dumps(conv1d), _OWN_BIAS: json.dumps(own_bias),
                              _FAST_ACT: json.dumps(fast_act), "format": "pysparse"})


def _meta(meta, key: str, path, default: str, ok, what: str):
    """The JSON value of metadata entry `key`, or a ValueError saying it is not `what`."""
    try:
        value = json.loads(meta.get(key, default))
        valid = ok(value)  # not an assert: python -O would skip the check
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        valid = False
    if not valid:
        raise ValueError(f"{path}: the {key!r} metadata is not {what}")
    return value


def _names(meta, key, path):
    return _meta(meta, key, path, "[]", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                 "a JSON list of module names")


def _swap_in(model, tensors, path, name: str, allowed, what: str, build) -> None:
    """Replace layer `name` by build(its tensors in the file), naming the file and layer in any error."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path}: layer {name!r} does not exist in this model") from None
    if not isinstance(old, allowed):
        raise ValueError(f"{path}: layer {name!r} is a {type(old).__name__} in this model, not {what}")
    sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    try:
        new = build(sub)
    except KeyError as e:
        raise ValueError(f"{path}: layer {name!r} lacks {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: layer {name!r}: {e}") from None
    new.train(old.training)  # the model's train/eval mode carries over (SparseLinear trains only in train mode)
    model.set_submodule(name, new)  # its shape is the file's: structured pruning may have resized it


def load_sparse(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a file written by save_sparse into `model`, an instance of the same architecture
    (dense, e.g. freshly built): dropped layers become passthroughs, linears whose weight has
    another shape in the file (pruned heads or neurons) are resized, the recorded layers are
    swapped for SparseLinear modules built from the file, with the formats' full index checks (a
    tampered file is refused with a ValueError naming the problem), attention head counts follow
    the new projection sizes, then every tensor is loaded strictly. Returns model, in eval mode
    (as Hugging Face's from_pretrained returns one: a freshly built model is in train mode, with
    dropout on, and the swapped-in layers would be too); call .train() to fine-tune it."""
    tensors, meta = load_file(path)
    if _KEY not in meta:
        raise ValueError(f"{path}: not a pysparse model file (no {_KEY!r} entry in its metadata)")
    layers, dropped = _names(meta, _KEY, path), _names(meta, _DROPPED, path)
    conv1d = _names(meta, _CONV1D, path)
    for name in conv1d:  # back to the nn.Linear sparsify made of it, before anything loads
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} does not exist in this model") from None
        if is_conv1d(old):
            model.set_submodule(name, linear_from_conv1d(old))
        elif not isinstance(old, (torch.nn.Linear, SparseLinear)):
            raise ValueError(f"{path}: layer {name!r} was a Conv1D made linear, but is a {type(old).__name__} in this "
                             f"model")
    swap_gelu_tanh(model, _names(meta, _FAST_ACT, path))
    own_bias = _names(meta, _OWN_BIAS, path)
    if own_bias:
        st.t5_own_position_bias(model)
        missing = sorted(set(own_bias) - {n for n, m in model.named_modules() if getattr(m, "_pysparse_own_bias", False)})
        if missing:
            raise ValueError(f"{path}: {missing[0]!r} had its own position bias, but is no T5 attention in this model")
    for name in dropped:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: dropped layer {name!r} does not exist in this model") from None
        model.set_submodule(name, st.Passthrough(type(old).__name__))
    head_dims = {n: p.head_dim for n, m in model.named_modules() if (p := st.attention_parts(m)) is not None}
    sparse = set(layers)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        shape = _saved_shape(tensors, name, name in sparse, path)
        if shape is not None and shape != tuple(mod.weight.shape):
            model.set_submodule(name, torch.nn.Linear(shape[1], shape[0], bias=mod.bias is not None,
                                                      device=mod.weight.device, dtype=mod.weight.dtype))
    for name, hd in head_dims.items():  # head counts follow the projections' new sizes, per-head parameters too
        mod = model.get_submodule(name)
        p = st.attention_parts(mod)
        if p is not None and p.head_dim != hd and p.o.in_features % hd == 0:  # head_dim read from a stale head count
            p.set_heads(p.o.in_features // hd, p.o.in_features // hd)
            p = st.attention_parts(mod)
        if p is None or p.head_dim != hd:
            raise ValueError(f"{path}: the projections of attention {name!r} are not whole heads of {hd}")
        for extra, _ in p.extras:
            _resize(mod, extra, tensors.get(f"{name}.{extra}"))
        p.set_heads(p.heads, p.kv_heads)
    for name in layers:
        _swap_in(model, tensors, path, name, (torch.nn.Linear, SparseLinear), "a linear layer", SparseLinear.from_state_dict)
    convs = _meta(meta, _CONVS, path, "{}", lambda v: isinstance(v, dict) and all(isinstance(c, dict) for c in v.values()),
                  "a JSON object of layer configs")
    for name, config in convs.items():
        _swap_in(model, tensors, path, name, (torch.nn.Conv2d, SparseConv2d), "a convolution",
                 lambda sub, config=config: SparseConv2d.from_state_dict(sub, config))
    for name, mod in list(model.named_modules()):
        if st.expert_parts(mod) is not None:  # experts that lost neurons
            for attr in ("gate_up_proj", "down_proj"):
                _resize(mod, attr, tensors.get(f"{name}.{attr}"))
            if hasattr(mod, "intermediate_dim"):
                mod.intermediate_dim = mod.down_proj.shape[2]
    model.load_state_dict(tensors, strict=True)
    for name in conv1d:  # a second save records them again
        model.get_submodule(name)._pysparse_conv1d = True
    return model.eval()


def _saved_shape(tensors, name: str, sparse: bool, path):
    """The (out, in) shape the file gives linear `name`: its weight's, or a sparse layer's weight_shape."""
    if not sparse:
        w = tensors.get(name + ".weight")
        if w is not None and w.dim() != 2:
            raise ValueError(f"{path}: {name}.weight must be 2-D, got shape {tuple(w.shape)}")
        return None if w is None else tuple(w.shape)
    s = tensors.get(name + ".weight_shape")
    if s is None:
        return None  # SparseLinear.from_state_dict names what is missing
    if s.dim() != 1 or s.numel() != 2 or s.is_floating_point() or bool((s <= 0).any()):
        raise ValueError(f"{path}: {name}.weight_shape must hold 2 positive integers, got {s.tolist()}")
    return tuple(int(v) for v in s.tolist())


def _resize(module, path: str, saved) -> None:
    """Give module's parameter at `path` the shape of the saved tensor (its values load after)."""
    owner, attr = st.owner_of(module, path)
    old = getattr(owner, attr)
    if saved is not None and saved.dim() == old.dim() and tuple(saved.shape) != tuple(old.shape):
        setattr(owner, attr, torch.nn.Parameter(torch.empty(saved.shape, dtype=old.dtype, device=old.device),
                                                requires_grad=old.requires_grad))


# A Hugging Face model's folder: its config.json (config.save_pretrained) beside this file.
PRETRAINED_WEIGHTS = "model.pysparse.safetensors"


def save_pretrained(model: torch.nn.Module, folder) -> None:
    """Save a sparsified Hugging Face model (one with a ``config``) into `folder` as its
    ``config.json`` (the dense model's config, with ``architectures`` naming the model class: the
    pruned head counts and FFN sizes are carried by the weights' shapes) and
    ``model.pysparse.safetensors`` (``save_sparse``). ``load_pretrained(folder)`` builds it back;
    transformers' own ``from_pretrained`` cannot read the sparse formats."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(f"save_pretrained: the model ({type(model).__name__}) has no Hugging Face config; save it "
                         f"with pysparse.nn.save_sparse(model, path) and rebuild it with load_sparse")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())  # a copy: the model's own config is left as it is
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    save_sparse(model, folder / PRETRAINED_WEIGHTS)


def _transformers_class(transformers, config, name: str):
    """transformers' class `name`: exported at the top, or in the config's modeling module (parts
    of models such as WhisperEncoder are not exported)."""
    cls = getattr(transformers, name, None)
    if cls is None and isinstance(getattr(config, "model_type", None), str) and config.model_type.isidentifier():
        import importlib
        try:
            module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        except ImportError:
            return None
        cls = getattr(module, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def load_pretrained(folder, model_class=None) -> torch.nn.Module:
    """The model ``save_pretrained`` wrote into `folder`: built from its config.json (the class the
    config's ``architectures`` names in transformers, or `model_class`), then ``load_sparse``
    restores the pruned shapes, sparse layers and weights. In eval mode. Reads only the folder."""
    folder = Path(folder)
    weights = folder / PRETRAINED_WEIGHTS
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise ValueError(f"load_pretrained: {str(folder)!r} holds no config.json and {PRETRAINED_WEIGHTS} (what "
                         f"pysparse.nn.save_pretrained writes)")
    try:
        import transformers
    except ImportError:
        raise ValueError("load_pretrained: needs transformers (pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = _transformers_class(transformers, config, names[0]) if names else None
        if model_class is None:
            raise ValueError(f"load_pretrained: the config in {str(folder)!r} names no model class transformers has "
                             f"(architectures={names!r}); pass model_class=")
    return load_sparse(model_class(config), weights)
