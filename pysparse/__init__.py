"""pysparse: native kernels that make pruned neural networks run faster in PyTorch.

    import torch, pysparse
    W = pysparse.prune.magnitude(torch.randn(3072, 768), sparsity=0.9)
    A = pysparse.CSR.from_dense(W)          # or pysparse.BSR.from_dense(W, blocksize=(32, 32))
    y = pysparse.spmm(A, X)                 # A @ X
    y = pysparse.linear(x, A, bias)         # x @ A.T + bias, the nn.Linear layout
    out = pysparse.masked_attention(q, k, v, block_mask=pysparse.BlockMask.causal(L))
"""
from ._loader import _C, _build_info
from . import analyze, nn, ops, prune
from .attention import BlockMask, masked_attention
from .ffn import pruned_ffn, transposed_w2
from .formats import BSR, CSR, Sparse24, SparseNM
from .nn import sparsify
from .ops import linear, spmm

__version__ = _build_info.VERSION


def _load_gpu_kernels():
    """Register the Triton kernels as the CUDA implementations of their ops (GPU machines only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from . import _triton  # noqa: F401
    except ImportError:
        return None
    import triton

    return triton.__version__


_TRITON = _load_gpu_kernels()
__all__ = ["CSR", "BSR", "SparseNM", "Sparse24", "BlockMask", "spmm", "linear", "masked_attention", "pruned_ffn",
           "transposed_w2", "sparsify", "nn", "prune", "analyze", "ops", "info", "set_cpu_isa"]


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
    import torch

    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pysparse::"))
    return {
        "pysparse": __version__,
        "torch_built_against": _C.torch_version(),
        "torch_runtime": torch.__version__,
        "cuda_built": _C.cuda_compiled(),
        "cuda_version_built": _build_info.CUDA_VERSION,
        "cuda_arch_list": _build_info.CUDA_ARCH_LIST,
        "cuda_available": torch.cuda.is_available(),
        "triton_kernels": _TRITON,  # triton version when the GPU kernels are registered, else None
        "cpu_isa_compiled": list(_build_info.CPU_ISA_COMPILED),
        "cpu_isa_supported": list(_C.cpu_isa_supported()),
        "cpu_isa_selected": _selected_isa(),
        "threads": torch.get_num_threads(),
        "ops": ops,
        # ops with a CUDA implementation registered (C++ kernels always when built with CUDA;
        # the Triton ones only where a GPU is present)
        "cuda_kernels": [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{n}", "CUDA")],
    }
