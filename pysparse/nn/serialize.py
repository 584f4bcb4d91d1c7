"""Save and load a sparsified model as one safetensors file: plain tensors and a JSON list of the
swapped layers, no pickle, so loading never executes code; every index tensor is validated."""
from __future__ import annotations

import json
from typing import Dict

import torch

from .._safetensors import load_file, save_file
from .linear import SparseLinear

_KEY = "pysparse.sparse_layers"


def save_sparse(model: torch.nn.Module, path) -> None:
    """Write model.state_dict() and the names of its SparseLinear layers to `path`."""
    layers = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    tensors: Dict[str, torch.Tensor] = {k: v for k, v in model.state_dict().items() if v is not None}
    save_file(tensors, path, {_KEY: json.dumps(layers), "format": "pysparse"})


def load_sparse(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a file written by save_sparse into `model`, an instance of the same architecture
    (dense, e.g. freshly built): the recorded layers are swapped for SparseLinear modules built
    from the file, with the formats' full index checks (a tampered file is refused with a
    ValueError naming the problem), then every other tensor is loaded strictly. Returns model."""
    tensors, meta = load_file(path)
    if _KEY not in meta:
        raise ValueError(f"{path}: not a pysparse model file (no {_KEY!r} entry in its metadata)")
    try:
        layers = json.loads(meta[_KEY])
        assert isinstance(layers, list) and all(isinstance(n, str) for n in layers)
    except (ValueError, AssertionError):
        raise ValueError(f"{path}: the {_KEY!r} metadata is not a JSON list of module names") from None
    for name in layers:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: layer {name!r} does not exist in this model") from None
        sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            new = SparseLinear.from_state_dict(sub)
        except KeyError as e:
            raise ValueError(f"{path}: layer {name!r} lacks tensor {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{path}: layer {name!r}: {e}") from None
        if isinstance(old, torch.nn.Linear) and (old.in_features, old.out_features) != (new.in_features, new.out_features):
            raise ValueError(f"{path}: layer {name!r} is {new.out_features}x{new.in_features} in the file but "
                             f"{old.out_features}x{old.in_features} in the model")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.load_state_dict(tensors, strict=True)
    return model
