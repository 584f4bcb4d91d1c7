"""The tanh-form GELU on pysparse's vector kernel. torch's tanh-form GELU runs ~4-7x its erf form
on CPU (benchmarks/RESULTS.md, "GELU"), and Hugging Face's ``NewGELUActivation`` (GPT-2's
"gelu_new") is seven tensor ops of it. sparsify replaces every module that computes this function
by ``FastGELUTanh`` (``fast_activations``): Hugging Face's ``NewGELUActivation``,
``FastGELUActivation`` and ``GELUTanh`` and torch's ``nn.GELU(approximate="tanh")``. save_sparse
records which modules, load_sparse redoes it on a fresh model. The model's config is left as it is:
the function is the same (outputs within 3e-7 of NewGELU's)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import activations


class FastGELUTanh(torch.nn.Module):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) through ``pysparse.activations.apply``: the op
    pysparse::activation (on CPU pysparse's vector kernel, within eps |x| of the exact function, as
    torch's own is; differentiable; traced whole by torch.compile)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activations.apply("gelu_tanh", x)


def _hf_classes() -> tuple:
    """Hugging Face's modules that compute the tanh-form GELU (none without transformers)."""
    try:
        from transformers import activations as hf
    except ImportError:
        return ()
    return tuple(c for c in (getattr(hf, n, None) for n in ("NewGELUActivation", "FastGELUActivation", "GELUTanh"))
                 if c is not None)


def _computes_gelu_tanh(m: torch.nn.Module, hf: tuple) -> bool:
    return type(m) in hf or (type(m) is torch.nn.GELU and m.approximate == "tanh")


def swap_gelu_tanh(model: torch.nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Replace the tanh-form GELU modules by FastGELUTanh, in place: all of them (names None), or
    those named (load_sparse: a ValueError for a name that is no such module). Returns the names."""
    if names is not None and not names:
        return []
    hf = _hf_classes()
    if names is None:
        names = [n for n, m in model.named_modules() if _computes_gelu_tanh(m, hf)]
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_sparse: activation {name!r} does not exist in this model") from None
        if _computes_gelu_tanh(m, hf):
            model.set_submodule(name, FastGELUTanh())
        elif type(m) is not FastGELUTanh:
            raise ValueError(f"load_sparse: {name!r} was a tanh-form GELU made FastGELUTanh, but is a "
                             f"{type(m).__name__} here")
    return list(names)
