"""Pruning utilities: they return dense tensors with zeros, ready for a sparse format."""
from .magnitude import blocks, magnitude

__all__ = ["magnitude", "blocks"]
