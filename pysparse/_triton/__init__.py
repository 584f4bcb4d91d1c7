"""Triton launchers: the CUDA kernels of pysparse's ops (one module per op; the @triton.jit
kernels and their autotune configs are in kernels/<op>.py).

Importing this package needs triton; pysparse imports it where a GPU exists (pysparse.info()
says why when it does not). Each module registers its launcher with
``torch.library.register_kernel(..., "cuda")``, so the ops dispatch by device. Under
TRITON_INTERPRET=1 the launchers run on CPU tensors, which is how CI tests them.
"""
from .bsr_spmm import bsr_linear, bsr_spmm
from .csr_sddmm import csr_sddmm
from .masked_attention import masked_attention
from .nm_linear import nm_linear, nm_spmm
from .pruned_ffn import FFN_MAX_FUSED_TOKENS, pruned_ffn

__all__ = ["bsr_linear", "bsr_spmm", "csr_sddmm", "masked_attention", "nm_linear", "nm_spmm", "pruned_ffn", "FFN_MAX_FUSED_TOKENS"]
