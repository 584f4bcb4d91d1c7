"""``pysparse.recover``: get a pruned model's quality back by distilling it towards the dense one.

    report = pysparse.recover(student, teacher, batches, time_budget=600, lr=1e-4, loss="cosine")

The student (the sparsified model) learns to reproduce the teacher's (the dense model's) outputs
on unlabeled inputs. Only the kept values of its sparse layers train by default (``train=
"sparse"``: SparseLinear / SparseConv2d / SparseFFN parameters, their patterns fixed through the
sparse formats' backward; layers ``sparsify`` pruned but kept dense because dense was faster train
their kept weights, the zeros held by a gradient mask), or every parameter that requires grad
(``train="all"``).
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

LOSSES = ("cosine", "mse", "kl")
TRAIN = ("sparse", "all")


def _output(out) -> torch.Tensor:
    """The tensor a model's output is compared by: the output itself, the first tensor of a
    tuple / list, or a mapping's (or Hugging Face ModelOutput's) first tensor entry."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"pysparse.recover: the model returned {type(out).__name__}, which holds no tensor to compare")


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _distance(loss: str, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    s, t = s.float(), t.float()
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if loss == "mse":
        return F.mse_loss(s, t)
    # kl: the teacher's softened distribution against the student's (logits on the last dim)
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def _sparse_parameters(model: torch.nn.Module) -> Tuple[List[torch.nn.Parameter], List[Tuple[torch.nn.Parameter, torch.Tensor]]]:
    """The parameters of pysparse layers, and (weight, mask of its nonzeros) of the layers sparsify
    pruned but kept dense (its kernel choice marks them), whose zeros must stay zero."""
    from .nn import SparseConv2d, SparseFFN, SparseLinear
    seen, out, masked = set(), [], []
    for mod in model.modules():
        pruned_dense = getattr(mod, "_pysparse_pruned", False) and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
        if isinstance(mod, (SparseLinear, SparseConv2d, SparseFFN)) or pruned_dense:
            for name, p in mod.named_parameters(recurse=False) if pruned_dense else mod.named_parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append(p)
                    if pruned_dense and name == "weight":
                        masked.append((p, (p.detach() != 0).to(p.dtype)))
    return out, masked


def recover(student: torch.nn.Module, teacher: torch.nn.Module, batches: Iterable, *, steps: Optional[int] = None,
            time_budget: Optional[float] = None, lr: float = 5e-5, loss: str = "cosine", train: str = "sparse",
            eval_batches: Optional[Iterable] = None, temperature: float = 1.0, weight_decay: float = 0.0,
            hidden: Sequence[str] = (), hidden_weight: float = 1.0, keep_best: bool = False, eval_every: int = 50,
            progress: Optional[bool] = None) -> Dict:
    """Distil ``student`` towards ``teacher`` on ``batches`` (each a tensor, a tuple of positional
    inputs or a dict of keyword inputs, cycled), with AdamW at ``lr``, until ``steps`` steps or
    ``time_budget`` seconds (whichever comes first; at least one of them). The default lr is the
    best of a sweep on MiniLM 2:4 after SparseGPT (2e-5 and 5e-5 best, 2e-4 worse, 1e-3 made it
    worse than before recovery: benchmarks/RESULTS.md).

    loss: "cosine" (1 - cosine similarity along the last dim: embeddings), "mse", or "kl" (logits,
    softened by ``temperature``). train: "sparse" (the sparse layers' values and biases) or "all".
    hidden: names of submodules (the same in both models, e.g. the encoder layers) whose outputs
    are matched too: ``hidden_weight`` times the mean over them of ||s - t||^2 / ||t||^2 is added
    to the loss (layer-wise distillation: each block learns to reproduce its dense twin's output,
    not only the last one). The teacher's outputs are computed once per batch and kept while they
    fit in ``_TEACHER_CACHE_BYTES`` (batches are cycled: later epochs run the student only).
    The teacher runs without grad; the student in eval mode (no dropout) except its pysparse
    layers, which train (so SparseLinear's train kernel choice applies); modes are restored
    after.

    keep_best: evaluate on ``eval_batches`` (required then) before training, every ``eval_every``
    steps and at the end, and leave the student with the trained parameters of the best of those
    evaluations (the untrained ones included): recovery then never returns a student that is
    further from the teacher on the held-out batches than the one it got, whatever the lr or the
    time budget did. The evaluation passes count towards ``time_budget``.

    Returns {"steps", "seconds", "losses" (one per step), "eval_before", "eval_after" (mean loss on
    ``eval_batches`` of the student returned, None without them), "trained_parameters"}; with
    keep_best also "evals" ((step, loss) pairs) and "best_step" (0: the untrained student).
    """
    if not isinstance(student, torch.nn.Module) or not isinstance(teacher, torch.nn.Module):
        raise TypeError("pysparse.recover: student and teacher must be torch.nn.Modules")
    if loss not in LOSSES:
        raise ValueError(f"pysparse.recover: loss must be one of {LOSSES}, got {loss!r}")
    if train not in TRAIN:
        raise ValueError(f"pysparse.recover: train must be one of {TRAIN}, got {train!r}")
    if steps is None and time_budget is None:
        raise ValueError("pysparse.recover: give steps, time_budget or both")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"pysparse.recover: steps must be a positive integer, got {steps!r}")
    if time_budget is not None and (not isinstance(time_budget, (int, float)) or not time_budget > 0):
        raise ValueError(f"pysparse.recover: time_budget must be a positive number of seconds, got {time_budget!r}")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"pysparse.recover: lr must be a positive number, got {lr!r}")
    if not isinstance(hidden_weight, (int, float)) or not hidden_weight >= 0 or not math.isfinite(hidden_weight):
        raise ValueError(f"pysparse.recover: hidden_weight must be a non-negative number, got {hidden_weight!r}")
    if keep_best and eval_batches is None:
        raise ValueError("pysparse.recover: keep_best needs eval_batches (held-out inputs to compare the states on)")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"pysparse.recover: eval_every must be a positive integer, got {eval_every!r}")
    if isinstance(hidden, str):
        hidden = [hidden]
    batches = list(batches)
    if not batches:
        raise ValueError("pysparse.recover: batches is empty")
    tapped = _Taps.modules(student, teacher, hidden)
    params, masked = _sparse_parameters(student) if train == "sparse" else \
        ([p for p in student.parameters() if p.requires_grad], [])
    if not params:
        raise ValueError("pysparse.recover: the student has no trainable parameters "
                         + ("in pysparse layers (sparsify it first, or train='all')" if train == "sparse" else ""))
    from .nn import SparseConv2d, SparseFFN, SparseLinear
    modes = {m: m.training for m in student.modules()}
    teacher_mode = teacher.training
    teacher.eval()
    student.eval()
    for m in student.modules():
        if isinstance(m, (SparseLinear, SparseConv2d, SparseFFN)):
            m.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # A pruned layer kept dense: its zeros get no gradient, so AdamW's moments and step stay 0 there
    # (and decoupled weight decay scales a zero to zero).
    cache: Dict[int, Tuple[torch.Tensor, List[torch.Tensor]]] = {}
    cached_bytes = 0

    def teacher_outputs(i: int, batch) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        nonlocal cached_bytes
        if i in cache:
            return cache[i]
        with torch.no_grad():
            out = (_output(_call(teacher, batch)), taps.take("teacher"))
        size = sum(t.numel() * t.element_size() for t in [out[0], *out[1]])
        if cached_bytes + size <= _TEACHER_CACHE_BYTES:
            cache[i] = out
            cached_bytes += size
        return out

    eval_batches = None if eval_batches is None else list(eval_batches)

    def evaluate() -> Optional[float]:
        if eval_batches is None:
            return None
        total, count = 0.0, 0
        was = {m: m.training for m in student.modules()}
        student.eval()  # pysparse layers in eval mode too: the inference kernels, as deployed
        try:
            with torch.no_grad():
                for b in eval_batches:
                    total += float(_distance(loss, _output(_call(student, b)), _output(_call(teacher, b)), temperature))
                    count += 1
        finally:
            for m, w in was.items():
                m.train(w)
        return total / max(count, 1)

    best: Dict = {}

    def keep(step: int, value: float) -> None:
        """keep_best: remember the trained parameters after `step` steps when their held-out loss
        `value` is the best yet (the untrained state always, so that there is one to restore)."""
        report["evals"].append((step, value))
        if not best or value < best["loss"]:
            best.update(loss=value, step=step, state=[p.detach().clone() for p in params])

    report: Dict = {"losses": [], "trained_parameters": sum(p.numel() for p in params)}
    hooks = [p.register_hook(lambda g, m=m: g * m) for p, m in masked]
    taps = _Taps(tapped)
    bar = lambda value: None  # noqa: E731  (the progress bar, once evaluation has run)
    if keep_best:
        report["evals"] = []
    try:
        report["eval_before"] = evaluate()
        if keep_best:
            keep(0, report["eval_before"])
        bar = _progress(steps, progress)
        start = time.perf_counter()
        for step, (i, batch) in enumerate(itertools.cycle(enumerate(batches))):
            if steps is not None and step >= steps:
                break
            if time_budget is not None and time.perf_counter() - start >= time_budget:
                break
            if keep_best and step > 0 and step % eval_every == 0:
                keep(step, evaluate())
            target, target_hidden = teacher_outputs(i, batch)
            value = _distance(loss, _output(_call(student, batch)), target, temperature)
            if taps.names:
                value = value + hidden_weight * sum(
                    (s.float() - t.float()).square().sum() / t.float().square().sum().clamp_min(1e-30)
                    for s, t in zip(taps.take("student"), target_hidden)) / len(taps.names)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            report["losses"].append(float(value.detach()))
            bar(report["losses"][-1])
        if keep_best and report["losses"]:
            keep(len(report["losses"]), evaluate())  # the last state (the loop stops before evaluating it)
    finally:
        taps.remove()
        for h in hooks:
            h.remove()
        bar(None)
        for m, was in modes.items():
            m.train(was)
        teacher.train(teacher_mode)
    report["steps"] = len(report["losses"])
    report["seconds"] = time.perf_counter() - start
    if keep_best:
        with torch.no_grad():
            for p, kept in zip(params, best["state"]):
                p.copy_(kept)
        report["best_step"] = best["step"]
        report["eval_after"] = best["loss"]
    else:
        report["eval_after"] = evaluate()
    return report


# What recover keeps of the teacher's outputs (and hidden states) so that later epochs skip its forward.
_TEACHER_CACHE_BYTES = 2 << 30


class _Taps:
    """Forward hooks on the submodules named in ``hidden`` of both models: each forward leaves the
    outputs there, in name order, for ``take``."""

    @staticmethod
    def modules(student: torch.nn.Module, teacher: torch.nn.Module, names: Sequence[str]) -> List[tuple]:
        """(name, side, module) for every name and model; a ValueError for a name either lacks."""
        out = []
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"pysparse.recover: hidden must name submodules, got {name!r}")
            for side, model in (("student", student), ("teacher", teacher)):
                try:
                    out.append((name, side, model.get_submodule(name)))
                except AttributeError:
                    raise ValueError(f"pysparse.recover: hidden names {name!r}, which the {side} does not have") from None
        return out

    def __init__(self, tapped: List[tuple]):
        self.names = list(dict.fromkeys(name for name, _, _ in tapped))
        self.seen: Dict[str, Dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.handles = [mod.register_forward_hook(
            lambda m, args, out, side=side, name=name: self.seen[side].__setitem__(name, _output(out)))
            for name, side, mod in tapped]

    def take(self, side: str) -> List[torch.Tensor]:
        got = self.seen[side]
        out = [got.pop(n) for n in self.names if n in got]
        if len(out) != len(self.names):
            raise ValueError(f"pysparse.recover: hidden modules {self.names} did not all run in the {side}'s forward")
        got.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _progress(total: Optional[int], enabled: Optional[bool]) -> Callable[[Optional[float]], None]:
    """A callback taking each step's loss (None closes): tqdm where installed, else nothing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return lambda value: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of the package; a bare checkout may lack it
        return lambda value: None
    bar = tqdm(total=total, desc="pysparse.recover", unit="step")

    def update(value: Optional[float]) -> None:
        if value is None:
            bar.close()
        else:
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            bar.update(1)
    return update


__all__: List[str] = ["recover"]
