"""Pruning utilities: they return dense tensors with zeros, ready for a sparse format, or smaller
dense weights and models (FFN neurons, attention heads, CNN filters).

Tensors in, tensors out: `magnitude`, `blocks`, `nm`, `sparsegpt` (prunes and updates the kept
weights from the layer's input Hessian, `hessian`), `ffn_neurons` (chooses and slices FFN
weights). Modules changed in place: `shrink_attention` / `shrink_ffn` / `shrink_experts` (to the heads /
neurons given). Models: `filters` (a smaller copy of a CNN), `Iterative` (gradually, while training).
"""
from .ffn import PrunedFFN, ffn_neurons
from .filters import filter_groups, filters
from .iterative import Iterative
from .magnitude import blocks, magnitude
from .nm import nm
from .sparsegpt import hessian, sparsegpt
from .structured import (Passthrough, attention_parts, expert_parts, ffn_parts, prune_heads, prune_neurons,
                         shrink_attention, shrink_experts, shrink_ffn, t5_own_position_bias)

__all__ = ["magnitude", "blocks", "nm", "sparsegpt", "hessian", "ffn_neurons", "PrunedFFN", "shrink_attention", "shrink_ffn",
           "shrink_experts", "attention_parts", "ffn_parts", "expert_parts", "t5_own_position_bias", "Passthrough",
           "filters", "filter_groups", "Iterative",
           "prune_heads", "prune_neurons"]  # the last two: deprecated names of shrink_attention / shrink_ffn
