"""Structured filter (channel) pruning of CNNs, with the dependencies between layers tracked.

Removing output channel k of a conv removes filter k and its bias, entry k of the BatchNorm that
normalises it, and input channel k of every layer that reads it. Layers are coupled: the inputs of
a residual add, a depthwise conv's input and output, and the operands of a per-channel product must
lose the same channels. `filter_groups` finds these couplings by tracing the model with torch.fx and
following the channel dimension (dim 1) of every tensor, one union-find element per channel;
`filters` scores the channels, removes the lowest and returns a smaller dense copy of the model.

Followed through: Conv1d/2d/3d (groups == 1; depthwise with groups == in == out channels; other
grouped convs lose whole groups: a group's input and output channels are one unit, and the conv
keeps as many groups as are left), Linear on (batch, features) or on the channels of a
channels-last tensor, BatchNorm, LayerNorm over the channels (module or F.layer_norm, e.g. in a
LayerNorm2d that permutes around it), per-channel parameters read directly (a layer scale
gamma * x: sliced with the channels), elementwise activations, dropout and stochastic depth (the
model is traced in eval mode), pooling, padding and resizing, residual add / sub / mul / div,
permute / transpose (the channel axis moves, e.g. ConvNeXt's channels-last MLP), channel shuffle
(view to (N, groups, C / groups, ...), transpose of those two dims, view back: channel j of every
group is one unit), torch.cat (on the channel dim the output channels are the inputs' channels at
their offsets; on another dim the inputs are coupled), flatten (or view/reshape to (N, -1)) before
a Linear (each channel owns the Linear's input features of all its spatial positions),
reductions and integer indexing over other axes than the batch and the channels (ViT's class
token x[:, 0]), and a parameter expanded and concatenated off the channel axis (the class token
itself). A channel count read from a tensor's shape to shape another tensor (a ViT's qkv split
into heads by C // heads) makes those channels unprunable: the pruned model would break.

Exact: a removed channel whose filters are zero leaves the outputs unchanged, except where a
LayerNorm normalises over the channels: the kept ones are then normalised over fewer channels
(`filter_groups` names those LayerNorms; recovery training absorbs the change).

Anything else that reads a tensor with channels (indexing of the channel axis, split, GroupNorm,
an unknown module, a parameter used directly in any other way, a view of the channel dim other
than the above) makes the channels it reads and writes unprunable: safe, never an error.
`filter_groups` reports each group and, for unprunable ones, why.

The tracer is `pysparse.prune.channels`, the criteria `pysparse.prune.filter_scores`; this module
checks the arguments and cuts the weights.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Set, Union

import torch
from torch import nn

from .channels import PREFIX, Channels, eval_no_grad, output_shapes, trace_channels
from .filter_scores import CRITERIA, channel_scores, select_channels

__all__ = ["filters", "filter_groups", "CRITERIA", "SCOPES"]

SCOPES = ("global", "local")


def _skip_names(skip) -> Optional[List[str]]:
    if skip is None:
        return None
    skip = [skip] if isinstance(skip, str) else list(skip)
    if not all(isinstance(s, str) for s in skip):
        raise ValueError(PREFIX + f"skip must be a list of module-name patterns, got {skip!r}")
    return skip


def _inputs(example_input) -> tuple:
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError(PREFIX + "example_input must be a tensor or a tuple of tensors")
    return inputs


def filter_groups(model: nn.Module, example_input, *, skip: Optional[Sequence[str]] = None) -> List[dict]:
    """The channel groups `filters` would prune, as dicts: "members" (layers whose output channels
    they are: convs, Linears, BatchNorms, depthwise convs), "consumers" (layers that read them),
    "channels" (how many can be removed, each one a set of coupled channels), "prunable",
    "reason" (why not, or "") and "renormalised_by" (the LayerNorms over these channels: removing a
    channel there, even an all-zero one, changes how the kept ones are normalised). `skip` as in
    `filters`. The model is not changed."""
    ch, groups, _ = trace_channels(model, _inputs(example_input), _skip_names(skip))
    return [dict(members=list(g.members), consumers=list(g.consumers), channels=len(g.units),
                 prunable=not g.reason, reason=g.reason, renormalised_by=list(g.renormalised)) for g in groups]


def _set(m: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    t = getattr(m, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device))
    setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)


def _shrink(ch: Channels, pruned: Set[int]) -> None:
    def keep(els):
        idx = [i for i, e in enumerate(els) if ch.find(e) not in pruned]
        return None if len(idx) == len(els) else torch.tensor(idx, dtype=torch.long)

    for rec in ch.recs.values():
        m, k_out = rec.module, keep(rec.out)
        if rec.kind == "param":  # a per-channel parameter read directly (a layer scale)
            if k_out is not None:
                _set(m, rec.attr, k_out, rec.axis)
                if isinstance(m, nn.LayerNorm) and rec.attr == "weight":  # a LayerNorm subclass traced into
                    m.normalized_shape = tuple(m.weight.shape)
            continue
        k_in = keep(rec.inp) if rec.inp is not None and rec.kind != "gconv" else None
        if k_out is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                _set(m, name, k_out, 0)
        if k_in is not None:
            _set(m, "weight", k_in, 1)
        n_out = len(rec.out) if k_out is None else len(k_out)
        if rec.kind == "bn":
            m.num_features = n_out
        elif rec.kind == "ln":
            m.normalized_shape = (n_out,)
        elif rec.kind == "linear":
            m.out_features, m.in_features = n_out, m.weight.shape[1]
        elif rec.kind == "gconv":  # whole groups went: a group's filters read its own inputs, as before
            m.groups = m.groups * n_out // len(rec.out)
            m.out_channels, m.in_channels = n_out, m.weight.shape[1] * m.groups
        else:
            m.out_channels = n_out
            m.in_channels = n_out if rec.kind == "dw" else m.weight.shape[1]
            if rec.kind == "dw":
                m.groups = n_out


def _check_args(ratio, criterion, scope, min_channels, calibration):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(PREFIX + f"ratio must be in [0, 1), got {ratio!r}")
    if criterion not in CRITERIA:
        raise ValueError(PREFIX + f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if scope not in SCOPES:
        raise ValueError(PREFIX + f"unknown scope {scope!r}; choose 'global' or 'local'")
    ok_int = isinstance(min_channels, int) and not isinstance(min_channels, bool) and min_channels >= 0
    if not ok_int and not (isinstance(min_channels, float) and 0 < min_channels <= 1):
        raise ValueError(PREFIX + f"min_channels must be an int >= 0 or a fraction in (0, 1], got {min_channels!r}")
    if criterion == "taylor" and calibration is None:
        raise ValueError(PREFIX + "criterion 'taylor' needs calibration=: a callable f(model) -> scalar loss, or a list of them")
    if calibration is not None and not callable(calibration) and not (
            isinstance(calibration, (list, tuple)) and calibration and all(callable(f) for f in calibration)):
        raise ValueError(PREFIX + "calibration must be a callable f(model) -> scalar loss, or a non-empty list of them")


def filters(model: nn.Module, example_input, ratio: float, *, criterion: str = "l1", scope: str = "global",
            skip: Optional[Sequence[str]] = None, min_channels: Union[int, float] = 1,
            calibration: Union[Callable, Sequence[Callable], None] = None) -> nn.Module:
    """A smaller dense copy of `model` with `ratio` of its prunable conv/Linear output channels
    removed; same output shape, `model` itself is not changed.

    Channels are removed per coupled group (see the module docstring and `filter_groups`); a
    group's score for a channel is the sum over its layers of:

    - "l1" / "l2": the L1 / L2 norm of the filter (conv or Linear weight row);
    - "bn": |gamma| of the BatchNorm(s) (network slimming); "l1" in groups without BatchNorm;
    - "geometric_median": the summed distance of the filter to the layer's other filters, so the
      filters nearest the geometric median, the most replaceable, go first (FPGM, He et al. 2019);
    - "taylor": |sum of activation * gradient| over the calibration losses at the BatchNorm outputs
      (conv/Linear outputs without BatchNorm), the first-order Taylor estimate of the loss change
      when the channel is zeroed (not squared, unlike the "fisher" criterion of sparsify and
      Iterative). `calibration` is a callable f(model) -> scalar loss, or a list of them,
      run on the copy; BatchNorm statistics changed by them are restored.

    scope="global" ranks all prunable channels together after dividing each group's scores by their
    mean (layers differ in scale, so raw scores are not comparable); "local" removes `ratio` of each
    group. Every group keeps at least max(min_channels, 1) channels (a float: that fraction of the
    group, rounded up). Unprunable: channels of the model input and output, and the output channels
    of modules matching `skip` (fnmatch patterns of qualified names; None: the first conv and the
    last Linear; [] for none). A skipped module other than a single torch.nn layer (a block, your own
    module) is not traced into, which also gets an untraceable submodule past torch.fx; the
    channels entering and leaving it are kept.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(PREFIX + f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_args(ratio, criterion, scope, min_channels, calibration)
    inputs, skip = _inputs(example_input), _skip_names(skip)
    new = copy.deepcopy(model)
    ch, groups, expected = trace_channels(new, inputs, skip)
    if ratio == 0:
        return new
    scores = channel_scores(ch, groups, criterion, calibration, new)
    _shrink(ch, select_channels(groups, scores, ratio, scope, min_channels))
    with eval_no_grad(new):
        try:
            got = output_shapes(new(*inputs))
        except Exception as e:
            raise RuntimeError(PREFIX + f"the pruned model fails on example_input ({e}); its forward probably "
                               "hard-codes a channel count: pass skip= for that module") from e
    if got != expected:
        raise RuntimeError(PREFIX + f"the pruned model's output shapes {got} differ from the original's {expected}; "
                           "pass skip= for the module that changes them")
    return new
