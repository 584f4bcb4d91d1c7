"""Channel dependency groups of a network, traced with torch.fx: which conv / Linear / BatchNorm
channels must be removed together (the part of `pysparse.prune.filters` that reads the model).

Removing output channel k of a conv removes filter k and its bias, entry k of the BatchNorm that
normalises it, and input channel k of every layer that reads it. Layers are coupled: the inputs of
a residual add, a depthwise conv's input and output, and the operands of a per-channel product must
lose the same channels. `trace_channels` finds these couplings by tracing the model and following
the channel dimension (dim 1) of every tensor, one union-find element per channel. What it follows
through, and what makes channels unprunable, is listed in `pysparse.prune.filters`.
"""
from __future__ import annotations

import builtins
import contextlib
import fnmatch
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .structured import owner_of

PREFIX = "pysparse.prune.filters: "  # every error of filter pruning starts so

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_PASS_FUNCS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.elu, F.selu, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad,
    torch.abs, torch.neg, torch.exp, torch.clamp, torch.clone}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
                 "clamp_max", "abs", "neg", "exp", "sqrt", "pow", "contiguous", "clone", "detach", "float",
                 "half", "bfloat16", "double", "to"}
_BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                 operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                 torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_VIEW_METHODS = {"view", "reshape"}
# Ops that read only a tensor's metadata: they neither change nor couple channels.
_META_METHODS = {"size", "dim", "numel", "nelement"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


@dataclass
class SlicedLayer:
    """A layer whose weights are sliced: `inp` / `out` are the channel elements it reads / writes
    (a depthwise conv and a BatchNorm write the channels they read: inp is None)."""
    name: str
    kind: str  # "conv", "linear", "dw" (depthwise conv), "gconv" (grouped conv), "bn", "ln" (LayerNorm), "param"
    module: nn.Module
    inp: Optional[List[int]]
    out: List[int]
    attr: str = ""  # kind "param": the parameter's name in module
    axis: int = 0   # kind "param": its channel axis


@dataclass
class ChannelGroup:
    units: List[int] = field(default_factory=list)     # union-find roots: one per removable channel
    members: List[str] = field(default_factory=list)   # layers whose output channels these are
    consumers: List[str] = field(default_factory=list)  # layers that read them
    reason: str = ""                                   # why unprunable; "" when prunable
    renormalised: List[str] = field(default_factory=list)  # LayerNorms over these channels (see filters)


class Channels:
    """Union-find over channel elements. A producer (conv, Linear, the model input, an op we do not
    follow) creates a space of fresh elements; coupled channels are joined; `fixed` elements may
    never be removed."""

    def __init__(self):
        self.parent: List[int] = []
        self.fixed: Dict[int, str] = {}
        self.spaces: List[tuple] = []  # (owner layer name or None, elements)
        self.recs: Dict[str, SlicedLayer] = {}

    def new(self, n: int, owner: Optional[str] = None, reason: str = "") -> List[int]:
        els = list(range(len(self.parent), len(self.parent) + n))
        self.parent.extend(els)
        self.spaces.append((owner, els))
        self.fix(els, reason)
        return els

    def find(self, e: int) -> int:
        p = self.parent
        root = e
        while p[root] != root:
            root = p[root]
        while p[e] != root:
            p[e], e = root, p[e]
        return root

    def union(self, a: List[int], b: List[int]) -> None:
        for x, y in zip(a, b):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def fix(self, els: Optional[List[int]], reason: str) -> None:
        if els and reason:
            for e in els:
                self.fixed.setdefault(e, reason)


class _Tracer(fx.Tracer):
    def __init__(self, opaque: Callable[[str], bool]):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.opaque(qualname) or super().is_leaf_module(m, qualname)


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta.shape if isinstance(meta, TensorMetadata) else None


def output_shapes(x) -> list:
    """Shapes of the tensors (or TensorMetadata) in a nested output, in order."""
    if isinstance(x, (torch.Tensor, TensorMetadata)):
        return [tuple(x.shape)]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [s for v in x for s in output_shapes(v)]
    return []


@contextlib.contextmanager
def eval_no_grad(model: nn.Module):
    """Eval mode (BatchNorm statistics untouched), no autograd; per-module modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes:
            m.training = t


def _trace_error(model: nn.Module, err: Exception) -> ValueError:
    """A ValueError naming the innermost module whose forward was being traced when `err` was raised."""
    names = {id(m): n for n, m in model.named_modules()}
    culprit = ""
    tb = err.__traceback__
    while tb is not None:
        s = tb.tb_frame.f_locals.get("self")
        if isinstance(s, nn.Module) and id(s) in names:
            culprit = names[id(s)]
        tb = tb.tb_next
    why = (str(err).strip().splitlines() or [type(err).__name__])[0]
    top = type(model).__name__
    if culprit:
        cls = type(model.get_submodule(culprit)).__name__
        return ValueError(PREFIX + f"torch.fx cannot trace module '{culprit}' ({cls}) of {top} ({why}); make its "
                          f"forward traceable or pass skip=['{culprit}'] to keep that module whole")
    return ValueError(PREFIX + f"torch.fx cannot trace {top}.forward ({why}); make it traceable (no Python control "
                      f"flow on tensor values) or move the untraceable part into a submodule and pass skip=[its name]")


def trace_channels(model: nn.Module, inputs: tuple, skip: Optional[List[str]]):
    """Trace `model` and follow its channels: returns (Channels, list of ChannelGroup, output shapes)."""
    patterns = list(skip or [])
    matches = lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    tracer = _Tracer(matches)  # only the user's patterns make modules opaque
    try:
        with eval_no_grad(model):  # the inference graph: stochastic depth and dropout are identities
            graph = tracer.trace(model)
    except Exception as e:
        raise _trace_error(model, e) from e
    gm = fx.GraphModule(model, graph)
    with eval_no_grad(model):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback we chain
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            why = (str(e.__cause__ or e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(PREFIX + f"{type(model).__name__} fails on example_input ({why})") from e
    nodes = list(graph.nodes)
    if skip is None:  # default: the stem conv and the classifier
        mods = [(n.target, model.get_submodule(n.target)) for n in nodes if n.op == "call_module"]
        convs = [name for name, m in mods if isinstance(m, _CONV)]
        linears = [name for name, m in mods if isinstance(m, nn.Linear)]
        patterns += convs[:1] + linears[-1:]

    ch = Channels()
    vec: Dict[fx.Node, List[int]] = {}
    cdim: Dict[fx.Node, int] = {}  # the channel axis where it is not 1 (channels-last after a permute)
    split: Dict[fx.Node, tuple] = {}  # channels viewed as (groups, C / groups) on dims 1, 2 (a channel shuffle)
    pview: Dict[fx.Node, fx.Node] = {}  # parameter.expand(...) -> the parameter's get_attr node
    shape_of: Dict[fx.Node, fx.Node] = {}  # x.shape / x.size() -> x
    taint: Dict[fx.Node, Set[fx.Node]] = {}  # a number computed from these tensors' channel counts
    sized: List[tuple] = []  # (tensor whose channel count is used, the tensor it shapes or None, the op)
    raw_linear: Set[str] = set()  # Linear layers also applied to the last dim of a >2-D tensor
    cd = lambda node: cdim.get(node, 1)  # noqa: E731

    def put(node, els, c=1):
        """node's channels are els, on axis c."""
        vec[node] = els
        if c != 1:
            cdim[node] = c

    def opaque(node, reason, owner=None):
        for a in node.all_input_nodes:
            ch.fix(vec.get(a), reason)
        s = _shape(node)
        if s is not None and len(s) >= 2:
            vec[node] = ch.new(s[1], owner=owner, reason=reason)

    def passthrough(node, x, reason):
        """Channels unchanged when the op keeps (N, C) and reads no other tensor with channels."""
        s, xs = _shape(node), _shape(x)
        others = [a for a in node.all_input_nodes if a is not x and a in vec]
        c = cd(x)
        if x in vec and s is not None and xs is not None and len(s) >= 2 and s[0] == xs[0] and not others and (
                s[:2] == xs[:2] if c == 1 and x not in split else s == xs):
            put(node, vec[x], c)
            if x in split:
                split[node] = split[x]
        else:
            opaque(node, reason)

    def param_operand(a, s, c, C):
        """A parameter read directly (get_attr) that broadcasts against a tensor of shape s with C
        channels on axis c: its channel axis, or None."""
        a = pview.get(a, a)  # a parameter expanded (ViT's class token)
        if a.op != "get_attr":
            return None
        p_s = _shape(a)
        if p_s is None or len(p_s) > len(s) or not isinstance(a.target, str):
            return None
        lead = len(s) - len(p_s)
        axis = c - lead
        if axis < 0 or p_s[axis] != C or any(v not in (1, s[i + lead]) for i, v in enumerate(p_s)):
            return None
        mod, attr = owner_of(model, a.target)
        return axis if isinstance(getattr(mod, attr, None), nn.Parameter) else None

    def elementwise(node, reason):
        s = _shape(node)
        if s is None or len(s) < 2:
            return opaque(node, reason)
        with_channels = [a for a in node.all_input_nodes if a in vec]
        c = cd(with_channels[0]) if with_channels else 1
        if any(cd(a) != c for a in with_channels):
            return opaque(node, reason)
        coupled, params = [], []
        for a in node.all_input_nodes:
            a_s = _shape(a)
            if a_s is None or a_s.numel() == 1 and a not in vec:
                continue  # a scalar or shape, not a tensor with channels
            if a not in vec and with_channels:
                axis = param_operand(a, s, c, s[c])
                if axis is not None:  # a per-channel parameter (layer scale): sliced with the channels
                    params.append((a, axis))
                    continue
            if len(a_s) != len(s) or a not in vec or a_s[c] not in (1, s[c]):
                return opaque(node, reason)
            if a_s[c] == s[c]:
                coupled.append(vec[a])
        if not coupled:
            return opaque(node, reason)
        for v in coupled[1:]:
            ch.union(coupled[0], v)
        for a, axis in params:
            param_rec(a, axis, coupled[0])
        put(node, coupled[0], c)

    def param_rec(a, axis, els):
        """Parameter a (a get_attr node, or its expand) is sliced along `axis` with channels els."""
        a = pview.get(a, a)
        key = "param:" + a.target
        if key in ch.recs:
            ch.union(ch.recs[key].out, els)
        else:
            owner, attr = owner_of(model, a.target)
            ch.recs[key] = SlicedLayer(a.target, "param", owner, None, els, attr, axis)

    def permute(node, x, perm, reason):
        """A permutation of the axes that keeps the batch first: the channel axis moves."""
        s, xs = _shape(node), _shape(x)
        perm = [p % len(xs) for p in perm] if xs is not None and all(isinstance(p, int) for p in perm) else None
        if perm is None or x not in vec or len(perm) != len(xs) or sorted(perm) != list(range(len(xs))) or perm[0] != 0:
            return opaque(node, reason)
        put(node, vec[x], perm.index(cd(x)))

    def flatten(node, x, start, end, reason):
        xs = _shape(x)
        if xs is None or x not in vec or not isinstance(start, int) or not isinstance(end, int) or cd(x) != 1:
            return opaque(node, reason)
        start, end = start % len(xs), end % len(xs)
        if start >= 2:
            return passthrough(node, x, reason)
        if start != 1 or end < start:
            return opaque(node, reason)
        reps = math.prod(xs[2:end + 1])  # channel c owns features c*reps .. c*reps + reps - 1
        vec[node] = [e for e in vec[x] for _ in range(reps)]

    def linear_like(node, name, m, x, kind, n_in, n_out):
        if len(vec[x]) != n_in:
            return opaque(node, f"unexpected input size at {name}")
        if name in ch.recs:  # a layer applied twice: both uses read and write the same channels
            rec = ch.recs[name]
            ch.union(rec.inp, vec[x])
        else:
            out = ch.new(n_out, owner=name, reason=f"skipped: {name}" if matches(name) else "")
            rec = ch.recs[name] = SlicedLayer(name, kind, m, vec[x], out)
        vec[node] = rec.out

    def same_channels(node, name, m, x, kind):
        if name in ch.recs:
            ch.union(ch.recs[name].out, vec[x])
        else:
            ch.recs[name] = SlicedLayer(name, kind, m, None, vec[x])
        if matches(name):
            ch.fix(vec[x], f"skipped: {name}")
        vec[node] = vec[x]

    def grouped(node, name, m, x):
        """A grouped conv loses whole groups: each group's input and output channels are one unit,
        and the conv keeps a group count equal to the groups left."""
        g = m.groups
        if m.in_channels % g or m.out_channels % g or len(vec[x]) != m.in_channels:
            return opaque(node, f"unexpected input size at {name}", name)
        cin, cout = m.in_channels // g, m.out_channels // g
        if name in ch.recs:
            ch.union(ch.recs[name].inp, vec[x])
            vec[node] = ch.recs[name].out
            return
        out = ch.new(m.out_channels, owner=name, reason=f"skipped: {name}" if matches(name) else "")
        for k in range(g):
            unit = vec[x][k * cin:(k + 1) * cin] + out[k * cout:(k + 1) * cout]
            ch.union([unit[0]] * (len(unit) - 1), unit[1:])
        ch.recs[name] = SlicedLayer(name, "gconv", m, vec[x], out)
        vec[node] = out

    def call_module(node):
        name = node.target
        m = model.get_submodule(name)
        reason = f"skipped: {name}" if matches(name) else f"unsupported module {name} ({type(m).__name__})"
        x = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        xs = _shape(x)
        known = type(m).__module__.startswith("torch.nn.modules.")  # not subclasses, not parametrized layers
        if not known or xs is None or x not in vec:
            return opaque(node, reason, name)
        c = cd(x)
        if isinstance(m, _CONV) and len(xs) == m.weight.dim() and c == 1:
            if m.groups == 1:
                return linear_like(node, name, m, x, "conv", m.in_channels, m.out_channels)
            if m.groups == m.in_channels == m.out_channels:
                return same_channels(node, name, m, x, "dw")
            return grouped(node, name, m, x)
        if isinstance(m, nn.Linear):
            if len(xs) == 2 or c == len(xs) - 1:  # features, or channels-last: the Linear mixes the channels
                linear_like(node, name, m, x, "linear", m.in_features, m.out_features)
                if node in vec:
                    put(node, vec[node], c)
                return
            if len(xs) > 2 and c == 1 and xs[-1] == m.in_features and all(e in ch.fixed for e in vec[x]):
                # After an op we do not follow (attention's reshapes) dim 1 is not channels: the
                # Linear reads a fixed space on the last dim and writes channels-last.
                inp = ch.new(m.in_features, reason=f"{name} reads the output of an op not followed")
                if name in ch.recs:
                    ch.union(ch.recs[name].inp, inp)
                else:
                    out = ch.new(m.out_features, owner=name, reason=f"skipped: {name}" if matches(name) else "")
                    ch.recs[name] = SlicedLayer(name, "linear", m, inp, out)
                return put(node, ch.recs[name].out, len(xs) - 1)
            if len(xs) > 2 and c == 1:  # acts on the last dim: dim 1 passes through
                raw_linear.add(name)
                return passthrough(node, x, reason)
        if isinstance(m, _BN) and xs[1] == m.num_features and c == 1:
            return same_channels(node, name, m, x, "bn")
        if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (xs[c],) and c == len(xs) - 1:
            same_channels(node, name, m, x, "ln")  # over the channels of a (channels-last) tensor
            return put(node, vec[node], c)
        if isinstance(m, nn.Flatten):
            return flatten(node, x, m.start_dim, m.end_dim, reason)
        if isinstance(m, _PASS_MODULES) or isinstance(m, nn.PReLU) and m.num_parameters == 1:
            passthrough(node, x, reason)
            if matches(name) and node in vec:
                ch.fix(vec[node], f"skipped: {name}")
            return
        opaque(node, reason, name)

    def call_function(node):
        t, args, kw = node.target, node.args, node.kwargs
        method = t if node.op == "call_method" else None
        reason = f"unsupported op .{t}()" if method else f"unsupported op {getattr(t, '__name__', t)}"
        x = args[0] if args and isinstance(args[0], fx.Node) else None
        # Shape arithmetic: a value read from a tensor's channel count (B, L, C = x.shape) that
        # later shapes another tensor ties that count (checked after the walk: `sized`).
        if (t is builtins.getattr and len(args) > 1 and args[1] == "shape" or method == "size" and len(args) == 1) \
                and x in vec:
            shape_of[node] = x
            return
        if method == "size" and len(args) == 2 and x in vec and isinstance(args[1], int) and _shape(x) is not None:
            if args[1] % len(_shape(x)) == cd(x):
                taint[node] = {x}
            return
        if t is operator.getitem and x in shape_of and isinstance(args[1], int):
            src = shape_of[x]
            if args[1] % len(_shape(src)) == cd(src):
                taint[node] = {src}
            return
        if _shape(node) is None and any(a in taint for a in node.all_input_nodes):
            taint[node] = set().union(*(taint[a] for a in node.all_input_nodes if a in taint))
            return
        if method in _META_METHODS or t is builtins.len or (
                t is builtins.getattr and len(args) > 1 and args[1] in _META_ATTRS):
            return
        if t in _BINARY_FUNCS or method in _BINARY_METHODS:
            return elementwise(node, reason)
        if t in _PASS_FUNCS or method in _PASS_METHODS:
            return passthrough(node, x, reason)
        if t is torch.permute or method == "permute":
            perm = args[1:] if method else args[1:2]
            if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
                perm = tuple(perm[0])
            if not perm:
                perm = kw.get("dims", ())
            return permute(node, x, list(perm), reason)
        if (t is torch.transpose or method == "transpose") and len(args) == 3:
            xs = _shape(x)
            if xs is None or not all(isinstance(d, int) for d in args[1:]):
                return opaque(node, reason)
            if x in split:  # the shuffle itself: (groups, C / groups) -> (C / groups, groups)
                if {args[1] % len(xs), args[2] % len(xs)} != {1, 2}:
                    return opaque(node, reason)
                g, cg = split[x]
                vec[node] = [vec[x][i * cg + j] for j in range(cg) for i in range(g)]
                split[node] = (cg, g)
                return
            perm = list(range(len(xs)))
            a, b = args[1] % len(xs), args[2] % len(xs)
            perm[a], perm[b] = perm[b], perm[a]
            return permute(node, x, perm, reason)
        if t is F.layer_norm and x in vec:
            xs, shape = _shape(x), args[1] if len(args) > 1 else kw.get("normalized_shape")
            if xs is not None and cd(x) == len(xs) - 1 and list(shape or []) == [xs[-1]]:
                w = [a for a in list(args[2:4]) + [kw.get("weight"), kw.get("bias")] if isinstance(a, fx.Node)]
                if all(param_operand(a, xs, len(xs) - 1, xs[-1]) is not None for a in w):
                    put(node, vec[x], cd(x))
                    for a in w:
                        param_rec(a, 0, vec[x])
                    return
            return opaque(node, reason)
        if t in _CAT_FUNCS:
            parts = args[0] if args else kw.get("tensors")
            dim = args[1] if len(args) > 1 else kw.get("dim", kw.get("axis", 0))
            s = _shape(node)
            if isinstance(parts, (list, tuple)) and s is not None and isinstance(dim, int) and any(
                    p in pview for p in parts):
                # A parameter joined along a non-channel axis (ViT's class token before the patches):
                # sliced with the channels of the other parts.
                rest = [p for p in parts if p not in pview]
                c = cd(rest[0]) if rest and rest[0] in vec else None
                if c is not None and dim % len(s) != c and all(p in vec and cd(p) == c for p in rest) and all(
                        param_operand(p, s, c, s[c]) is not None for p in parts if p in pview):
                    for p in rest[1:]:
                        ch.union(vec[rest[0]], vec[p])
                    for p in parts:
                        if p in pview:
                            param_rec(p, param_operand(p, s, c, s[c]), vec[rest[0]])
                    return put(node, vec[rest[0]], c)
                return opaque(node, reason)
            if (not isinstance(parts, (list, tuple)) or not all(p in vec for p in parts) or s is None
                    or not isinstance(dim, int) or any(len(_shape(p)) != len(s) for p in parts)
                    or any(cd(p) != cd(parts[0]) for p in parts)):
                return opaque(node, reason)
            if cd(parts[0]) != 1:
                cdim[node] = cd(parts[0])
            if dim % len(s) == cd(parts[0]):
                vec[node] = [e for p in parts for e in vec[p]]
            else:
                for p in parts[1:]:
                    ch.union(vec[parts[0]], vec[p])
                vec[node] = vec[parts[0]]
            return
        if t is torch.flatten or method == "flatten":
            start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
            return flatten(node, x, start, end, reason)
        if t is torch.reshape or method in _VIEW_METHODS:
            shape = args[1:] if method else args[1:2]
            if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
                shape = tuple(shape[0])
            s, xs = _shape(node), _shape(x)
            dynamic = lambda v: isinstance(v, fx.Node) or v == -1  # noqa: E731
            if s is not None and xs is not None and len(shape) == len(s) >= 2 and cd(x) == 1 and x in vec:
                if x in split:  # a channel shuffle's (N, a, b, ...) merged back into (N, a * b, ...)
                    if len(s) == len(xs) - 1 and s[0] == xs[0] and s[1] == xs[1] * xs[2] and dynamic(shape[1]) \
                            and tuple(s[2:]) == tuple(xs[3:]):
                        vec[node] = vec[x]
                        return
                    return opaque(node, reason)
                # A channel shuffle's split of the channels into (groups, C / groups), the group
                # count literal and the rest following the input: each channel position j within
                # the groups is one unit (removed from every group), so the split stays even and
                # the shuffle maps kept channels as before.
                if len(s) == len(xs) + 1 and s[0] == xs[0] and s[1] * s[2] == xs[1] and tuple(s[3:]) == tuple(xs[2:]) \
                        and isinstance(shape[1], int) and shape[1] == s[1] and dynamic(shape[2]):
                    g, cg = s[1], s[2]
                    els = vec[x]
                    for j in range(cg):
                        ch.union([els[j]] * (g - 1), [els[i * cg + j] for i in range(1, g)])
                    vec[node], split[node] = els, (g, cg)
                    return
                # The target's dim 1 must follow the input (-1, or x.size(1)): a literal channel
                # count would break once channels are removed.
                if len(s) == 2 and shape[1] == -1 and s[0] == xs[0]:
                    return flatten(node, x, 1, -1, reason)
                if isinstance(shape[1], fx.Node) and s[:2] == xs[:2]:
                    return passthrough(node, x, reason)
            return opaque(node, reason)
        if method == "expand" and x is not None and x.op == "get_attr" and x not in vec:
            pview[node] = x  # a parameter broadcast to the batch: its users decide (cat, elementwise)
            return
        if t is operator.getitem and x in vec and isinstance(args[1], tuple):
            # Indexing that keeps the batch and the channel axis whole (x[:, 0]: ViT's class token)
            idx, xs, c = args[1], _shape(x), cd(x)
            full = lambda i: isinstance(i, slice) and (i.start, i.stop, i.step) == (None, None, None)  # noqa: E731
            if xs is not None and len(idx) <= len(xs) and idx and full(idx[0]) and (len(idx) <= c or full(idx[c])) \
                    and all(full(i) or isinstance(i, int) for i in idx):
                return put(node, vec[x], c - sum(isinstance(i, int) for i in idx[:c]))
            return opaque(node, reason)
        if t in _REDUCE_FUNCS or method in _REDUCE_METHODS:
            dims = args[1] if len(args) > 1 else kw.get("dim")
            keepdim = args[2] if len(args) > 2 else kw.get("keepdim", False)
            xs, c = _shape(x), cd(x)
            if dims is not None and xs is not None and x in vec and isinstance(keepdim, bool):
                dims = {d % len(xs) for d in ((dims,) if isinstance(dims, int) else dims)}
                if not dims & {0, c}:
                    if c == 1:
                        return passthrough(node, x, reason)
                    # tokens averaged: the channels move left past the reduced axes
                    return put(node, vec[x], c if keepdim else c - sum(d < c for d in dims))
            return opaque(node, reason)
        opaque(node, reason)

    for node in nodes:
        s = _shape(node)
        used = set().union(*(taint[a] for a in node.all_input_nodes if a in taint)) if node.op != "output" else set()
        if used and s is not None:  # a channel count shapes this op's result
            reshaped = node.args[0] if node.op == "call_method" and node.target in ("view", "reshape", "expand") \
                or node.target is torch.reshape else None
            sized.extend((src, reshaped, node) for src in used)
        if node.op == "placeholder":
            if s is not None and len(s) >= 2:
                vec[node] = ch.new(s[1], reason="model input")
        elif node.op == "get_attr":
            # A parameter's channels are its users' business (a per-channel scale is sliced with
            # them, anything else makes them unprunable); another tensor is a space of its own.
            owner, attr = owner_of(model, str(node.target))
            is_param = isinstance(getattr(owner, attr, None), nn.Parameter)
            if s is not None and len(s) >= 2 and not is_param:
                vec[node] = ch.new(s[1], reason=f"tensor {node.target} used directly in forward")
        elif node.op == "output":
            for a in node.all_input_nodes:
                ch.fix(vec.get(a), "model output")
        elif any(a in split for a in node.all_input_nodes) and not (
                node.op == "call_method" and node.target in ("transpose", "view", "reshape", "contiguous")
                or node.target in (torch.transpose, torch.reshape)):
            opaque(node, f"unsupported use of a channel split ({node.target})")
        elif node.op == "call_module":
            call_module(node)
        else:
            call_function(node)
    for src, shaped, node in sized:
        # Fine when the shaped tensor holds the same channels (a view of x itself, a gate coupled
        # with x); otherwise x's channel count is structural (ViT: the residual width reshapes qkv).
        if shaped is None or shaped not in vec or src not in vec or \
                {ch.find(e) for e in vec[shaped]} != {ch.find(e) for e in vec[src]}:
            ch.fix(vec.get(src), f"its channel count shapes another tensor ({node.name})")
    for name in raw_linear & set(ch.recs):
        ch.fix(ch.recs[name].inp + ch.recs[name].out, f"{name} also applied to the last dim of a >2-D tensor")
    out_meta = next(n for n in reversed(nodes) if n.op == "output").meta.get("tensor_meta")
    return ch, _groups(ch), output_shapes(out_meta)


def _groups(ch: Channels) -> List[ChannelGroup]:
    """Channel spaces that share a coupled channel form one group; units are its coupled sets."""
    parent: Dict[int, int] = {}

    def gfind(r):
        while parent.setdefault(r, r) != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for _, els in ch.spaces:
        roots = [gfind(ch.find(e)) for e in els]
        for r in roots[1:]:
            parent[gfind(r)] = gfind(roots[0])
    groups: Dict[int, ChannelGroup] = {}
    seen: Set[int] = set()
    for owner, els in ch.spaces:
        for e in els:
            r = ch.find(e)
            g = groups.setdefault(gfind(r), ChannelGroup())
            if r not in seen:
                seen.add(r)
                g.units.append(r)
            if owner and owner not in g.members:
                g.members.append(owner)
    for rec in ch.recs.values():
        for e in rec.out if rec.kind in ("dw", "bn") else ():
            g = groups[gfind(ch.find(e))]
            if rec.name not in g.members:
                g.members.append(rec.name)
        for e in rec.inp or ():
            g = groups[gfind(ch.find(e))]
            if rec.name not in g.consumers:
                g.consumers.append(rec.name)
    for rec in ch.recs.values():  # a LayerNorm over the channels renormalises the kept ones
        if rec.kind == "ln" or rec.kind == "param" and isinstance(rec.module, nn.LayerNorm):
            g = groups[gfind(ch.find(rec.out[0]))]
            name = rec.name if rec.kind == "ln" else rec.name.rpartition(".")[0]
            if name not in g.renormalised:
                g.renormalised.append(name)
    for e, reason in ch.fixed.items():
        g = groups[gfind(ch.find(e))]
        g.reason = g.reason or reason
    return [g for g in groups.values() if g.members]

