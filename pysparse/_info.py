"""What was built and what runs here (pysparse.info), the CPU kernel choice (pysparse.set_cpu_isa),
and the registration of the Triton kernels where a GPU exists, with the reason where they are not."""
import warnings

import torch

from ._loader import _C, _build_info


def _load_gpu_kernels():
    """(triton version, None) once the Triton kernels are registered as the CUDA implementations
    of their ops, else (None, why not): info() reports it, instead of an ImportError swallowed."""
    if not torch.cuda.is_available():
        return None, "no CUDA device: torch.cuda.is_available() is False"
    try:
        import triton
    except ImportError as e:
        return None, f"triton cannot be imported ({e}): pip install triton"
    try:
        from . import _triton  # noqa: F401  (registers the kernels)
    except Exception as e:  # noqa: BLE001  (a defect of ours: say it, keep the CPU ops usable)
        why = f"pysparse._triton failed to import: {type(e).__name__}: {e}"
        warnings.warn(f"pysparse: GPU kernels unavailable; {why}", RuntimeWarning, stacklevel=2)
        return None, why
    return triton.__version__, None


_TRITON, _TRITON_WHY_NOT = _load_gpu_kernels()


def set_cpu_isa(name: str) -> str:
    """Select the CPU kernels: "scalar", "avx2", "avx512" or "auto" (the best this CPU has).

    The environment variable PYSPARSE_CPU_ISA does the same at first use. Returns the ISA now
    in use; raises RuntimeError for an ISA this CPU lacks.
    """
    return _C.set_cpu_isa(name)


def _selected_isa() -> str:
    """The ISA in use, or why none can be (a bad PYSPARSE_CPU_ISA): info() must always answer."""
    try:
        return _C.cpu_isa()
    except (ValueError, RuntimeError) as e:
        return f"none: {str(e).splitlines()[0]}"


def info() -> dict:
    """What was built and what runs here: versions, CPU ISA paths, threads, CUDA."""

    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pysparse::"))
    return {
        "pysparse": _build_info.VERSION,
        "kernel_hash": getattr(_build_info, "KERNEL_HASH", None),  # of the C++/CUDA sources built
        "torch_built_against": _C.torch_version(),
        "torch_runtime": torch.__version__,
        "cuda_built": _C.cuda_compiled(),
        "cuda_version_built": _build_info.CUDA_VERSION,
        "cuda_arch_list": _build_info.CUDA_ARCH_LIST,
        "cuda_available": torch.cuda.is_available(),
        "triton_kernels": _TRITON,  # triton version when the GPU kernels are registered, else None
        "triton_kernels_why_not": _TRITON_WHY_NOT,
        "cpu_isa_compiled": list(_build_info.CPU_ISA_COMPILED),
        "cpu_isa_supported": list(_C.cpu_isa_supported()),
        "cpu_isa_selected": _selected_isa(),
        "threads": torch.get_num_threads(),
        "ops": ops,
        # ops with a CUDA implementation registered (C++ kernels always when built with CUDA;
        # the Triton ones only where a GPU is present)
        "cuda_kernels": [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{n}", "CUDA")],
    }
