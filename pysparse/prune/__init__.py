"""Pruning utilities: they return dense tensors with zeros, ready for a sparse format, or smaller
dense weights and models (FFN neurons, attention heads, CNN filters)."""
from .ffn import PrunedFFN, ffn_neurons
from .filters import filter_groups, filters
from .iterative import Iterative
from .magnitude import blocks, magnitude
from .nm import nm
from .structured import Passthrough, attention_parts, ffn_parts, prune_heads, prune_neurons

__all__ = ["magnitude", "blocks", "nm", "ffn_neurons", "PrunedFFN", "prune_heads", "prune_neurons",
           "attention_parts", "ffn_parts", "Passthrough", "filters", "filter_groups", "Iterative"]
