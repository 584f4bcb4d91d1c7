"""Drop-in modules over the pysparse formats and ops (the sparsify issue builds on these)."""
from .linear import SparseLinear
from .modules import MaskedAttention, SparseFFN
from .serialize import load_sparse, save_sparse
from .sparsify import sparsify

__all__ = ["SparseLinear", "SparseFFN", "MaskedAttention", "sparsify", "save_sparse", "load_sparse"]
