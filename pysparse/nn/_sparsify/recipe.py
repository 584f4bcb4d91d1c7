"""The recipe: which rule applies to which module, what kind of rule it is, which criterion it
names; and the progress line the stages print while they walk it."""
from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from ...formats import FORMATS

STRUCT_KEYS = {"heads", "neurons", "drop", "reconstruct"}  # "scope" and "criterion" belong to both kinds
WEIGHT_KEYS = {"format", "sparsity", "n", "m", "blocksize", "kernel", "min_speedup", "allocation", "spread", "owl_m"}
# One batch (a callable f(model), a tensor, a tuple of positional arguments, a dict of keyword
# arguments) or an iterable of batches (a list, a DataLoader): calibration.calls says how each runs.
Calibration = Union[Callable[[torch.nn.Module], object], torch.Tensor, tuple, Mapping, Iterable]
# Old criterion spellings that name the same formula as the new one: accepted, with a warning.
DEPRECATED_CRITERIA = {"taylor": "fisher"}


def kind(rule: Optional[dict]) -> Optional[str]:
    """The rule's kind: "struct" (heads / neurons / drop), "weight" (csr / bsr / nm), or None for a
    None rule; a rule that mixes the two kinds is a ValueError."""
    if rule is None:
        return None
    keys = set(rule)
    if keys & STRUCT_KEYS and keys & WEIGHT_KEYS:
        raise ValueError(f"sparsify: a rule mixes structured keys {sorted(keys & STRUCT_KEYS)} with weight keys "
                         f"{sorted(keys & WEIGHT_KEYS)}; give them separate patterns")
    return "struct" if keys & STRUCT_KEYS else "weight"


class Resolved(str):
    """A recipe key whose modules were found in the model when the recipe was checked (a
    ``type:`` pattern or a bare class name; the ``ignore`` list and ``filter_fn``, as Excluded):
    it matches exactly those names. Still the str the user wrote, for messages."""
    names: frozenset = frozenset()

    def __new__(cls, text: str, names):
        key = super().__new__(cls, text)
        key.names = frozenset(names)
        return key


class Excluded(Resolved):
    """The modules ``ignore`` or ``filter_fn`` leave alone (a None rule that comes last), and why."""
    why: str = ""


def matches(pattern: str, name: str) -> bool:
    """Whether a recipe pattern takes the module called `name`: ``re:<regex>`` (the whole name),
    a Resolved key (its names), else a glob (fnmatch: ``*`` matches across dots)."""
    if isinstance(pattern, Resolved):
        return name in pattern.names
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def rule_for(name: str, recipe: Dict[str, Optional[dict]], of_kind: str) -> Optional[dict]:
    """The last matching rule of this kind (a matching None clears it)."""
    rule = None
    for pattern, r in recipe.items():
        if matches(pattern, name) and (r is None or kind(r) == of_kind):
            rule = r
    return rule


def _type_names(model: torch.nn.Module, cls: str):
    """Names of the modules whose class, or a base class, is called `cls`."""
    return [n for n, m in model.named_modules() if n and any(c.__name__ == cls for c in type(m).__mro__)]


