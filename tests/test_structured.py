"""Structured-pruning surgery on modules (pysparse.prune.structured): removing heads and neurons
from pysparse's BERT layer, Hugging Face BERT and LLaMA with grouped-query attention equals zeroing
their contribution (the other architectures: test_architectures.py). sparsify's structured stage
is in test_sparsify.py."""
from __future__ import annotations

import copy

import pytest
import torch

from pysparse import prune
from tiny_transformers import hf_bert, ids, llama, minilm, run


def attn_modules(model):
    return [(n, m) for n, m in model.named_modules() if prune.attention_parts(m) is not None]


def ffn_modules(model):
    return [(n, m) for n, m in model.named_modules() if prune.ffn_parts(m) is not None]


@pytest.mark.parametrize("make", [minilm, hf_bert, llama])
def test_pruning_heads_equals_zeroing_their_output_columns(make):
    model, x = make(), ids()
    zeroed = copy.deepcopy(model)
    for (name, mod), (_, zmod) in zip(attn_modules(model), attn_modules(zeroed)):
        p = prune.attention_parts(mod)
        keep = [u for u in range(p.units) if u % 2 == 0]
        with torch.no_grad():  # the dropped units' columns of O, i.e. their contribution
            zp = prune.attention_parts(zmod)
            for u in range(p.units):
                if u not in keep:
                    zp.o.weight[:, u * p.unit_width:(u + 1) * p.unit_width] = 0
        prune.shrink_attention(mod, keep)
        q = prune.attention_parts(mod)
        assert q.units == len(keep) and q.heads == p.heads // 2 and q.o.in_features == p.o.in_features // 2
    torch.testing.assert_close(run(model, x), run(zeroed, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [minilm, hf_bert, llama])
def test_pruning_neurons_equals_zeroing_their_down_columns(make):
    model, x = make(), ids()
    zeroed = copy.deepcopy(model)
    for (name, mod), (_, zmod) in zip(ffn_modules(model), ffn_modules(zeroed)):
        p = prune.ffn_parts(mod)
        keep = torch.arange(0, p.down.in_features, 3)
        drop = torch.ones(p.down.in_features, dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():
            prune.ffn_parts(zmod).down.weight[:, drop] = 0
        prune.shrink_ffn(mod, keep)
        assert prune.ffn_parts(mod).down.in_features == keep.numel()
    torch.testing.assert_close(run(model, x), run(zeroed, x), rtol=1e-5, atol=1e-5)


def test_old_surgery_names_still_work_and_warn():
    a, b = minilm(), minilm()
    with pytest.warns(DeprecationWarning, match=r"prune_heads is deprecated, use pysparse\.prune\.shrink_attention"):
        prune.prune_heads(a.layers[0], [0, 2])
    with pytest.warns(DeprecationWarning, match=r"prune_neurons is deprecated, use pysparse\.prune\.shrink_ffn"):
        prune.prune_neurons(a.layers[1], torch.arange(0, 128, 2))
    prune.shrink_attention(b.layers[0], [0, 2])
    prune.shrink_ffn(b.layers[1], torch.arange(0, 128, 2))
    x = ids()
    assert torch.equal(run(a, x), run(b, x))
