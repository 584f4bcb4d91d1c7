"""``SparseConv2d``: nn.Conv2d with its weight in a pysparse format.

A convolution is a matrix product with the weight viewed as W (Cout, Cin/groups * kh * kw), the
K axis ordered (Cin, kh, kw) as ``conv.weight.reshape(Cout, -1)`` and ``F.unfold`` both order it:

* 1x1, no padding: Y[n] = W @ X[n] with X[n] = x[n].view(Cin, H * W) (after subsampling by the
  stride). No im2col, and the product's output is already NCHW.
* k x k: im2col then Y = W @ cols, by chunks of output rows of one image whose im2col (a copy of
  a strided view of the padded input, K ordered as F.unfold, into a reused per-thread buffer)
  stays under ``_IM2COL_BYTES``. Under torch.compile: one F.unfold and one batched product.
* groups > 1: one sparse matrix per group, applied to its channel slice. Depthwise layers
  (Cin / groups == 1) keep the pruned weight dense and run ``F.conv2d``: each output channel
  reads kh * kw inputs, nothing a sparse product could skip profitably.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import prune
from ..formats import BSR, CSR, FORMATS, Format, SparseNM, build, format_name
from ..ops import linear_tensors, spmm_tensors


# Largest im2col chunk (bytes): output rows of one image per product. Measured (3x3 ResNet-50
# layers at 90%, 1 thread): 1-2 MiB chunks beat whole images by 1.2-2x, and from 4 MiB on glibc
# returns the freed chunk to the OS, so every chunk page-faults again (a 64 x 56x56 3x3 layer at
# batch 8 took 40 ms with one 29 MB F.unfold per 4 images, 6.4 ms with 2 MiB chunks).
_IM2COL_BYTES = 2 * 2**20

_WORKSPACE = threading.local()


def _workspace(numel: int, like: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """A 1-D scratch tensor of `numel` elements of like's dtype, kept per thread (CPU) and reused
    by every im2col chunk. A fresh ~2 MiB tensor per chunk page-faults in full whenever glibc has
    handed the previous one back to the OS, which depends on the process's allocation history:
    64->64 3x3 at 56x56, 90%, batch 1, as the first layer a process runs, took 1.5 ms (0.36x of
    nn.Conv2d) with fresh chunks and 0.4 ms (1.38x) with this buffer; neutral within a network."""
    # CUDA's caching allocator already reuses memory; a chunk that autograd records (fresh) is
    # saved for the backward and must not be overwritten by the next; a traced graph must not
    # capture the buffer as a constant.
    if fresh or like.device.type != "cpu" or torch.jit.is_tracing():
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    buf = bufs.get(like.dtype)
    if buf is None or buf.numel() < numel:
        # A normal tensor even under inference_mode: an inference tensor could not be written
        # in place by a later call outside it.
        with torch.inference_mode(False):
            buf = bufs[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel]


def _prefix(groups: int, g: int) -> str:
    """Buffer-name prefix of group g's matrix."""
    return "weight_" if groups == 1 else f"weight{g}_"


# BSR block sizes tried when none is given: the largest square block dividing the matrix.
_AUTO_BLOCKS = (32, 16, 8, 4)

def _pair(v, what: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"SparseConv2d: {what} must be an int or a pair, got {v!r}")
    return t


def _checked_config(config) -> dict:
    """A config() read back from a file, with every entry of the expected type: a tampered file
    gets a ValueError naming the entry (a group count of 0 once divided by zero)."""
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "kind", "nm")
    if not isinstance(config, dict) or set(config) != set(keys):
        raise ValueError(f"SparseConv2d config must have the entries {', '.join(keys)}, got "
                         + (", ".join(map(str, config)) if isinstance(config, dict) else type(config).__name__))

    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    c = dict(config)
    for k, low in (("in_channels", 1), ("out_channels", 1), ("groups", 1)):
        if not is_int(c[k], low):
            raise ValueError(f"SparseConv2d config: {k} must be an integer >= {low}, got {c[k]!r}")
    for k, low in (("kernel_size", 1), ("stride", 1), ("dilation", 1), ("padding", 0), ("nm", 0)):
        v = c[k]
        if k == "padding" and v in ("same", "valid"):
            continue
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(x, low) for x in v)):
            raise ValueError(f"SparseConv2d config: {k} must be two integers >= {low}, got {v!r}")
    if c["kind"] not in ("csr", "bsr", "nm", "dense"):
        raise ValueError(f"SparseConv2d config: kind must be csr, bsr, nm or dense, got {c['kind']!r}")
    return c


