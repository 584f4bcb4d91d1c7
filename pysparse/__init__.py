"""pysparse: native kernels that make pruned neural networks run faster in PyTorch.

    import torch, pysparse
    W = pysparse.prune.magnitude(torch.randn(3072, 768), sparsity=0.9)
    A = pysparse.CSR.from_dense(W)          # or pysparse.BSR.from_dense(W, blocksize=(32, 32))
    y = pysparse.spmm(A, X)                 # A @ X
    y = pysparse.linear(x, A, bias)         # x @ A.T + bias, the nn.Linear layout
    out = pysparse.masked_attention(q, k, v, block_mask=pysparse.BlockMask.causal(L))
"""
from ._loader import _C, _build_info
from . import activations, analyze, bench, nn, ops, prune
from . import autograd  # the backward passes of the ops (after ops: their fakes)
from .attention import BlockMask, masked_attention
from .ffn import pruned_ffn, transposed_w2
from .formats import BSR, CSR, Sparse24, SparseNM
from .nn import sparsify
from .ops import linear, spmm
from .recover import recover
from ._info import _load_gpu_kernels, info, set_cpu_isa  # last: registers the GPU kernels of the ops above

__version__ = _build_info.VERSION

__all__ = ["CSR", "BSR", "SparseNM", "Sparse24", "BlockMask", "spmm", "linear", "masked_attention", "pruned_ffn",
           "transposed_w2", "sparsify", "recover", "nn", "prune", "analyze", "ops", "activations", "bench", "info",
           "set_cpu_isa"]
