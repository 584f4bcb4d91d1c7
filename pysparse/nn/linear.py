"""``SparseLinear``: nn.Linear with its weight in a pysparse format."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import prune
from ..formats import BSR, CSR, FORMATS, Format, SparseNM, build, format_name, shape_entry
from ..autograd import memoized
from ..ops import linear_tensors
from . import kernel_choice


# Formats whose ops have a backward (pysparse.autograd): their floating-point values are an
# nn.Parameter (int8 N:M values, for CUTLASS interop, stay a buffer).
TRAINABLE = ("csr", "bsr", "nm")
TRAIN_KERNELS = ("auto", "sparse", "dense")


def is_conv1d(module: torch.nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 and its kin): y = x W + b with W stored (in, out), the
    transpose of nn.Linear's. Recognised by name and shape, so transformers need not be imported."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and \
        getattr(module, "nf", None) == w.shape[1]


def linear_from_conv1d(module: torch.nn.Module) -> torch.nn.Linear:
    """The nn.Linear that computes what a Conv1D computes (weight transposed, bias shared by
    value), marked so that save_sparse records it and load_sparse turns the Conv1D of a freshly
    built model into the same before loading (its square (n, n) weights would otherwise load
    transposed without an error)."""
    w = module.weight
    lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    lin.train(module.training)
    lin._pysparse_conv1d = True
    return lin


class SparseLinear(torch.nn.Module):
    """y = x @ W.T + b with W held as CSR, BSR or N:M (2:4), a drop-in for nn.Linear.

    The format's tensors are named ``weight_<field>``: the values are an nn.Parameter
    (``weight_values``: any torch optimizer trains them, the pattern stays fixed; gradients flow
    to the input and the bias too) and the indices / N:M mask buffers. ``.to()``, ``state_dict()``/``load_state_dict()`` and
    ``torch.compile(fullgraph=True)`` work as for any module; forward runs the format's op on the
    tensors directly (no copies, no checks).

    Training (in train mode with grad enabled and the values requiring grad; a module made by
    ``from_linear`` takes the train/eval mode of its nn.Linear): ``train_kernel`` "sparse" runs the
    sparse ops forward and backward; "dense" multiplies by the dense matrix scattered from the
    values (masked dense training: the same gradients, dense GEMM speed); "auto" (default) times
    both once per power-of-two token count (forward + backward, cached on disk like sparsify's
    kernel choice) and takes the faster: below ~80% sparsity dense training wins on the CPUs
    measured (benchmarks/RESULTS.md). Inference always runs the sparse op.
    """

    def __init__(self, weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, Format):
            raise TypeError(f"SparseLinear needs a CSR, BSR or SparseNM weight, got {type(weight).__name__}")
        self.kind = weight.kind
        self.out_features, self.in_features = weight.shape
        self.nm: Tuple[int, int] = weight.nm
        trainable = self.kind in TRAINABLE and weight.values.is_floating_point()
        for name in self._fields():
            if name == "values" and trainable:
                # The stored values train (pysparse.autograd); the pattern (indices) stays fixed.
                setattr(self, "weight_values", torch.nn.Parameter(weight.values, requires_grad=True))
            else:
                self.register_buffer("weight_" + name, getattr(weight, name))
        # For from_state_dict only (forward reads the Python attributes: compile-friendly).
        self.register_buffer("weight_shape", torch.tensor(weight.shape, dtype=torch.int64))
        if self.kind == "nm":
            self.register_buffer("weight_nm", torch.tensor(self.nm, dtype=torch.int64))
        if bias is not None:  # refused here, not at the first forward
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got "
                                 + (str(tuple(bias.shape)) if isinstance(bias, torch.Tensor) else type(bias).__name__))
            if bias.dtype != weight.dtype or bias.device != weight.device:
                raise ValueError(f"SparseLinear: bias is {bias.dtype} on {bias.device} but the weight is "
                                 f"{weight.dtype} on {weight.device}; convert one of them")
        if bias is not None and trainable:
            self.bias = torch.nn.Parameter(bias, requires_grad=True)
        else:
            self.register_buffer("bias", bias)
        self._train_kernel = "auto"
        self._train_choice: Dict[int, str] = {}  # token bucket -> "sparse" | "dense" (auto)

    @property
    def train_kernel(self) -> str:
        """How a training forward runs: "auto", "sparse" or "dense" (see the class docstring)."""
        return self._train_kernel

    @train_kernel.setter
    def train_kernel(self, value: str) -> None:
        if value not in TRAIN_KERNELS:
            raise ValueError(f"SparseLinear.train_kernel must be one of {TRAIN_KERNELS}, got {value!r}")
        self._train_kernel = value

    def _fields(self):
        return FORMATS[self.kind].fields

    @property
    def weight(self):
        """The weight as its format object (sharing the buffers)."""
        t = [getattr(self, "weight_" + f) for f in self._fields()]
        return build(self.kind, t, (self.out_features, self.in_features), self.nm, check=False)

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "SparseLinear":
        """Rebuild a module from its state_dict (the format's checks run: bad indices are refused).
        A missing entry or a wrong dtype is a ValueError naming it."""
        kind = "nm" if prefix + "weight_mask" in sd else (
            "bsr" if getattr(sd.get(prefix + "weight_values"), "dim", lambda: 0)() == 3 else "csr")
        keys = ["weight_shape"] + (["weight_nm"] if kind == "nm" else []) + ["weight_" + f for f in FORMATS[kind].fields]
        missing = [prefix + k for k in keys if prefix + k not in sd]
        if missing:
            raise ValueError(f"SparseLinear.from_state_dict: missing {', '.join(map(repr, missing))}")
        w = {k: sd[prefix + k] for k in keys}
        sub = {"shape": w["weight_shape"], "nm": w.get("weight_nm")}
        shape = shape_entry(sub, "shape", "SparseLinear.from_state_dict")
        nm = shape_entry(sub, "nm", "SparseLinear.from_state_dict") if kind == "nm" else (0, 0)
        weight = build(kind, [w["weight_" + f] for f in FORMATS[kind].fields], shape, nm, check=True)
        return cls(weight, sd.get(prefix + "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and self.weight_values.requires_grad and self._trains_dense(x):
            return torch.nn.functional.linear(x, self._scattered(self.weight_values), self.bias)
        # The ops on the buffers: a format object per call would only be unpacked again.
        tensors = [getattr(self, "weight_" + f) for f in FORMATS[self.kind].fields]
        return linear_tensors(self.kind, tensors, (self.out_features, self.in_features), self.nm, x, self.bias)

    def _scattered(self, values: torch.Tensor) -> torch.Tensor:
        """The dense (M, K) matrix of the pattern holding `values`, differentiable in them: the
        gradient of each stored value is the dense gradient at its position, nothing else."""
        M, K = self.out_features, self.in_features
        flat = torch.zeros(M * K, dtype=values.dtype, device=values.device)
        return flat.index_put((self._positions(),), values.reshape(-1)).view(M, K)

    def _positions(self) -> torch.Tensor:
        """The weight's positions(), remembered per index tensors (pysparse.autograd's memo)."""
        keys = (self.weight_mask,) if self.kind == "nm" else (self.weight_crow_indices, self.weight_col_indices)
        return memoized(keys, ("positions", self.in_features, tuple(self.weight_values.shape[1:])),
                        lambda: (self.weight.positions(),))[0]

    def _trains_dense(self, x: torch.Tensor) -> bool:
        if self._train_kernel != "auto":
            return self._train_kernel == "dense"
        tokens = kernel_choice.bucket(x.numel() // max(1, self.in_features))
        choice = self._train_choice.get(tokens)
        if choice is None:
            if torch.compiler.is_compiling():
                return False  # nothing is timed inside a graph: sparse, unless an eager step chose
            choice = self._time_training(tokens)
            self._train_choice[tokens] = choice
        return choice == "dense"

    def _time_training(self, tokens: int) -> str:
        """"dense" or "sparse": the faster forward + backward at `tokens` tokens, on stand-ins of
        this layer's tensors (its own gradients are not touched)."""
        M, K = self.out_features, self.in_features
        dt, dev = self.weight_values.dtype, self.weight_values.device
        x = torch.randn(tokens, K, dtype=dt, device=dev, requires_grad=True)
        g = torch.randn(tokens, M, dtype=dt, device=dev)
        v = self.weight_values.detach().clone().requires_grad_()
        b = None if self.bias is None else self.bias.detach().clone().requires_grad_()
        tensors = [v if f == "values" else getattr(self, "weight_" + f) for f in self._fields()]
        cands = {
            "sparse": lambda: linear_tensors(self.kind, tensors, (M, K), self.nm, x, b).backward(g),
            "dense": lambda: torch.nn.functional.linear(x, self._scattered(v), b).backward(g),
        }
        blocks = "x".join(map(str, v.shape[1:])) if self.kind == "bsr" else ""
        key = f"train|{M}x{K}|{self.format_name}{blocks}|{self.weight.density:.2f}|{dt}|{dev}|b{tokens}"
        times, _ = kernel_choice.time_candidates(key, cands, reps=3)
        return "dense" if times["dense"] < times["sparse"] else "sparse"

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, format: str = "csr", *, sparsity: float = 0.0,
                    blocksize: Tuple[int, int] = (32, 32), n: int = 2, m: int = 4,
                    scores: Optional[torch.Tensor] = None, index_dtype: Optional[torch.dtype] = None) -> "SparseLinear":
        """Prune an nn.Linear and store it sparse.

        format "csr": the ``sparsity`` fraction of smallest-|w| weights dropped (0 keeps the
        existing zeros only); "bsr": the ``sparsity`` fraction of blocks of ``blocksize`` with the
        smallest norm dropped; "nm": n of every m inputs kept per row, by |w| or by ``scores``
        (e.g. |W| * ||x|| from calibration data). The original module is not modified.
        """
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"SparseLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            W = linear.weight.detach()
            bias = None if linear.bias is None else linear.bias.detach().clone()
            if format == "csr":
                A = CSR.from_dense(prune.magnitude(W, sparsity) if sparsity else W, index_dtype=index_dtype)
            elif format == "bsr":
                A = BSR.from_dense(prune.blocks(W, sparsity, blocksize=blocksize) if sparsity else W, blocksize=blocksize)
            elif format == "nm":
                A = SparseNM.from_dense(prune.nm(W, n, m, scores=scores), n, m)
            else:
                raise ValueError(f"SparseLinear.from_linear: format must be 'csr', 'bsr' or 'nm', got {format!r}")
        out = cls(A, bias)
        out.train(linear.training)  # a layer of an eval-mode model stays in eval mode
        return out

    def to_linear(self) -> torch.nn.Linear:
        """A dense nn.Linear with the same (pruned) weights."""
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=self.weight_values.device, dtype=self.weight_values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def format_name(self) -> str:
        """"csr", "bsr" or "n:m" (e.g. "2:4")."""
        return format_name(self.kind, self.nm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format_name}, density={self.weight.density:.3f}")
