"""Pruning utilities: they return dense tensors with zeros, ready for a sparse format."""
from .magnitude import blocks, magnitude
from .nm import nm

__all__ = ["magnitude", "blocks", "nm"]