class SparseConv2d(torch.nn.Module):
    """y = conv2d(x, W) + b with W held as CSR, BSR or N:M per group, a drop-in for nn.Conv2d.

    Build it with :meth:`from_conv`; go back with :meth:`to_conv`. The format's tensors are named
    ``weight_<field>`` (groups == 1) or ``weight<g>_<field>`` (group g), plus ``bias``; depthwise
    layers hold a dense ``weight`` instead (see the module docstring). Values, dense weights and
    the bias are nn.Parameters: the layer trains with the pattern fixed (the ops' backward,
    pysparse.autograd; in train mode k x k layers run one F.unfold and one product per group,
    which is what gets differentiated); indices and N:M masks are buffers. So ``.to()``, ``state_dict()`` /
    ``load_state_dict()`` into an identically built module and ``torch.compile`` work as for any
    module. Input NCHW or channels_last (the output has the input's memory format), float32,
    bfloat16 or float16 (the weight's dtype: convert the module with ``.to(dtype)``).

    Dispatch (``forward``):

    * 1x1, no padding, NCHW input: one ``csr_spmm(W, x.view(N, Cin, H*W))`` over the batch
      (after subsampling by the stride); each image's (Cout, H*W) product is written in place
      into the NCHW output, the bias added after. The CPU op gives each thread whole images.
    * 1x1, channels_last input: one ``csr_linear`` over the (N*H*W, Cin) view, bias fused; the
      (N*H*W, Cout) product is the channels_last output.
    * k x k (or padded 1x1): im2col by chunks of output rows (``_IM2COL_BYTES``) into a buffer
      reused per thread, then spmm; under ``torch.compile`` one ``F.unfold`` and one batched
      product per group instead.
    * depthwise: ``F.conv2d`` with the pruned dense weight.

    Measured on 2 Zen 5 cores (torch.set_num_threads(2)), fp32, 90% unstructured CSR against
    nn.Conv2d (oneDNN) with the same weights, no bias, ResNet-50 shapes at 224x224 input,
    alternating rounds (benchmarks/bench_conv.py; RESULTS.md has the table and how it got there):

    * 1x1: batch 1 2.8x (1024 -> 256, 14x14) to 3.9x (128 -> 512, 28x28); batch 8 2.6x (2048
      -> 512, 7x7) to 15.6x (64 -> 64, 56x56; that small layer varies most between runs,
      17.8x / 19.9x in another). The CPU op runs a batch with whole images per thread, packs wide
      operands a strip of panels at a time (rows prefetched: NCHW rows are strided), and splits
      one image between threads by panels, so no thread reads what another packed (the VM
      measured here did not always let its two vCPUs share a cache).
    * 3x3: batch 1 1.3x (64 ch, 56x56) to 2.6x (512 ch, 7x7); batch 8 1.16x to 1.7x (bound by
      the product: im2col is ~1/4 of the time).
    * 2:4 is slower than torch's dense conv at these widths (0.4-0.8x); sparsify's timed choice
      keeps such layers dense.
    """

    def __init__(self, weights: Sequence, bias: Optional[torch.Tensor], in_channels: int, out_channels: int,
                 kernel_size, stride=1, padding: Union[int, Tuple[int, int], str] = 0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", *, dense_weight: Optional[torch.Tensor] = None):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.padding_mode = padding_mode
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"SparseConv2d: groups ({groups}) must divide in_channels ({in_channels}) "
                             f"and out_channels ({out_channels})")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self._pads = self._resolve_padding(self.padding)
        kh, kw = self.kernel_size
        self._kg = self.in_channels // self.groups * kh * kw  # columns of one group's matrix
        self._cg = self.out_channels // self.groups           # rows of one group's matrix
        self.depthwise = dense_weight is not None
        if self.depthwise:
            shape = (self.out_channels, self.in_channels // self.groups, kh, kw)
            if tuple(dense_weight.shape) != shape:
                raise ValueError(f"SparseConv2d: the dense weight must have shape {shape}, got {tuple(dense_weight.shape)}")
            self.kind, self.nm = "dense", (0, 0)
            self._register("weight", dense_weight)
        else:
            weights = list(weights)
            if len(weights) != self.groups:
                raise ValueError(f"SparseConv2d: need one sparse matrix per group ({self.groups}), got {len(weights)}")
            first = weights[0]
            if not isinstance(first, Format):
                raise TypeError(f"SparseConv2d needs CSR, BSR or SparseNM weights, got {type(first).__name__}")
            self.kind = first.kind
            self.nm = first.nm
            for g, A in enumerate(weights):
                if type(A) is not type(first) or tuple(A.shape) != (self._cg, self._kg):
                    raise ValueError(f"SparseConv2d: group {g}'s matrix must be a {type(first).__name__} of shape "
                                     f"{(self._cg, self._kg)}, got {type(A).__name__} {tuple(A.shape)}")
                for name in self._fields():
                    self._register(self._prefix(g) + name, getattr(A, name), trainable=name == "values")
        # forward calls the ops on the buffers directly: building format objects cost 3.7 us a
        # call, a quarter of a small layer's Python time
        self._names = [] if self.depthwise else [[self._prefix(g) + f for f in self._fields()] for g in range(self.groups)]
        self._shape = [self._cg, self._kg]
        if bias is not None and tuple(bias.shape) != (self.out_channels,):
            raise ValueError(f"SparseConv2d: bias must have shape ({self.out_channels},), got {tuple(bias.shape)}")
        ref = dense_weight if self.depthwise else first.values
        if bias is not None and (bias.dtype != ref.dtype or bias.device != ref.device):
            raise ValueError(f"SparseConv2d: bias is {bias.dtype} on {bias.device} but the weight is "
                             f"{ref.dtype} on {ref.device}; convert one of them")
        self._register("bias", bias)

    # -- structure ------------------------------------------------------------------------------

    def _register(self, name: str, t: Optional[torch.Tensor], trainable: bool = True) -> None:
        """Values, dense weights and the bias are nn.Parameters (floating point: the ops have a
        backward, pysparse.autograd); indices, N:M masks and int8 values are buffers."""
        if t is not None and trainable and t.is_floating_point():
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=True))
        else:
            self.register_buffer(name, t)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight" or self.groups != 1 or self.depthwise:
                raise
        # As SparseLinear.weight: the format object (models read conv.weight.dtype / .device, e.g.
        # Hugging Face's ViT and CLIP patch embeddings); depthwise layers keep a dense `weight`.
        return self.sparse_weights[0]

    def _tensor(self, name: str) -> torch.Tensor:
        p = self._parameters.get(name)
        return p if p is not None else self._buffers[name]

    def _records_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd records this forward (then im2col runs as one differentiable F.unfold)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._parameters.values()
                                                                   if p is not None))

    def _fields(self):
        return FORMATS[self.kind].fields

    def _prefix(self, g: int) -> str:
        return _prefix(self.groups, g)

    def _resolve_padding(self, padding) -> Tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding."""
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError("SparseConv2d: padding='same' needs stride 1 (as nn.Conv2d)")
            th, tw = dh * (kh - 1), dw * (kw - 1)  # torch puts the odd pixel at the end
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        if isinstance(padding, str):
            raise ValueError(f"SparseConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        ph, pw = padding
        return (pw, pw, ph, ph)

    @property
    def sparse_weights(self) -> List:
        """One format object per group (sharing the buffers); empty for depthwise layers."""
        if self.depthwise:
            return []
        shape = (self._cg, self._kg)
        return [build(self.kind, [getattr(self, self._prefix(g) + f) for f in self._fields()], shape, self.nm,
                       check=False) for g in range(self.groups)]

    def dense_weight(self) -> torch.Tensor:
        """The pruned weight, dense, in nn.Conv2d's shape (Cout, Cin / groups, kh, kw)."""
        if self.depthwise:
            return self.weight
        W = torch.cat([A.to_dense() for A in self.sparse_weights])
        return W.view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def density(self) -> float:
        if self.depthwise:
            return float((self.weight != 0).float().mean())
        return sum(A.density for A in self.sparse_weights) / self.groups

    @property
    def format_name(self) -> str:
        """"csr", "bsr", "n:m" (e.g. "2:4"), or "dense" for depthwise layers."""
        return format_name(self.kind, self.nm)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, format={self.format_name}, density={self.density:.3f}"

    # -- conversion -----------------------------------------------------------------------------

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, format: str = "csr", *, sparsity: float = 0.0,
                  blocksize: Optional[Tuple[int, int]] = None, n: int = 2, m: int = 4,
                  scores: Optional[torch.Tensor] = None) -> "SparseConv2d":
        """Prune an nn.Conv2d and store it sparse (the original module is not modified).

        The weight is pruned as the matrix W (Cout, Cin / groups * kh * kw), K ordered (Cin, kh, kw),
        each group's rows to the same sparsity (so modules built alike have buffers of one shape):
        format "csr": the ``sparsity`` fraction of smallest-|w| weights dropped (0 keeps the
        existing zeros only); "bsr": the ``sparsity`` fraction of blocks of ``blocksize`` with the
        smallest norm dropped (default: the largest of 32x32, 16x16, 8x8, 4x4 dividing
        every group's matrix); "nm": n of every m consecutive K entries kept per row (K must be a
        multiple of m), by |w| or by ``scores``: broadcastable to W (Cout, K), or, with 3 or 4
        dimensions, to the conv weight (Cout, Cin / groups, kh, kw), e.g. |weight| * x_norm[:, None, None]
        with x_norm (Cin,) per-input-channel norms of calibration activations (Wanda).
        """
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        if format not in FORMATS:
            raise ValueError(f"SparseConv2d.from_conv: format must be 'csr', 'bsr' or 'nm', got {format!r}")
        if scores is not None and format != "nm":
            raise ValueError(f"SparseConv2d.from_conv: scores apply to format='nm' only, got format={format!r}")
        G, Cout = conv.groups, conv.out_channels
        args = (conv.in_channels, Cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, G)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        with torch.no_grad():
            W4 = conv.weight.detach()
            W = W4.reshape(Cout, -1)
            Cg, Kg = Cout // G, W.shape[1]
            if format == "nm":
                if scores is not None and isinstance(scores, torch.Tensor) and scores.dim() >= 3:
                    try:
                        scores = torch.broadcast_to(scores, W4.shape).reshape(Cout, -1)
                    except RuntimeError:
                        raise ValueError(f"SparseConv2d.from_conv: scores of shape {tuple(scores.shape)} do not "
                                         f"broadcast to the conv weight's shape {tuple(W4.shape)}") from None
                P = prune.nm(W, n, m, scores=scores)
            elif format == "csr":
                P = torch.cat([prune.magnitude(w, sparsity) for w in W.split(Cg)]) if sparsity else W
            else:
                if blocksize is None:
                    fits = [b for b in _AUTO_BLOCKS if Cg % b == 0 and Kg % b == 0]
                    if not fits:
                        raise ValueError(f"SparseConv2d.from_conv: no block of {_AUTO_BLOCKS} divides each group's "
                                         f"{Cg}x{Kg} weight matrix; pass blocksize= or use format='csr'")
                    blocksize = (fits[0], fits[0])
                bh, bw = (int(b) for b in blocksize)
                if Cg % bh or Kg % bw:
                    raise ValueError(f"SparseConv2d.from_conv: each group's {Cg}x{Kg} weight matrix is not "
                                     f"divisible by the block size {(bh, bw)}")
                P = torch.cat([prune.blocks(w, sparsity, blocksize=(bh, bw)) for w in W.split(Cg)]) if sparsity else W
            if conv.in_channels == G:  # depthwise: run dense (see the module docstring); P may be conv's own weight
                out = cls([], bias, *args, dense_weight=P.reshape(W4.shape).clone(memory_format=torch.contiguous_format))
                return out.train(conv.training)
            parts = P.split(Cg)
            if format == "csr":
                mats = [CSR.from_dense(p) for p in parts]
            elif format == "bsr":
                mats = [BSR.from_dense(p, blocksize=blocksize) for p in parts]
            else:
                mats = [SparseNM.from_dense(p.contiguous(), n, m) for p in parts]
        return cls(mats, bias, *args).train(conv.training)  # a layer of an eval-mode model stays in eval mode

    def config(self) -> dict:
        """What a state_dict does not say (JSON-able): hyperparameters, format and n:m."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "kind": self.kind, "nm": list(self.nm)}

    @classmethod
    def from_state_dict(cls, sd: dict, config: dict, prefix: str = "") -> "SparseConv2d":
        """Rebuild a module from its state_dict and config(); the formats' checks run, so bad
        indices are refused with a ValueError."""
        c = _checked_config(config)
        kind, (n, m), G = c.pop("kind"), c.pop("nm"), c["groups"]
        bias = sd.get(prefix + "bias")
        args = (c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"], c["dilation"], G)
        if kind == "dense":
            return cls([], bias, *args, dense_weight=sd[prefix + "weight"])
        kh, kw = (int(v) for v in c["kernel_size"])
        shape = (int(c["out_channels"]) // G, int(c["in_channels"]) // G * kh * kw)
        mats = [build(kind, [sd[prefix + _prefix(G, g) + f] for f in FORMATS[kind].fields], shape, (int(n), int(m)),
                       check=True) for g in range(G)]
        return cls(mats, bias, *args)

    def to_conv(self) -> torch.nn.Conv2d:
        """A dense nn.Conv2d with the same (pruned) weights and hyperparameters."""
        W = self.dense_weight()
        conv = torch.nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                               self.dilation, self.groups, bias=self.bias is not None,
                               device=W.device, dtype=W.dtype)
        with torch.no_grad():
            conv.weight.copy_(W)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            raise ValueError("SparseConv2d: input must be a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got "
                             + (f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected {self.in_channels} input channels, got input of shape {tuple(x.shape)}")
        wdt = self._tensor("weight" if self.depthwise else self._names[0][-2 if self.kind == "nm" else -1]).dtype
        if x.dtype != wdt:
            raise TypeError(f"SparseConv2d: input is {x.dtype} but the weights are {wdt}; convert one of them "
                            f"(module.to({x.dtype}) or x.to({wdt}))")
        if self.depthwise:
            w = self.weight
            if self._records_grad(x):  # the pruned zeros get no gradient: they stay zero
                w = w * (w != 0)
            l, r, t, b = self._pads
            if l == r and t == b:
                return F.conv2d(x, w, self.bias, self.stride, (t, l), self.dilation, self.groups)
            return F.conv2d(F.pad(x, self._pads), w, self.bias, self.stride, 0, self.dilation, self.groups)
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if self.kernel_size == (1, 1) and self._pads == (0, 0, 0, 0):
            return self._forward_1x1(x, channels_last)
        out = self._forward_im2col(x)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    def _forward_1x1(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        sh, sw = self.stride
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        G, Cg = self.groups, self._cg
        cin = self.in_channels // G
        N, _, H, W = x.shape
        if channels_last:
            # x as (N, H, W, Cin) is its memory as it is (a copy only after subsampling): one
            # linear over all N*H*W tokens, the bias fused, gives the channels_last output.
            xl = x.permute(0, 2, 3, 1)
            if G == 1:
                return self._linear(0, xl, self.bias).permute(0, 3, 1, 2)
            bias = [None] * G if self.bias is None else self.bias.split(Cg)
            out = torch.cat([self._linear(g, xl[..., g * cin:(g + 1) * cin], bias[g]) for g in range(G)], dim=-1)
            return out.permute(0, 3, 1, 2)
        # One product over the batch: the op takes the (N, Cin, H*W) view as a batch of dense
        # operands and writes each image's (Cout, H*W) product in place, which is the NCHW output.
        X = x.reshape(N, self.in_channels, H * W)  # a copy only after subsampling
        if G == 1:
            y = self._spmm(0, X)
        else:
            y = torch.cat([self._spmm(g, X[:, g * cin:(g + 1) * cin]) for g in range(G)], dim=1)
        if self.bias is not None:
            y.add_(self.bias.unsqueeze(1))
        return y.view(N, self.out_channels, H, W)

    def _spmm(self, g: int, X: torch.Tensor) -> torch.Tensor:
        """Group g's matrix @ X, (Kg, n) -> (Cg, n) or a batch (N, Kg, n) -> (N, Cg, n)."""
        return spmm_tensors(self.kind, [self._tensor(n) for n in self._names[g]], self._shape, self.nm, X)

    def _linear(self, g: int, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x (..., Kg) @ group g's matrix.T + bias -> (..., Cg) (N:M on CUDA: cuSPARSELt from 64
        tokens, as for SparseLinear)."""
        return linear_tensors(self.kind, [self._tensor(n) for n in self._names[g]], self._shape, self.nm, x, bias)

    def _store(self, y: torch.Tensor, dst: torch.Tensor, g: int) -> None:
        """dst = y (+ group g's bias), one pass over y while it is in cache."""
        if self.bias is None:
            dst.copy_(y)
        else:
            b = self.bias[g * self._cg:(g + 1) * self._cg].view(-1, *([1] * (y.dim() - 1)))
            if y.requires_grad or torch.jit.is_tracing():  # out= is not differentiable (trace: one graph either way)
                dst.copy_(y + b)
            else:
                torch.add(y, b, out=dst)

    def _forward_im2col(self, x: torch.Tensor) -> torch.Tensor:
        l, r, t, b = self._pads
        if l or r or t or b:
            x = F.pad(x, (l, r, t, b))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        N, C, H, W = x.shape
        Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
        if Ho <= 0 or Wo <= 0:
            raise ValueError(f"SparseConv2d: input of shape {tuple(x.shape)} (padded) is smaller than the dilated kernel")
        G, Cg, Kg = self.groups, self._cg, self._kg
        records = self._records_grad(x)
        if torch.compiler.is_compiling() or (records and self.training):
            # Traceable (no storage offsets, no scratch state), and for training one product per
            # group to differentiate: one F.unfold of the whole batch, one batched product per
            # group over its rows of it.
            cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
            ys = [self._spmm(g, cols[:, g * Kg:(g + 1) * Kg]) for g in range(G)]
            y = ys[0] if G == 1 else torch.cat(ys, dim=1)
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1)
            return y.view(N, self.out_channels, Ho, Wo)
        cin = C // G
        rows = max(1, min(Ho, _IM2COL_BYTES // (Kg * Wo * x.element_size())))
        sN, sC, sH, sW = x.stride()
        out = x.new_empty((N, self.out_channels, Ho, Wo))
        for i in range(N):
            for r0 in range(0, Ho, rows):
                r1 = min(Ho, r0 + rows)
                for g in range(G):
                    # im2col of output rows r0..r1 of image i, group g: a strided view of the
                    # (padded) input, (cin, kh, kw, rows, Wo), copied to (Kg, rows * Wo)
                    v = x.as_strided((cin, kh, kw, r1 - r0, Wo), (sC, dh * sH, dw * sW, sh * sH, sw * sW),
                                     x.storage_offset() + i * sN + g * cin * sC + r0 * sh * sH)
                    cols = _workspace(Kg * (r1 - r0) * Wo, x, fresh=records)
                    cols.view(v.shape).copy_(v)
                    y = self._spmm(g, cols.view(Kg, (r1 - r0) * Wo))
                    if N == 1 and G == 1 and rows == Ho:  # the product's result is the output
                        if self.bias is not None:
                            y.add_(self.bias.unsqueeze(1))
                        return y.view(1, self.out_channels, Ho, Wo)
                    self._store(y.view(Cg, r1 - r0, Wo), out[i, g * Cg:(g + 1) * Cg, r0:r1], g)
        return out
