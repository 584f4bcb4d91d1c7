"""Drop-in modules over the pysparse formats and ops, and sparsify(model, recipe), which swaps them in."""
from .conv import SparseConv2d
from .fast_act import FastGELUTanh
from .linear import SparseLinear
from .modules import MaskedAttention, SparseFFN
from .serialize import load_pretrained, load_sparse, save_pretrained, save_sparse
from ._sparsify import sparsify

__all__ = ["SparseLinear", "SparseConv2d", "SparseFFN", "MaskedAttention", "sparsify", "save_sparse", "load_sparse",
           "save_pretrained", "load_pretrained", "FastGELUTanh"]