def _resolve(pattern, model: Optional[torch.nn.Module], what: str) -> str:
    """The pattern as rule_for reads it: ``type:<Class>`` (and a bare class name that names no
    module) resolved against the model; ValueError naming the pattern for one that is not a str,
    a regex that does not compile, or a pattern matching no module of the model."""
    if not isinstance(pattern, str):
        raise ValueError(f"sparsify: {what} must be strings (module names: glob, 're:<regex>' or 'type:<Class>'), "
                         f"got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"sparsify: the pattern {pattern!r} is not a valid regular expression ({e})") from None
    if pattern.startswith("type:") and model is None:
        raise ValueError(f"sparsify: the pattern {pattern!r} names a module type: it needs the model")
    if model is None:
        return pattern
    names = [n for n, _ in model.named_modules()]
    if pattern.startswith("type:"):
        found = _type_names(model, pattern[5:])
        if not found:
            kinds = sorted({type(m).__name__ for _, m in model.named_modules()})
            raise ValueError(f"sparsify: the pattern {pattern!r} matches no module of the model (its module types: "
                             f"{kinds[:12]})")
        return Resolved(pattern, found)
    if any(matches(pattern, n) for n in names):
        return pattern
    typed = _type_names(model, pattern) if re.fullmatch(r"[A-Za-z_]\w*", pattern) else []
    if typed:  # a class name, as llmcompressor's targets
        return Resolved(pattern, typed)
    raise ValueError(f"sparsify: the pattern {pattern!r} matches no module of the model (names look like "
                     f"{[n for n in names if n][:3]}; '*' matches across dots; 're:<regex>' and 'type:<Class>' "
                     f"are the other forms)")


def criterion_of(rule: dict) -> str:
    """The rule's criterion under its current name (default "magnitude")."""
    crit = rule.get("criterion", "magnitude")
    return DEPRECATED_CRITERIA.get(crit, crit) if isinstance(crit, str) else crit


KEYS = STRUCT_KEYS | WEIGHT_KEYS | {"scope", "criterion", "index_dtype"}


def _fraction(pattern: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"sparsify: the rule for {pattern!r}: {key!r} must be a fraction in [0, 1), got {value!r}")


def _allocation(pattern: str, rule: dict, fmt: str) -> None:
    """ValueError for an allocation the rule cannot use: "owl" and "sensitivity" spread a csr /
    bsr rule's sparsity over its layers, so they need one and cannot be combined with scope
    "global" (which spreads it by one threshold); spread (both) and owl_m (owl) only go with them."""
    alloc = rule.get("allocation", "uniform")
    if alloc not in ("uniform", "owl", "sensitivity"):
        raise ValueError(f"sparsify: the rule for {pattern!r}: 'allocation' must be 'uniform', 'owl' or 'sensitivity', "
                         f"got {alloc!r}")
    extra = sorted(k for k in ("spread", "owl_m") if k in rule and not (alloc == "owl" or (alloc == "sensitivity"
                                                                                          and k == "spread")))
    if extra:
        raise ValueError(f"sparsify: the rule for {pattern!r}: {extra} do not apply to allocation {alloc!r}")
    if alloc == "uniform":
        return
    if fmt == "nm":
        raise ValueError(f"sparsify: the rule for {pattern!r}: allocation {alloc!r} spreads a sparsity over the layers; "
                         f"format 'nm' has a fixed one (n of every m)")
    if rule.get("scope") == "global":
        raise ValueError(f"sparsify: the rule for {pattern!r}: allocation {alloc!r} and scope 'global' both set each "
                         f"layer's sparsity; choose one")
    spread, m = rule.get("spread", 0.08), rule.get("owl_m", 5.0)
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0.0 < spread <= 0.5:
        raise ValueError(f"sparsify: the rule for {pattern!r}: 'spread' (how far the layers' sparsities may move from "
                         f"the target) must be in (0, 0.5], got {spread!r}")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
        raise ValueError(f"sparsify: the rule for {pattern!r}: 'owl_m' (an outlier's score, in multiples of its "
                         f"layer's mean) must be > 0, got {m!r}")


def _normalized(pattern: str, rule: dict) -> dict:
    """The rule with "N:M" formats spelled out; ValueError naming the pattern and the key for an
    unknown key, a value of the wrong kind, or a combination that would do nothing."""
    unknown = sorted(set(rule) - KEYS, key=str)
    if unknown:
        near = [difflib.get_close_matches(str(k), sorted(KEYS), n=1) for k in unknown]
        hint = "; ".join(f"{k!r}: did you mean {n[0]!r}?" for k, n in zip(unknown, near) if n)
        raise ValueError(f"sparsify: the rule for {pattern!r} has unknown key(s) {unknown}" + (f" ({hint})" if hint else "")
                         + f"; the keys are {sorted(KEYS)}")
    rule = dict(rule)
    fmt = rule.get("format")
    nm = re.fullmatch(r"(\d+):(\d+)", fmt) if isinstance(fmt, str) else None
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        for key, value in (("n", n), ("m", m)):
            if key in rule and rule[key] != value:
                raise ValueError(f"sparsify: the rule for {pattern!r} says format {fmt!r} but {key!r} = {rule[key]!r}")
        rule.update(format="nm", n=n, m=m)
    if kind(rule) == "weight":
        fmt = rule.get("format", "csr")
        if fmt not in FORMATS:
            raise ValueError(f"sparsify: the rule for {pattern!r}: 'format' must be one of {list(FORMATS)} or 'N:M' "
                             f"(e.g. '2:4'), got {fmt!r}")
        if fmt == "nm" and "sparsity" in rule:
            raise ValueError(f"sparsify: the rule for {pattern!r}: 'sparsity' does not apply to format 'nm' (it keeps n "
                             f"of every m weights: give 'n' and 'm', or format '2:4')")
        if fmt != "nm" and ("n" in rule or "m" in rule):
            raise ValueError(f"sparsify: the rule for {pattern!r}: 'n' and 'm' apply to format 'nm', not {fmt!r}")
        if fmt != "nm" and "sparsity" not in rule:
            raise ValueError(f"sparsify: the rule for {pattern!r} (format {fmt!r}) needs a 'sparsity' (the fraction of "
                             f"weights{' in blocks' if fmt == 'bsr' else ''} to prune; 0 keeps only the zeros already there)")
        if "sparsity" in rule:
            _fraction(pattern, "sparsity", rule["sparsity"])
        _allocation(pattern, rule, fmt)
        if rule.get("kernel", "auto") not in ("auto", "sparse", "dense"):
            raise ValueError(f"sparsify: the rule for {pattern!r}: 'kernel' must be 'auto', 'sparse' or 'dense', "
                             f"got {rule['kernel']!r}")
    else:
        for key in ("heads", "neurons"):
            if key in rule:
                _fraction(pattern, key, rule[key])
        for key in ("drop", "reconstruct"):
            if key in rule and not isinstance(rule[key], bool):
                raise ValueError(f"sparsify: the rule for {pattern!r}: {key!r} must be True or False, got {rule[key]!r}")
    if rule.get("scope", "local") not in ("local", "global"):
        raise ValueError(f"sparsify: the rule for {pattern!r}: 'scope' must be 'local' or 'global', got {rule['scope']!r}")
    return rule


def load(path) -> object:
    """The recipe in a .json, .yaml or .yml file (YAML needs PyYAML: ``pip install pyyaml``);
    ValueError naming the file for one that is missing or does not parse."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sparsify: the recipe file {str(path)!r} does not exist (a recipe is a dict, or the path of a "
                         f".json / .yaml file holding one)")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"sparsify: reading the YAML recipe {str(path)!r} needs PyYAML (pip install pyyaml); "
                             f"or write it as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"sparsify: the recipe file {str(path)!r} is not valid YAML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"sparsify: the recipe file {str(path)!r} is not valid JSON ({e}); YAML files end in .yaml "
                         f"or .yml") from None


def check(recipe, model: Optional[torch.nn.Module] = None, *, ignore=None,
          filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None) -> Dict[str, Optional[dict]]:
    """The recipe, validated before any work and with "N:M" formats spelled out (format "nm", n,
    m): every pattern a string that matches a module of `model`, every rule a dict or None of one
    kind with known keys and values (ValueError naming the pattern and the key); a deprecated
    criterion name warns (once per name). A str or path is a recipe file (``load``).
    ``ignore`` (patterns) and ``filter_fn(module, name)`` (False: leave it alone) come last as
    Excluded keys with None rules, so they win over every rule."""
    if isinstance(recipe, (str, os.PathLike)):
        recipe = load(recipe)
    if not isinstance(recipe, dict):
        raise ValueError(f"sparsify: the recipe must be a dict of module-name patterns to rules, got "
                         f"{type(recipe).__name__}")
    out, old = {}, set()
    for pattern, rule in recipe.items():
        key = _resolve(pattern, model, "recipe patterns")
        if rule is not None and not isinstance(rule, dict):
            raise ValueError(f"sparsify: the rule for {pattern!r} must be a dict or None, got {type(rule).__name__}")
        out[key] = None if rule is None else _normalized(pattern, rule)
        crit = None if rule is None else rule.get("criterion")
        if isinstance(crit, str) and crit in DEPRECATED_CRITERIA:
            old.add(crit)
    if ignore is not None:
        if isinstance(ignore, str) or not isinstance(ignore, Iterable):
            ignore = [ignore]
        names = set()
        for pattern in ignore:
            key = _resolve(pattern, model, "ignore patterns")
            names |= {n for n, _ in model.named_modules() if n and matches(key, n)} if model is not None else set()
        key = Excluded("<ignore>", names)
        key.why = f"left alone: matches sparsify's ignore={list(ignore)!r}"
        out[key] = None
    if filter_fn is not None:
        if not callable(filter_fn):
            raise ValueError(f"sparsify: filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}")
        names = {n for n, m in model.named_modules() if n and not filter_fn(m, n)} if model is not None else set()
        key = Excluded("<filter_fn>", names)
        key.why = "left alone: filter_fn(module, name) returned False"
        out[key] = None
    for name in sorted(old):
        # stacklevel: this function, sparsify, torch.no_grad's wrapper, the caller
        warnings.warn(f"sparsify: criterion {name!r} is deprecated, use {DEPRECATED_CRITERIA[name]!r}: the same "
                      f"formula, squared first-order Taylor terms summed over the calibration data (Fisher form); "
                      f"{name!r} will be removed", DeprecationWarning, stacklevel=4)
    return out


def progress(items: list, desc: str, enabled: bool):
    """Yield `items`, with a tqdm bar when enabled (a notebook widget under Jupyter), or a
    "desc: i/n" line on stderr where tqdm is missing."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency of the package; a bare checkout may lack it
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=desc, unit="layer")
        return
    for i, item in enumerate(items):
        sys.stderr.write(f"\r{desc}: {i + 1}/{len(items)}")
        sys.stderr.flush()
        yield item
    if items:
        sys.stderr.write("\n")


def show_progress_by_default() -> bool:
    """Progress on a terminal and in a Jupyter kernel (tqdm draws a widget there)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules
