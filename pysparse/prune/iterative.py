"""Gradual (training-time) pruning: the sparsity of a model's weights rises over training steps
while the network keeps learning, which loses much less accuracy than pruning to the same
sparsity at once (Zhu & Gupta 2017, "To prune, or not to prune").

::

    pruner = Iterative(model, target=0.9, steps=3000)
    for x, y in batches:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        pruner.step()
    model = pruner.finalize()          # plain model with zeros, ready for pysparse.nn.sparsify

With ``handover=True`` (and the optimizer), the pruned layers become sparse layers the moment
the ramp ends: their pattern is frozen and the rest of training runs through the sparse
formats' backward (only the kept values train, at the sparse kernels' cost):

    pruner = Iterative(model, 0.9, steps=3000, handover=True, optimizer=opt)
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .magnitude import block_scores, expand_blocks
from .nm import M_CHOICES

_PREFIX = "pysparse.prune.Iterative: "
_SCHEDULES = ("cubic", "linear")
_PATTERNS = ("unstructured", "nm", "block")
_CRITERIA = {"magnitude": "|w|", "fisher": "(w * dL/dw)^2 summed over the steps between updates"}
_DEPRECATED_CRITERIA = {"taylor": "fisher"}  # old spellings of the same formula
_SCOPES = ("local", "global")


def _error(msg: str) -> ValueError:
    return ValueError(_PREFIX + msg)


class Iterative:
    """Prune ``model``'s nn.Linear, nn.Conv2d and Hugging Face Conv1D (GPT-2) weights gradually
    during training.

    Call :meth:`step` once per training step, after ``optimizer.step()``. The sparsity of the
    pruned layers rises from 0 at step ``start`` to ``target`` at step ``start + steps`` (the
    ``schedule``, recomputed every ``every`` steps, and always at the last step), then stays there.

    - ``schedule``: "cubic" (Zhu & Gupta 2017: ``target * (1 - (1 - (t - start) / steps) ** 3)``,
      fast early while the weights are redundant, slow near the end) or "linear".
    - ``pattern``: "unstructured"; "block" (whole ``blocksize`` blocks by L2 norm; sparsity is a
      fraction of blocks); "nm" (along the input dimension; ``target`` is ``1 - n / m`` and may be
      left None). N:M ramp: each update prunes the smallest still-kept weights of the layer, but a
      group of m never loses more than m - n, so the layer goes smoothly from dense to exactly n:m
      in every group at the last step (with m = 4, ramping n itself would give only two jumps).
    - ``criterion``: "magnitude" (|w|) or "fisher" ((w * dL/dw)^2 summed over the steps since the
      last update: the squared first-order Taylor term, Molchanov et al. 2019; needs the
      gradients, still there after ``optimizer.step()``). Its old name "taylor" is accepted with
      a DeprecationWarning.
    - ``scope``: "local" (every layer to the same sparsity) or "global" (one ranking across the
      layers: unstructured and block only).
    - ``layers``: fnmatch patterns of qualified module names (``*`` matches across dots), default
      all. ``skip_ends``: leave the model's first and last nn.Linear / nn.Conv2d (in
      ``model.named_modules()`` order, the most sensitive layers) dense, as ``sparsify`` does.
      A Conv2d weight is ranked as its (out, in * kh * kw) view, a Conv1D's (in, out) weight as
      its transpose (N:M groups and blocks along the inputs, as for a linear; :attr:`masks` in the
      weight's own shape); a weight shared by several modules is pruned once, under its first name.

    ``handover``: at the step the ramp ends, swap every pruned layer for a ``SparseLinear`` (a
    Conv1D: of the nn.Linear it equals) / ``SparseConv2d`` in the pattern's format (unstructured:
    CSR, block: BSR of ``blocksize``, nm: N:M) holding its kept weights, in the model (in its train/eval mode), and rewire
    ``optimizer`` (required): the dense weight and bias in its parameter groups are replaced by
    the sparse layer's values and bias, with their state (momentum, Adam's moments) carried over
    at the kept positions, so training continues on the same trajectory. A layer that cannot be
    swapped (a weight tied to another module, a block size that does not tile a grouped conv's
    matrices) stays dense and masked, and :attr:`handed_over` says which were swapped.

    Masks are monotone: a pruned weight stays pruned to the end (it is never regrown). They are
    kept here, not in the model, so the model's state_dict is unchanged; :meth:`state_dict`
    saves them for resuming. Pruned weights stay zero through fine-tuning twice over: gradient
    hooks zero their gradients (enough for plain SGD) and every :meth:`step` re-zeroes the weights
    (momentum, weight decay and Adam move them otherwise). The optimizer's own state for pruned
    weights is left as it is; it no longer matters once the weights are re-zeroed every step.
    Build the pruner after moving the model to its device.
    """

    def __init__(self, model: torch.nn.Module, target: Optional[float], steps: int, *,
                 schedule: str = "cubic", pattern: str = "unstructured", criterion: str = "magnitude",
                 n: int = 2, m: int = 4, blocksize: Tuple[int, int] = (4, 4),
                 layers: Union[None, str, Sequence[str]] = None, skip_ends: bool = True,
                 start: int = 0, every: int = 1, scope: str = "local", handover: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, torch.nn.Module):
            raise _error(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(criterion, str) and criterion in _DEPRECATED_CRITERIA:
            warnings.warn(_PREFIX + f"criterion {criterion!r} is deprecated, use {_DEPRECATED_CRITERIA[criterion]!r} "
                          f"(the same formula, (w * dL/dw)^2 summed); {criterion!r} will be removed",
                          DeprecationWarning, stacklevel=2)
            criterion = _DEPRECATED_CRITERIA[criterion]
        for what, value, choices in (("schedule", schedule, _SCHEDULES), ("pattern", pattern, _PATTERNS),
                                     ("criterion", criterion, _CRITERIA), ("scope", scope, _SCOPES)):
            if value not in tuple(choices):
                listed = ", ".join(repr(c) + (f" ({choices[c]})" if isinstance(choices, dict) else "") for c in choices)
                raise _error(f"{what} must be one of {listed}, got {value!r}")
        for what, value, low in (("steps", steps, 1), ("every", every, 1), ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _error(f"{what} must be an integer >= {low}, got {value!r}")
        if pattern == "nm":
            if m not in M_CHOICES or isinstance(n, bool) or not isinstance(n, int) or not 0 < n < m:
                raise _error(f"pattern 'nm' needs m in {M_CHOICES} and an integer 0 < n < m, got n={n!r}, m={m!r}")
            if scope == "global":
                raise _error("scope 'global' applies to the unstructured and block patterns, not 'nm'")
            final = 1.0 - n / m
            if target is not None and (not isinstance(target, (int, float)) or abs(float(target) - final) > 1e-9):
                raise _error(f"pattern 'nm' with n={n}, m={m} ends at sparsity {final}, so target must be "
                             f"{final} or None, got {target!r}")
            target = final
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
            raise _error(f"target must be a number in [0, 1), got {target!r}")
        if pattern == "block":
            if (not isinstance(blocksize, (tuple, list)) or len(blocksize) != 2
                    or not all(isinstance(b, int) and b > 0 for b in blocksize)):
                raise _error(f"blocksize must be two positive integers, got {blocksize!r}")
            blocksize = (int(blocksize[0]), int(blocksize[1]))
        if not isinstance(handover, bool):
            raise _error(f"handover must be True or False, got {handover!r}")
        if handover and not isinstance(optimizer, torch.optim.Optimizer):
            raise _error("handover=True needs optimizer= (the torch optimizer training the model): the hand-over "
                         "replaces the dense weights it holds with the sparse layers' values, got "
                         f"{type(optimizer).__name__}")
        patterns = [layers] if isinstance(layers, str) else (["*"] if layers is None else list(layers))
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise _error(f"layers must be None, a pattern or a list of patterns, got {layers!r}")

        self.model = model
        self.target = float(target)
        self.steps, self.start, self.every = steps, start, every
        self.schedule, self.pattern, self.criterion, self.scope = schedule, pattern, criterion, scope
        self.n, self.m, self.blocksize = n, m, blocksize

        from ..nn.linear import is_conv1d  # pysparse.nn imports pysparse.prune: not at the top

        prunable = [(name, mod) for name, mod in model.named_modules()
                    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or is_conv1d(mod)]
        # Hugging Face Conv1D (GPT-2) stores its weight (in, out): its masks, scores and units are
        # kept for the (out, in) matrix, through a transposed view (_mat).
        self._transposed = {name for name, mod in prunable if is_conv1d(mod)}
        ends = {prunable[0][0], prunable[-1][0]} if skip_ends and prunable else set()
        self._weights: Dict[str, torch.nn.Parameter] = {}
        for name, mod in prunable:
            # A weight shared by several modules (tied) is pruned once, under its first name.
            if (name not in ends and any(fnmatch.fnmatchcase(name, p) for p in patterns)
                    and all(mod.weight is not w for w in self._weights.values())):
                self._weights[name] = mod.weight
        if not self._weights:
            raise _error(f"no nn.Linear, nn.Conv2d or Conv1D layer matches layers={patterns}"
                         + (" once the first and last are skipped (skip_ends=True)" if ends else ""))
        for name, w in self._weights.items():
            rows, cols = self._mat(name, w).shape[0], self._mat(name, w)[0].numel()
            if pattern == "nm" and cols % m:
                raise _error(f"layer {name!r} has {cols} inputs per output (in * kh * kw for a conv), "
                             f"not a multiple of m = {m}")
            if pattern == "block" and (rows % blocksize[0] or cols % blocksize[1]):
                raise _error(f"layer {name!r} has the shape {(rows, cols)}, not divisible by the block size {blocksize}")

        # Units are what is ranked and pruned: weights, or blocks for the block pattern.
        self._units: Dict[str, torch.Tensor] = {
            name: torch.ones(self._unit_shape(self._mat(name, w)), dtype=torch.bool, device=w.device)
            for name, w in self._weights.items()}
        # How many units each layer (or, globally, all of them) has pruned at the end of the ramp.
        counts = {name: u.numel() for name, u in self._units.items()}
        if pattern == "nm":
            self._final = {name: c // m * (m - n) for name, c in counts.items()}
        elif scope == "global":
            self._final = {"": round(self.target * sum(counts.values()))}
        else:
            self._final = {name: round(self.target * c) for name, c in counts.items()}
        self._masks: Dict[str, torch.Tensor] = {name: self._expand(name, u) for name, u in self._units.items()}
        self._fisher: Dict[str, torch.Tensor] = {}
        self._t = 0
        self._frac = 0.0  # ramp position of the current masks, in [0, 1]
        self._hooks = {name: w.register_hook(self._grad_hook(name)) for name, w in self._weights.items()
                       if w.requires_grad}
        self._finalized = False
        self._handover, self._optimizer = handover, optimizer
        self._handed: Dict[str, str] = {}  # layer -> format it was swapped to
        self._handover_done = False

    # ---- schedule -------------------------------------------------------------------------

    def _ramp(self, t: int) -> float:
        """Ramp position in [0, 1] after training step t: 0 until start, 1 from start + steps."""
        done = min(max(t - self.start, 0), self.steps)
        if done < self.steps:
            done -= done % self.every  # the sparsity only changes on update steps
        x = done / self.steps
        return 1.0 - (1.0 - x) ** 3 if self.schedule == "cubic" else x

    def target_at(self, t: int) -> float:
        """The scheduled sparsity after t calls of :meth:`step`."""
        return self.target * self._ramp(t)

    # ---- public API -----------------------------------------------------------------------

    @property
    def layers(self) -> List[str]:
        """Qualified names of the pruned layers."""
        return list(self._weights)

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Per layer, a boolean tensor of the weight's shape: True where the weight is kept."""
        return {name: self._mat(name, m) for name, m in self._masks.items()}

    @property
    def t(self) -> int:
        """How many times :meth:`step` has been called."""
        return self._t

    def step(self) -> float:
        """Advance one training step: update the masks if the schedule says so, re-zero the pruned
        weights, and return the current target sparsity."""
        if self._finalized:
            raise _error("step() was called after finalize()")
        self._t += 1
        if self.criterion == "fisher":
            self._accumulate_fisher()
        frac = self._ramp(self._t)
        if frac > self._frac:
            self._update(frac)
            self._frac = frac
        self._apply()
        if self._handover and frac >= 1.0 and not self._handover_done:
            self._hand_over()
        return self.target * frac

    @property
    def handed_over(self) -> Dict[str, str]:
        """Layers swapped for sparse layers by the hand-over, with their format."""
        return dict(self._handed)

    def sparsity(self) -> Dict[str, float]:
        """Measured fraction of zero weights in each pruned layer (a handed-over layer: of its
        dense form)."""
        out = {}
        for name, w in self._weights.items():
            if name in self._handed:
                mod = self.model.get_submodule(name)
                w = mod.dense_weight() if hasattr(mod, "dense_weight") else mod.weight.to_dense()
            out[name] = float((w == 0).sum()) / w.numel()
        return out

    def finalize(self) -> torch.nn.Module:
        """Remove the gradient hooks, leave the pruned weights at zero, and return the model."""
        if not self._finalized:
            self._apply()
            for h in self._hooks.values():
                h.remove()
            self._hooks = {}
            self._fisher = {}
            self._finalized = True
        return self.model

    def state_dict(self) -> dict:
        """The step count and masks (Fisher scores are not saved: they restart after a resume)."""
        return {"t": self._t, "frac": self._frac, "units": {k: u.clone() for k, u in self._units.items()},
                "handed_over": self._handover_done}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a pruner built with the same arguments on the same model."""
        units = state["units"]
        if set(units) != set(self._units) or any(units[k].shape != u.shape for k, u in self._units.items()):
            raise _error("the saved masks do not match this pruner's layers")
        self._t, self._frac = int(state["t"]), float(state["frac"])
        for name, u in units.items():
            self._units[name] = u.to(dtype=torch.bool, device=self._weights[name].device)
            self._masks[name] = self._expand(name, self._units[name])
        self._apply()
        if self._handover and state.get("handed_over") and not self._handover_done:
            self._hand_over()  # a resumed run continues on sparse layers, as the saved one did

    # ---- internals ------------------------------------------------------------------------

    def _unit_shape(self, w: torch.Tensor) -> Tuple[int, ...]:
        if self.pattern == "block":
            return (w.shape[0] // self.blocksize[0], w[0].numel() // self.blocksize[1])
        return tuple(w.shape)

    def _mat(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor of layer `name` as its (out, in) matrix (a transposed view for a
        Conv1D), or such a matrix back in the weight's shape: the same transpose."""
        return t.t() if name in self._transposed else t

    def _expand(self, name: str, units: torch.Tensor) -> torch.Tensor:
        """Unit mask -> boolean mask of the weight's matrix shape."""
        w = self._mat(name, self._weights[name])
        if self.pattern != "block":
            return units
        return expand_blocks(units, *self.blocksize).reshape(w.shape)

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # where, not multiply: an inf/nan gradient of a pruned weight must not leak as nan.
            return torch.where(self._mat(name, self._masks[name]).to(grad.device), grad, 0)
        return hook

    @torch.no_grad()
    def _apply(self) -> None:
        for name, w in self._weights.items():
            if name in self._handed:
                continue  # the sparse layer holds the kept values only
            mask = self._masks[name]
            if mask.device != w.device:
                self._masks[name] = mask = mask.to(w.device)
            self._mat(name, w).masked_fill_(~mask, 0)

    @torch.no_grad()
    def _accumulate_fisher(self) -> None:
        for name, w in self._weights.items():
            if w.grad is not None and name not in self._handed:
                s = self._mat(name, (w.detach().float() * w.grad.float()).square())
                self._fisher[name] = self._fisher[name] + s if name in self._fisher else s

    def _scores(self, name: str) -> torch.Tensor:
        """Importance of each unit (flattened); larger is kept longer."""
        w = self._weights[name]
        if self.criterion == "fisher":
            if name not in self._fisher:
                raise _error(f"criterion 'fisher' found no gradient for {name!r}: call step() after "
                             f"backward() and before the gradients are cleared")
            s = self._fisher[name]
        else:
            s = self._mat(name, w).detach().float().abs()
        if self.pattern == "block":
            bh, bw = self.blocksize
            R, C = self._units[name].shape
            s = block_scores(s.reshape(R * bh, C * bw), bh, bw)
        return s.reshape(-1)

    def _eligible(self, name: str) -> torch.Tensor:
        """Units that may be pruned now (flattened): the kept ones; for N:M, only the smallest
        kept weights of each group that leave it at least n."""
        alive = self._units[name].reshape(-1)
        if self.pattern != "nm":
            return alive
        m, cap = self.m, self.m - self.n
        a = alive.view(-1, m)
        s = torch.where(a, self._scores(name).view(-1, m), math.inf)
        order = s.argsort(dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
        pruned = (~a).sum(dim=-1, keepdim=True)
        return (a & (pruned + rank < cap)).reshape(-1)

    @torch.no_grad()
    def _update(self, frac: float) -> None:
        names = list(self._weights)
        scores = {k: self._scores(k) for k in names}
        eligible = {k: self._eligible(k) for k in names}
        if self.scope == "global":
            dev = scores[names[0]].device
            groups = {"": names}
            scores = {"": torch.cat([scores[k].to(dev) for k in names])}
            eligible = {"": torch.cat([eligible[k].to(dev) for k in names])}
        else:
            groups = {k: [k] for k in names}
        for key, members in groups.items():
            pruned_now = sum(int((~self._units[k]).sum()) for k in members)
            more = round(frac * self._final[key]) - pruned_now
            if more <= 0:
                continue
            cand = eligible[key].nonzero().squeeze(1)
            # Index the candidates rather than fill the others with inf: ties with an inf score
            # could otherwise pick a unit that is not allowed.
            drop = cand[torch.topk(scores[key][cand], more, largest=False, sorted=False).indices]
            offset = 0
            for k in members:
                u = self._units[k]
                mine = drop[(drop >= offset) & (drop < offset + u.numel())] - offset
                u.view(-1)[mine.to(u.device)] = False
                offset += u.numel()
                self._masks[k] = self._expand(k, u)
        self._fisher = {}

    # ---- hand-over to sparse layers ---------------------------------------------------------

    @torch.no_grad()
    def _hand_over(self) -> None:
        from ..nn import SparseConv2d, SparseLinear  # the modules import pysparse.prune
        from ..nn.linear import linear_from_conv1d
        fmt = {"unstructured": "csr", "block": "bsr", "nm": "nm"}[self.pattern]
        for name, w in self._weights.items():
            mod = self.model.get_submodule(name)
            tied = sum(1 for m in self.model.modules() if getattr(m, "weight", None) is w) > 1
            conv1d = name in self._transposed
            if tied or not (isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or conv1d):
                continue
            kw = {"blocksize": self.blocksize} if fmt == "bsr" else {"n": self.n, "m": self.m} if fmt == "nm" else {}
            try:
                if conv1d:  # as the nn.Linear it equals (marked, as sparsify does: save_sparse records it)
                    new = SparseLinear.from_linear(linear_from_conv1d(mod), fmt, **kw)
                    new._pysparse_conv1d = True
                elif isinstance(mod, torch.nn.Linear):
                    new = SparseLinear.from_linear(mod, fmt, **kw)
                else:
                    new = SparseConv2d.from_conv(mod, fmt, **kw)
            except ValueError:
                continue  # e.g. a block size that does not tile a grouped conv's matrices: stays dense
            new.train(mod.training)
            self._rewire(mod, new, transposed=conv1d)
            self.model.set_submodule(name, new)
            hook = self._hooks.pop(name, None)
            if hook is not None:
                hook.remove()
            self._handed[name] = fmt
        self._handover_done = True

    def _rewire(self, old: torch.nn.Module, new: torch.nn.Module, transposed: bool = False) -> None:
        """Put `new`'s parameters in place of `old`'s in the optimizer, state carried over: the
        weight's state at each stored value's position (of its (out, in) matrix: transposed for
        a Conv1D's (in, out) weight), the bias's as it is."""
        opt = self._optimizer
        if getattr(new, "depthwise", False):  # a depthwise SparseConv2d keeps the dense weight
            targets = [(new.weight, None)]
        elif hasattr(new, "sparse_weights"):  # SparseConv2d: one matrix per group, rows g*Cg...
            per_group = old.weight[0].numel() * (old.out_channels // old.groups)
            targets = [(A.values, g * per_group + A.positions()) for g, A in enumerate(new.sparse_weights)]
        else:
            targets = [(new.weight_values, new.weight.positions())]
        pairs = [(old.weight, targets)] + ([(old.bias, [(new.bias, None)])] if old.bias is not None else [])
        for p_old, targets in pairs:
            state = opt.state.pop(p_old, None)
            if state is not None:
                for p_new, pos in targets:
                    t = transposed and p_old is old.weight
                    opt.state[p_new] = {k: self._carry(v.t() if t and isinstance(v, torch.Tensor) and v.dim() == 2 else v,
                                                       p_old.t() if t else p_old, p_new, pos) for k, v in state.items()}
            for group in opt.param_groups:
                params = group["params"]
                for i, p in enumerate(params):
                    if p is p_old:
                        params[i:i + 1] = [p_new for p_new, _ in targets]
                        break

    @staticmethod
    def _carry(v, p_old: torch.Tensor, p_new: torch.Tensor, pos: Optional[torch.Tensor]):
        """One optimizer state entry for the new parameter."""
        if not isinstance(v, torch.Tensor) or v.shape != p_old.shape:
            return v.clone() if isinstance(v, torch.Tensor) else v  # a step count, a scalar
        if pos is None:
            return v.clone().reshape(p_new.shape)
        return v.reshape(-1)[pos.to(v.device)].reshape(p_new.shape).clone()
