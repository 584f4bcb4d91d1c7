"""Hugging Face's NewGELUActivation ("gelu_new": GPT-2's, seven tensor ops) made its one-kernel
equal GELUTanh ("gelu_pytorch_tanh": the same formula, outputs within 3e-7). sparsify does it
(``fast_activations``), save_sparse records which modules, load_sparse redoes it on a fresh model."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

MARK = "_pysparse_fast_act"


def _classes():
    try:
        from transformers.activations import GELUTanh, NewGELUActivation
    except ImportError:  # no transformers, or one without these classes
        return None
    return GELUTanh, NewGELUActivation


def _config_keys(model) -> Optional[List[str]]:
    """The config entries naming "gelu_new", if switching them to "gelu_pytorch_tanh" survives a
    save and reload of the config (T5 derives its activation from another entry: it would not)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    keys = [k for k, v in config.to_dict().items() if v == "gelu_new"]
    try:
        reread = config.__class__.from_dict(dict(config.to_dict(), **{k: "gelu_pytorch_tanh" for k in keys}))
    except Exception:
        return None
    return keys if keys and all(getattr(reread, k, None) == "gelu_pytorch_tanh" for k in keys) else None


def swap_new_gelu(model: torch.nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Replace NewGELUActivation modules by GELUTanh, in place, and the config's "gelu_new" by
    "gelu_pytorch_tanh": all of them (names None; only where the config can record it), or those
    named (load_sparse: a ValueError for a name that is neither). Returns the names swapped."""
    if names is not None and not names:
        return []
    cls = _classes()
    if cls is None:
        if names:
            raise ValueError("load_sparse: the file swapped GPT-2-style GELU activations, which needs transformers")
        return []
    fast, slow = cls
    keys = _config_keys(model) or []
    if names is None:
        names = [n for n, m in model.named_modules() if type(m) is slow] if keys else []
    done = []
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_sparse: activation {name!r} does not exist in this model") from None
        if type(m) is slow:
            m = fast()
            model.set_submodule(name, m)
        elif type(m) is not fast:
            raise ValueError(f"load_sparse: {name!r} was a GELU made GELUTanh, but is a {type(m).__name__} here")
        setattr(m, MARK, True)
        done.append(name)
    config = getattr(model, "config", None)
    for k in keys if done else []:
        setattr(config, k, "gelu_pytorch_tanh")
    return done
