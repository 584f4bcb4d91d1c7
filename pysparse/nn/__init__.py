"""Drop-in modules over the pysparse formats and ops (the sparsify issue builds on these)."""
from .linear import SparseLinear
from .sparsify import sparsify

__all__ = ["SparseLinear", "sparsify"]
