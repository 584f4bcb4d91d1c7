"""Drop-in modules over the pysparse formats and ops (the sparsify issue builds on these)."""
from .linear import SparseLinear
from .serialize import load_sparse, save_sparse
from .sparsify import sparsify

__all__ = ["SparseLinear", "sparsify", "save_sparse", "load_sparse"]
