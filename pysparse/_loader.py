"""Loads pysparse._C after checking it was built for the torch that is installed.

A kernel extension built against one torch and imported next to another fails with an
undefined-symbol traceback (the top complaint of torch_sparse users); we compare the versions
recorded at build time first and say in one sentence what to install instead.
"""
import importlib

import torch

try:
    from . import _build_info
except ImportError as e:  # pragma: no cover - only in an unbuilt source tree
    raise ImportError(
        "pysparse is not built: run `make build` (or `pip install .`) in the source tree first"
    ) from e


def _release(version: str) -> str:
    return version.split("+")[0]


def _check_torch_matches() -> None:
    built, have = _build_info.TORCH_VERSION, torch.__version__
    built_cuda, have_cuda = _build_info.CUDA_VERSION, torch.version.cuda
    if _release(built) != _release(have) or (built_cuda is not None and built_cuda != have_cuda):
        wheel = f"+cu{have_cuda.replace('.', '')}" if have_cuda else "+cpu"
        raise ImportError(
            f"pysparse {_build_info.VERSION} was built for torch {built}"
            f" (CUDA {built_cuda or 'none'}) but torch {have} (CUDA {have_cuda or 'none'}) is"
            f" installed: install the pysparse-kernels wheel built for torch {_release(have)}"
            f" ({wheel}), or rebuild pysparse from source against this torch"
        )


_check_torch_matches()
_C = importlib.import_module("pysparse._C")
