"""An offline English text corpus for fidelity checks: sentences from the docstrings of the Python
standard library installed next to the running interpreter (read from its source files with
``ast``; nothing is imported, downloaded or shipped). The same Python version gives the same list.
"""
from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path
from typing import List

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__",
              "ensurepip", "pydoc_data", "encodings"}
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]][.!?])\s+(?=[A-Z])")


def _docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _good(s: str) -> bool:
    if not 40 <= len(s) <= 200 or not s[0].isupper() or s[-1] not in ".!?":
        return False
    if any(c in s for c in "{}[]<>=|\\`$@#~") or "__" in s or "::" in s or "http" in s:
        return False  # code, markup and links, not prose
    words = s.split()
    return len(words) >= 6 and sum(w.isalpha() for w in words) >= 0.6 * len(words)


def stdlib_sentences(limit: int = 1500, *, paragraphs: str = "first") -> List[str]:
    """Up to ``limit`` distinct prose sentences (6+ words, 40-200 characters) from the first
    paragraphs of stdlib docstrings, in a fixed order (files sorted by path; every k-th sentence
    so that all of the library is represented). ``paragraphs="rest"``: from the paragraphs after
    the first instead, leaving out any sentence a first paragraph also has (so the two lists are
    disjoint: training text beside evaluation text drawn from "first")."""
    if paragraphs not in ("first", "rest"):
        raise ValueError(f"stdlib_sentences: paragraphs must be 'first' or 'rest', got {paragraphs!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, out, firsts = set(), [], set()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for doc in _docstrings(tree):
            first, _, rest = doc.partition("\n\n")
            first = " ".join(first.split())
            if paragraphs == "rest":
                firsts.update(_SENTENCE_END.split(first))
            text = first if paragraphs == "first" else " ".join(rest.split())
            for s in _SENTENCE_END.split(text):
                if _good(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    out = [s for s in out if s not in firsts]
    if not out:
        raise RuntimeError(f"pysparse: no docstring sentences found under {root} (is the standard library's source installed?)")
    step = max(1, len(out) // limit)
    return out[::step][:limit]
