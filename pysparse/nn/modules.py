"""Drop-in modules over the fused ops: ``SparseFFN`` (``pysparse.pruned_ffn``) and
``MaskedAttention`` (``pysparse.masked_attention`` with a cached ``BlockMask``).

    ffn = SparseFFN.from_module(model.layers[0].mlp, format="nm")          # LLaMA MLP, 2:4 weights
    ffn = SparseFFN.from_module(nn.Sequential(fc1, nn.GELU(), fc2), neurons=0.5, format="csr", sparsity=0.8)
    attn = MaskedAttention("sliding_window", window=256)                  # for F.scaled_dot_product_attention
    out = attn(q, k, v)

SparseFFN trains (its weights' values, dense weights and biases are nn.Parameters, the patterns
fixed: pruned_ffn's backward, pysparse.autograd); MaskedAttention holds its mask as buffers and
passes gradients to q, k and v. ``state_dict``, ``.to()`` and ``torch.compile`` work as for any
module.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

from ..attention import BlockMask, masked_attention
from .. import activations
from ..ffn import pruned_ffn
from ..formats import Format
from ..prune import ffn_neurons
from .linear import SparseLinear

# ---------------------------------------------------------------------------------------------
# SparseFFN


def _activation_name(mod) -> Optional[str]:
    """pruned_ffn's name for an activation module, or None.

    nn.ReLU, nn.GELU (approximate "none" or "tanh") and nn.SiLU by type; any other module without
    parameters or buffers (e.g. Hugging Face's SiLUActivation, GELUActivation, NewGELUActivation)
    by what it computes on a grid of inputs, so that every spelling of these functions is accepted
    and nothing else is (gelu and its tanh form differ by 5e-4 there, far above the tolerance).
    """
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.SiLU):
        return "silu"
    if isinstance(mod, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(mod.approximate)
    if not isinstance(mod, nn.Module) or any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
        return None
    x = torch.linspace(-8.0, 8.0, 1601)
    try:
        with torch.no_grad():
            y = mod(x.clone())
    except Exception:  # noqa: BLE001  (not an elementwise activation)
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        return None
    for name in ("relu", "gelu", "gelu_tanh", "silu"):
        if torch.allclose(y, activations.apply(name, x), rtol=1e-5, atol=1e-5):
            return name
    return None


def _as_linear(W: torch.Tensor) -> nn.Linear:
    """An nn.Linear (no bias) around W, for SparseLinear.from_linear."""
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(W, requires_grad=False)
    return lin


class SparseFFN(nn.Module):
    """y = W2 act(W1 x + b1) + b2, or gated y = W2 (act(W1 x + b1) * (W3 x)) + b2, fused through
    ``pysparse.pruned_ffn``; each weight dense or CSR / BSR / SparseNM.

    A sparse weight is held by a ``SparseLinear`` submodule (``fc1``, ``fc2``, ``fc3``), a dense one
    by a parameter (``w1``, ``w2``, ``w3``); with ReLU a dense W2 is stored transposed as ``w2t``
    (hidden, d), the layout in which the op reads only the rows of W2^T at nonzero activations.
    The biases are parameters ``b1`` and ``b2`` (or None). Everything trains with the patterns
    fixed (the sparse weights' stored values, the dense weights, the biases).

    Build one with ``from_linears`` or ``from_module``, or directly from weights in nn.Linear
    layout: w1 and w3 (hidden, d), w2 (d, hidden).
    """

    def __init__(self, w1, b1: Optional[torch.Tensor], w2, b2: Optional[torch.Tensor], *,
                 activation: str = "gelu", w3=None):
        super().__init__()
        activations.check(activation, "SparseFFN")
        for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
            if not (isinstance(w, Format) or (isinstance(w, torch.Tensor) and w.dim() == 2) or (w is None and name == "w3")):
                raise TypeError(f"SparseFFN: {name} must be a 2-D tensor, CSR, BSR or SparseNM, got "
                                f"{type(w).__name__ if not isinstance(w, torch.Tensor) else f'shape {tuple(w.shape)}'}")
        hidden, d = (int(s) for s in w1.shape)
        want = {"w1": (hidden, d), "w2": (d, hidden), "w3": (hidden, d), "b1": (hidden,), "b2": (d,)}
        tensors = {"w1": w1, "w2": w2, "w3": w3, "b1": b1, "b2": b2}
        for name, t in tensors.items():
            if t is not None and tuple(t.shape) != want[name]:
                raise ValueError(f"SparseFFN: {name} must have shape {want[name]} (from w1's {(hidden, d)}), "
                                 f"got {tuple(t.shape)}")
        dtypes = {name: (t.values.dtype if isinstance(t, Format) else t.dtype) for name, t in tensors.items() if t is not None}
        if len(set(dtypes.values())) > 1:
            raise TypeError(f"SparseFFN: weights and biases must share one dtype, got {dtypes}")
        devices = {name: t.device for name, t in tensors.items() if t is not None}
        if len(set(devices.values())) > 1:
            raise ValueError(f"SparseFFN: weights and biases must be on one device, got {devices}")
        self.in_features, self.hidden_features = d, hidden
        self.activation, self.gated = activation, w3 is not None
        # How each weight is held: "module" (SparseLinear fc<i>), "dense" (buffer w<i>), "dense_t"
        # (w2 only: buffer w2t holding W2^T contiguous) or None (no w3). Plain Python: compile
        # specialises on it.
        store = []
        for i, w in ((1, w1), (2, w2), (3, w3)):
            if w is None:
                store.append(None)
            elif isinstance(w, Format):
                self.add_module(f"fc{i}", SparseLinear(w))
                store.append("module")
            elif i == 2 and activation == "relu":
                self._keep("w2t", w.t().contiguous())
                store.append("dense_t")
            else:
                self._keep(f"w{i}", w)
                store.append("dense")
        self._store: Tuple[Optional[str], ...] = tuple(store)
        self.formats: Tuple[Optional[str], ...] = tuple(
            None if w is None else ("dense_t" if s == "dense_t" else w.format_name if isinstance(w, Format) else "dense")
            for w, s in zip((w1, w2, w3), store))
        self._keep("b1", b1)
        self._keep("b2", b2)

    def _keep(self, name: str, t: Optional[torch.Tensor]) -> None:
        """A floating-point tensor as a trainable parameter (None as a None buffer)."""
        if t is not None and t.is_floating_point():
            self.register_parameter(name, nn.Parameter(t, requires_grad=True))
        else:
            self.register_buffer(name, t)

    def _weight(self, i: int):
        kind = self._store[i - 1]
        if kind == "module":
            return getattr(self, f"fc{i}").weight
        if kind == "dense_t":
            return self.w2t.t()
        if kind == "dense":
            return getattr(self, f"w{i}")
        return None

    @property
    def weights(self):
        """(w1, w2, w3) as pruned_ffn takes them: dense tensors or format objects (w3 None if not gated)."""
        return self._weight(1), self._weight(2), self._weight(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseFFN: x must have shape (..., {self.in_features}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        w1, w2, w3 = self.weights
        return pruned_ffn(x, w1, self.b1, w2, self.b2, activation=self.activation, w3=w3)

    @classmethod
    def from_linears(cls, up: nn.Linear, down: nn.Linear, activation: str = "gelu", gate: Optional[nn.Linear] = None, *,
                     format: Optional[str] = None, sparsity: float = 0.0, n: int = 2, m: int = 4,
                     blocksize: Tuple[int, int] = (32, 32), neurons: float = 0.0,
                     criterion: Union[str, torch.Tensor] = "l2") -> "SparseFFN":
        """From y = down(act(up(x))), or with ``gate`` y = down(act(gate(x)) * up(x)) (LLaMA's MLP).

        neurons: the fraction of intermediate neurons to drop first (``pysparse.prune.ffn_neurons``
        with ``criterion``, "l1", "l2" or a tensor of hidden scores), which leaves smaller dense
        weights. format: None keeps the weights dense; "csr", "bsr" or "nm" stores all of them in
        that format as ``SparseLinear.from_linear`` does (``sparsity`` for csr and bsr,
        ``blocksize`` for bsr, ``n``:``m`` for nm). The given modules are not modified.
        """
        for name, lin in (("up", up), ("down", down), ("gate", gate)):
            if not isinstance(lin, nn.Linear) and not (lin is None and name == "gate"):
                raise TypeError(f"SparseFFN.from_linears: {name} must be an nn.Linear, got {type(lin).__name__}")
        if format not in (None, "csr", "bsr", "nm"):
            raise ValueError(f"SparseFFN.from_linears: format must be None, 'csr', 'bsr' or 'nm', got {format!r}")
        if format is None and sparsity:
            raise ValueError("SparseFFN.from_linears: sparsity needs format='csr' or 'bsr' (format=None keeps the weights dense)")
        if gate is not None and up.bias is not None:
            raise ValueError("SparseFFN.from_linears: a gated FFN cannot have a bias on up (pruned_ffn's W3 x has none)")
        if up.out_features != down.in_features or up.in_features != down.out_features or (
                gate is not None and tuple(gate.weight.shape) != tuple(up.weight.shape)):
            shapes = [tuple(lin.weight.shape) for lin in (up, down, gate) if lin is not None]
            raise ValueError(f"SparseFFN.from_linears: need up (hidden, d), down (d, hidden) and gate like up, "
                             f"got weights of shapes {shapes}")
        with torch.no_grad():
            first = gate if gate is not None else up
            w1 = first.weight.detach().clone()
            b1 = None if first.bias is None else first.bias.detach().clone()
            w3 = up.weight.detach().clone() if gate is not None else None
            w2 = down.weight.detach().clone()
            b2 = None if down.bias is None else down.bias.detach().clone()
            if neurons:
                w1, b1, w2, w3, _ = ffn_neurons(w1, b1, w2, neurons, criterion, w3=w3)
            if format is not None:
                w1, w2, w3 = (None if w is None else SparseLinear.from_linear(
                    _as_linear(w), format, sparsity=sparsity, blocksize=blocksize, n=n, m=m).weight
                    for w in (w1, w2, w3))
        return cls(w1, b1, w2, b2, activation=activation, w3=w3)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "SparseFFN":
        """From a feed-forward block: ``nn.Sequential(Linear, activation, Linear)`` (nn.Dropout and
        nn.Identity entries are skipped: inference) or a LLaMA-style gated MLP (``gate_proj``,
        ``up_proj``, ``down_proj``, ``act_fn``, as in Llama, Mistral, Qwen2, Gemma). The activation
        must compute ReLU, GELU (erf or tanh) or SiLU. kwargs as for ``from_linears``."""
        if isinstance(module, nn.Sequential):
            layers = [mod for mod in module if not isinstance(mod, (nn.Dropout, nn.Identity))]
            if len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear):
                return cls.from_linears(layers[0], layers[2], cls._activation_of(layers[1], module), **kwargs)
        elif all(isinstance(getattr(module, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            act = cls._activation_of(getattr(module, "act_fn", None), module)
            return cls.from_linears(module.up_proj, module.down_proj, act, gate=module.gate_proj, **kwargs)
        raise ValueError(f"SparseFFN.from_module: {type(module).__name__} is not a recognised feed-forward block "
                         f"(nn.Sequential(Linear, activation, Linear) or a MLP with gate_proj, up_proj, down_proj)")

    @staticmethod
    def _activation_of(act, module: nn.Module) -> str:
        name = _activation_name(act)
        if name is None:
            raise ValueError(f"SparseFFN.from_module: the activation {type(act).__name__} of {type(module).__name__} "
                             f"is not ReLU, GELU (erf or tanh) or SiLU")
        return name

    def extra_repr(self) -> str:
        names = ("w1", "w2", "w3") if self.gated else ("w1", "w2")
        fmts = ", ".join(f"{n}={f}" for n, f in zip(names, self.formats))
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"activation={self.activation}, gated={self.gated}, {fmts}")


# ---------------------------------------------------------------------------------------------
# MaskedAttention


def _block_mask_to(bm: BlockMask, device: torch.device) -> BlockMask:
    if bm.device == device:
        return bm
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return BlockMask(move(bm.kind), bm.block_size, bm.seq_lens, elem_mask=move(bm.elem_mask), band=bm.band,
                     kv_len=move(bm.kv_len))


class MaskedAttention(nn.Module):
    """A drop-in for ``F.scaled_dot_product_attention`` that skips the tiles its mask rules out.

    mask: None (no structural mask), "causal", "sliding_window" (causal, the ``window`` latest
    keys: i - window < j <= i) or a callable ``mask(Lq, Lk) -> BlockMask`` for other patterns.
    The BlockMask (combined with causal when a call passes is_causal=True) is built once per
    (Lq, Lk, device, is_causal) and kept in ``cache``, an LRU dict of at most ``cache_size``
    entries (decoding with a growing key length would otherwise add one per token).
    block_size: (block_q, block_k), None for the device default.

    forward takes SDPA's arguments, (B, H, L, E) inputs: attn_mask (bool, True = attend, or float,
    added to the scores; broadcastable to (B, H, Lq, Lk), e.g. a (B, 1, 1, Lk) key padding mask)
    and is_causal (top-left aligned, as SDPA's) further restrict the module's mask. Differences
    from SDPA: dropout_p must be 0; grouped-query attention (H a multiple of Hkv) needs no
    enable_gqa; a query with no allowed key returns zeros (SDPA returns NaN); attn_mask together
    with is_causal is allowed.
    """

    def __init__(self, mask: Union[None, str, Callable[[int, int], BlockMask]] = None, window: Optional[int] = None,
                 block_size: Optional[Tuple[int, int]] = None, *, cache_size: int = 16):
        super().__init__()
        if not (mask is None or mask in ("causal", "sliding_window") or callable(mask)):
            raise ValueError(f"MaskedAttention: mask must be None, 'causal', 'sliding_window' or a callable, got {mask!r}")
        if mask == "sliding_window":
            if window is None or int(window) < 1:
                raise ValueError(f"MaskedAttention: mask='sliding_window' needs a window >= 1, got {window!r}")
            window = int(window)
        elif window is not None:
            raise ValueError(f"MaskedAttention: window applies to mask='sliding_window' only, got mask={mask!r}")
        if block_size is not None:
            block_size = tuple(int(b) for b in block_size)
            if len(block_size) != 2 or min(block_size) <= 0:
                raise ValueError(f"MaskedAttention: block_size must be two positive ints, got {block_size}")
        if cache_size < 1:
            raise ValueError(f"MaskedAttention: cache_size must be >= 1, got {cache_size}")
        self.mask, self.window, self.block_size, self.cache_size = mask, window, block_size, int(cache_size)
        self.cache: "OrderedDict[tuple, Optional[BlockMask]]" = OrderedDict()
        self.last_block_mask: Optional[BlockMask] = None
        self._called = False

    def _build(self, Lq: int, Lk: int, device: torch.device, is_causal: bool) -> Optional[BlockMask]:
        block = self.block_size
        if self.mask == "causal":
            bm = BlockMask.causal(Lq, Lk, block_size=block, device=device)
        elif self.mask == "sliding_window":
            bm = BlockMask.sliding_window(Lq, self.window, Lk=Lk, block_size=block, device=device)
        elif self.mask is not None:
            bm = self.mask(Lq, Lk)
            if not isinstance(bm, BlockMask):
                raise TypeError(f"MaskedAttention: the mask callable must return a BlockMask, got {type(bm).__name__}")
            if bm.seq_lens != (Lq, Lk):
                raise ValueError(f"MaskedAttention: the mask callable returned a BlockMask for "
                                 f"{bm.seq_lens[0]}x{bm.seq_lens[1]}, asked for {Lq}x{Lk}")
            bm = _block_mask_to(bm, device)
        else:
            bm = None
        if is_causal and self.mask not in ("causal", "sliding_window"):  # those are causal already
            c = BlockMask.causal(Lq, Lk, block_size=bm.block_size if bm is not None else block, device=device)
            bm = c if bm is None else bm & c
        return bm

    def block_mask(self, Lq: int, Lk: int, device="cpu", is_causal: bool = False) -> Optional[BlockMask]:
        """The (cached) BlockMask for these lengths; None when nothing is masked structurally."""
        key = (int(Lq), int(Lk), torch.device(device), bool(is_causal))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        bm = self._build(*key)
        self.cache[key] = bm
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return bm

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: Optional[float] = None, enable_gqa: bool = False) -> torch.Tensor:
        if dropout_p:
            raise ValueError(f"MaskedAttention: dropout_p must be 0 (attention dropout is not supported), got {dropout_p}")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"MaskedAttention: {name} must be a 4-D tensor (B, H, L, E), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        Lq, Lk = query.shape[2], key.shape[2]
        bm = self.block_mask(Lq, Lk, query.device, is_causal)
        self.last_block_mask, self._called = bm, True
        if attn_mask is not None and attn_mask.dim() >= 2 and (attn_mask.shape[-2], attn_mask.shape[-1]) != (Lq, Lk):
            # masked_attention builds its tiles from the mask's own last two sizes: broadcast a
            # (..., 1, Lk) key padding mask (or a (..., Lq, 1) one) over the other length first.
            rows = Lq if attn_mask.shape[-2] == 1 else attn_mask.shape[-2]
            cols = Lk if attn_mask.shape[-1] == 1 else attn_mask.shape[-1]
            attn_mask = attn_mask.expand(*attn_mask.shape[:-2], rows, cols)
        return masked_attention(query, key, value, block_mask=bm, attn_mask=attn_mask, scale=scale)

    @property
    def sparsity(self) -> Optional[float]:
        """Fraction of tiles the last call's BlockMask skipped (attn_mask not counted); 0.0 when it
        had none, None before the first call."""
        if not self._called:
            return None
        return 0.0 if self.last_block_mask is None else self.last_block_mask.sparsity

    def extra_repr(self) -> str:
        mask = getattr(self.mask, "__name__", type(self.mask).__name__) if callable(self.mask) else repr(self.mask)
        parts = [f"mask={mask}"]
        if self.window is not None:
            parts.append(f"window={self.window}")
        parts.append(f"block_size={self.block_size}")
        parts.append(f"cached={len(self.cache)}")
        return ", ".join(parts)
