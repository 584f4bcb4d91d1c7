"""The activations pysparse's fused ops take, by name: the one table every op and module uses.

    pysparse.linear(x, A24, activation="gelu_tanh")
    pysparse.pruned_ffn(x, w1, b1, w2, b2, activation="silu")
    pysparse.activations.apply("gelu_tanh", x)        # the op torch.ops.pysparse.activation

``apply`` runs the registered op ``pysparse::activation`` (differentiable, traceable by
torch.compile): on CPU its gelu_tanh is pysparse's vector kernel (~5x torch's on this repository's
CPUs: benchmarks/RESULTS.md, "GELU"), within eps |x| of the exact function as torch's own is;
every other name, and other devices, run torch's kernels (the ACTIVATIONS table below).

The C++ ops parse the same names (csrc/include/activations.h) and the Triton kernels encode them
as integer codes (pysparse/_triton/kernels/_tiles.py). "gelu" is the erf form, "gelu_tanh" the
tanh approximation (torch's ``approximate="tanh"``).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ._loader import _C  # noqa: F401  (loads the library that defines the op)

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
    """t through the activation `name` (out of place): the op pysparse::activation."""
    check(name, "pysparse.activations.apply")
    if t.device.type not in ("cpu", "cuda", "meta"):  # the op has kernels for these
        return ACTIVATIONS[name](t)
    return torch.ops.pysparse.activation(t, name)


@torch.library.register_fake("pysparse::activation")
def _activation_fake(x, activation):
    check(activation, "pysparse.activations.apply")
    torch._check(x.is_floating_point(), lambda: f"pysparse: activation input must be a floating-point tensor, got {x.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_kernel("pysparse::activation", "cuda")
def _activation_cuda(x, activation):
    check(activation, "pysparse.activations.apply")
    y = ACTIVATIONS[activation](x)
    return (y.clone() if y is x else y).contiguous()
