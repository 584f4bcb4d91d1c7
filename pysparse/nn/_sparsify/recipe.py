"""The recipe: which rule applies to which module, what kind of rule it is, which criterion it
names; and the progress line the stages print while they walk it."""
from __future__ import annotations

import fnmatch
import sys
import warnings
from typing import Callable, Dict, Optional, Sequence, Union

import torch

STRUCT_KEYS = {"heads", "neurons", "drop", "reconstruct"}  # "scope" and "criterion" belong to both kinds
WEIGHT_KEYS = {"format", "sparsity", "n", "m", "blocksize", "kernel", "min_speedup"}
Calibration = Union[Callable[[torch.nn.Module], object], Sequence[Callable[[torch.nn.Module], object]]]
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


def rule_for(name: str, recipe: Dict[str, Optional[dict]], of_kind: str) -> Optional[dict]:
    """The last matching rule of this kind (a matching None clears it)."""
    rule = None
    for pattern, r in recipe.items():
        if fnmatch.fnmatchcase(name, pattern) and (r is None or kind(r) == of_kind):
            rule = r
    return rule


def criterion_of(rule: dict) -> str:
    """The rule's criterion under its current name (default "magnitude")."""
    crit = rule.get("criterion", "magnitude")
    return DEPRECATED_CRITERIA.get(crit, crit) if isinstance(crit, str) else crit


def check(recipe: Dict[str, Optional[dict]]) -> None:
    """Every rule is a dict or None of one kind; a deprecated criterion name warns (once per name)."""
    old = set()
    for pattern, rule in recipe.items():
        if rule is not None and not isinstance(rule, dict):
            raise ValueError(f"sparsify: the rule for {pattern!r} must be a dict or None, got {type(rule).__name__}")
        kind(rule)
        crit = None if rule is None else rule.get("criterion")
        if isinstance(crit, str) and crit in DEPRECATED_CRITERIA:
            old.add(crit)
    for name in sorted(old):
        # stacklevel: this function, sparsify, torch.no_grad's wrapper, the caller
        warnings.warn(f"sparsify: criterion {name!r} is deprecated, use {DEPRECATED_CRITERIA[name]!r}: the same "
                      f"formula, squared first-order Taylor terms summed over the calibration data (Fisher form); "
                      f"{name!r} will be removed", DeprecationWarning, stacklevel=4)


def progress(items: list, desc: str, enabled: bool):
    """Yield `items`, with a "desc: i/n" line on stderr when enabled."""
    for i, item in enumerate(items):
        if enabled:
            sys.stderr.write(f"\r{desc}: {i + 1}/{len(items)}")
            sys.stderr.flush()
        yield item
    if enabled and items:
        sys.stderr.write("\n")
