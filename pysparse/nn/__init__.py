"""Drop-in modules over the pysparse formats and ops (the sparsify issue builds on these)."""
from .linear import SparseLinear

__all__ = ["SparseLinear"]
