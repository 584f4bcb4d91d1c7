"""pysparse.models.corpus: the offline sentences the fidelity checks and the recovery benchmarks use.
The later-paragraph sentences (recovery text) never repeat a first-paragraph one (evaluation text)."""
from __future__ import annotations

import pytest

from pysparse.models.corpus import stdlib_sentences


def test_first_and_later_paragraphs_are_disjoint_prose():
    first, rest = stdlib_sentences(100000), stdlib_sentences(100000, paragraphs="rest")
    assert len(first) > 1000 and len(rest) > 1000
    assert not set(first) & set(rest)
    assert len(set(rest)) == len(rest)
    assert all(40 <= len(s) <= 200 and s[0].isupper() and s[-1] in ".!?" for s in rest)


def test_bad_paragraphs_value():
    with pytest.raises(ValueError, match="paragraphs must be 'first' or 'rest'"):
        stdlib_sentences(10, paragraphs="all")
