"""The activations pysparse's fused ops take, by name: the one table every op and module uses.

    pysparse.linear(x, A24, activation="gelu_tanh")
    pysparse.pruned_ffn(x, w1, b1, w2, b2, activation="silu")

The C++ ops parse the same names (csrc/include/activations.h) and the Triton kernels encode them
as integer codes (pysparse/_triton/kernels/_tiles.py). "gelu" is the erf form, "gelu_tanh" the
tanh approximation (torch's ``approximate="tanh"``).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda t: t,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}
NAMES = tuple(ACTIVATIONS)


def check(name: str, where: str) -> None:
    """ValueError naming `where` unless `name` is one of NAMES."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {NAMES}, got {name!r}")


def apply(name: str, t: torch.Tensor) -> torch.Tensor:
    """t through the activation `name` (out of place)."""
    return ACTIVATIONS[name](t)
