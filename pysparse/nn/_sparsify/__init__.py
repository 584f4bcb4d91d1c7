"""``sparsify(model, recipe, calibration=None)``: prune a model and swap in sparse layers, keeping a
layer dense wherever no sparse kernel is faster on this machine.

A recipe maps module patterns to a rule, or to None to leave the matching modules alone. A pattern
is a glob of qualified module names (fnmatch: ``*`` matches across dots), ``re:<regex>`` (the
whole name), or ``type:<Class>`` (modules of that class or a subclass: ``type:Linear``,
``type:Conv1D``; a bare class name that names no module reads the same, as llmcompressor's
``targets``)::

    {"layers.*": {"heads": 0.25, "neurons": 0.4, "criterion": "activation", "reconstruct": True},
     "*.ffn_*": {"format": "nm", "n": 2, "m": 4, "criterion": "wanda"},
     "layers.5": {"drop": True},
     "layers.0.*": None}

Structured rules (on attention / feed-forward modules, see ``pysparse.prune.structured``):
``heads`` (fraction of attention heads, or key/value groups, removed), ``neurons`` (fraction of FFN
intermediate neurons removed), ``drop`` (the module becomes a passthrough), ``criterion``
("magnitude": L2 norm of the unit's weights | "activation": the unit's squared output contribution
on the calibration inputs | "fisher": (sum_{c in unit} x_c dL/dx_c)^2 summed over calibration
tokens, x the output projection's input | "entropy": mean attention entropy, heads only),
``scope`` ("local" | "global": rank units across every module the rule matches), ``reconstruct``
(refit the output projection by least squares so the pruned block reproduces the dense block's
output on the calibration inputs).
Weight rules (on nn.Linear, nn.Conv2d, a conv's weight pruned as its (Cout, Cin*kh*kw) matrix
and swapped for ``SparseConv2d``, and Hugging Face's Conv1D, GPT-2's layers, swapped as the
nn.Linear each equals): ``format`` ("csr" | "bsr" | "nm" | "N:M" such as "2:4"),
``sparsity`` (required for csr and bsr; not for nm), ``n``/``m``,
``blocksize``, ``criterion`` ("magnitude": |W| | "wanda": |W| * ||x|| | "fisher": (w dL/dw)^2 summed
over calibration batches | "sparsegpt": ``pysparse.prune.sparsegpt`` with the Hessian of the
layer's inputs, recorded on the model as pruned so far (one calibration pass per layer, in model
order; layers reading the very same input, such as q/k/v, share one, and a pass ends once its
layers have run), which also updates the kept weights; nn.Linear only), ``scope`` ("local" | "global": csr only, one threshold over every
linear the rule matches), ``allocation`` ("uniform": every layer at the rule's sparsity |
"sensitivity": layers whose pruning changes the output more keep more: each is pruned alone on a
grid over sparsity +- ``spread`` (default 0.08) on the first calibration batch, then the cheapest
output change per pruned weight is taken until the rule's sparsity holds over its layers by size |
"owl": outlier-weighted layerwise sparsity over blocks (the layers under one numbered module):
blocks whose |W| * ||x|| scores hold more outliers, scores above ``owl_m`` (default 5) times
their mean, keep more, within sparsity +- ``spread``; both csr and bsr, with calibration), ``kernel`` ("auto" | "sparse" |
"dense"), ``min_speedup`` (default 1.0).
"fisher" is the squared (Fisher) form of the first-order Taylor estimate of the loss change; its
old name "taylor" is still accepted, with a DeprecationWarning.
A recipe can also be the path of a .json or .yaml file holding one (YAML with PyYAML installed).
The recipe is validated before any work: an unknown key, a value of the wrong kind, a rule that
would do nothing (csr without a sparsity, a sparsity with nm) or a pattern that matches no module
raises a ValueError naming the pattern and the key.
For each module, the last matching pattern wins among the rules that apply to it (weight rules
for linears; for heads, the rules that set ``heads``; for neurons, those that set ``neurons``).
By default the first and last nn.Linear / nn.Conv2d of the model are skipped (the most
sensitive; ``skip_ends=False`` prunes them too).

Calibration is one batch of representative inputs or an iterable of batches (a list, a
DataLoader). A batch is a callable ``f(model)`` that runs the model, a tensor (``model(x)``), a
tuple of positional arguments (``model(*batch)``) or a dict of keyword arguments (``model(**batch)``:
a tokenizer's output as it is). A list of tensors that looks like one batch's ids and attention
mask is refused (it would run as two batches). Criteria "activation", "entropy", "wanda" and
``reconstruct`` record activations through hooks; "fisher" needs ``f`` to return a scalar loss,
which is back-propagated.
For a model without labels, a random projection of the output (``(model(x) * r).sum()`` with a
fresh Gaussian ``r``) makes the Fisher scores the expected squared first-order output change.

The stages live in this package: ``recipe`` (which rule applies where), ``calibration`` (hooks,
activation statistics, Fisher scores), ``structured`` (heads, neurons, dropped layers) and
``weights`` (csr / bsr / nm and the timed kernel choice, through ``pysparse.nn.kernel_choice``).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from . import recipe as _recipe
from .recipe import Calibration
from ..fast_act import swap_gelu_tanh
from .report import SparsifyReport
from .structured import apply_structure
from .weights import apply_weights

__all__ = ["sparsify", "Calibration", "SparsifyReport"]


@torch.no_grad()
def sparsify(model: torch.nn.Module, recipe: Union[Dict[str, Optional[dict]], str, os.PathLike],
             calibration: Optional[Calibration] = None,
             *, skip_ends: bool = True, time_layers: bool = True, shapes: Optional[Sequence[int]] = None,
             cache: bool = True, progress: Optional[bool] = None, ignore: Optional[Sequence[str]] = None,
             filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
             fast_activations: bool = True) -> SparsifyReport:
    """Prune ``model`` per ``recipe`` and swap its nn.Linear layers for the fastest kernel, in place;
    returns the report: a list with one dict per changed module, its ``skipped`` {module: why}
    (layers a weight rule matched but left alone) and ``table()`` (text, with totals).

    Structured pruning (heads, neurons, layers) runs first, then weight pruning. Each pruned linear
    is timed (``time_layers``) as its stored format, as CSR and as the dense pruned layer, at the
    token counts in ``shapes`` (default: the calibration shape, else 1 token); the fastest that
    beats dense by ``min_speedup`` at every shape is kept, else the layer stays a dense (pruned)
    nn.Linear: a swapped layer is never slower than dense at the shapes it was tuned for. Timings
    are cached on disk (see ``pysparse.nn.kernel_choice``; ``cache=False`` re-times). ``progress``: a
    tqdm bar (default: on a terminal or in a Jupyter kernel).
    ``ignore``: patterns (as the recipe's) of modules to leave alone whatever rule matches them;
    ``filter_fn(module, name)``: False leaves that module alone (torchao's convention). Modules
    either one leaves alone that a rule would have changed are in ``report.skipped``, with why.
    ``fast_activations``: every tanh-form GELU module (Hugging Face's ``NewGELUActivation``, GPT-2's
    "gelu_new", seven tensor ops; ``FastGELUActivation``, ``GELUTanh``; torch's
    ``nn.GELU(approximate="tanh")``) becomes ``pysparse.nn.FastGELUTanh``, pysparse's one-pass
    kernel (torch's tanh-form GELU was 19% of a sparsified GPT-2's time at 8 x 128 tokens; the
    function is the same, within eps |x|); ``save_sparse`` records them, ``load_sparse`` /
    ``load_pretrained`` redo it; False keeps them.
    Report rows: name, kind ("heads" | "neurons" | "drop" | "linear" | "conv"), shape before/after
    and, for linears and convs, format, sparsity, kernel kept, times in us per candidate at each
    shape (convs: at their calibration input; untimed without calibration), speedup.
    """
    if progress is None:
        progress = _recipe.show_progress_by_default()
    recipe = _recipe.check(recipe, model, ignore=ignore, filter_fn=filter_fn)
    report = SparsifyReport()
    rules = {k: v for k, v in recipe.items() if not isinstance(k, _recipe.Excluded)}
    for key in recipe:
        if isinstance(key, _recipe.Excluded):
            for name in sorted(key.names):
                if any(_recipe.rule_for(name, rules, kind) is not None for kind in ("weight", "struct")):
                    report.skipped.setdefault(name, key.why)
    if any(_recipe.kind(r) == "struct" for r in recipe.values()):
        apply_structure(model, recipe, calibration, progress, report)
    if any(_recipe.kind(r) == "weight" for r in recipe.values()):
        apply_weights(model, recipe, calibration, skip_ends=skip_ends, time_layers=time_layers, shapes=shapes,
                      cache=cache, show_progress=progress, report=report)
    if fast_activations:
        _fast_activations(model, report)
    return report


def _fast_activations(model: torch.nn.Module, report: SparsifyReport) -> None:
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    for name in swap_gelu_tanh(model):
        report.append({"name": name, "kind": "activation", "shape": before[name], "after": "FastGELUTanh"})
