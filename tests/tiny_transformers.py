"""Small transformers in the three layouts structured pruning recognises (pysparse's BERT layer,
Hugging Face BERT, LLaMA with grouped-query attention), their inputs and calibration batches:
shared by the surgery tests (test_structured.py) and the sparsify tests (test_sparsify.py)."""
from __future__ import annotations

import pytest
import torch

from pysparse.models.minilm import MiniLM
from conftest import gen


def minilm(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, layer_norm_eps=1e-12, vocab_size=100, max_position_embeddings=64, type_vocab_size=2,
               num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128)
    return MiniLM(cfg).eval()


def hf_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                   intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaModel(cfg).eval()


def ids(seed=1, b=3, L=9):
    return torch.randint(1, 100, (b, L), generator=gen(seed))


def run(model, x):
    if isinstance(model, MiniLM):
        return model.hidden_states(x, torch.ones_like(x))
    return model(input_ids=x).last_hidden_state


def calib_batches(model, n=4):
    xs = [ids(10 + i) for i in range(n)]
    return [lambda m, x=x: run(m, x) for x in xs], xs
