"""Small transformers: pysparse's BERT, Hugging Face BERT and LLaMA with grouped-query attention,
their inputs and calibration batches (shared by test_structured.py and test_sparsify.py), and
`ARCHITECTURES`: every Hugging Face architecture issue 21 names, built from its config at tiny
sizes, each with a function running it on fixed inputs (test_architectures.py)."""
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


# ---- every architecture sparsify must handle, from transformers configs (random weights) ----

_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
             max_position_embeddings=64)
_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
               patch_size=8)
_SEQ2SEQ = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100)


def _pixels(seed=1):
    return torch.randn(2, 3, 32, 32, generator=gen(seed))


def _text(m):
    return m(input_ids=ids(b=2)).last_hidden_state


def _seq2seq(m):
    return m(input_ids=ids(b=2), decoder_input_ids=ids(seed=2, b=2, L=5)).last_hidden_state


def _vision(m):
    return m(pixel_values=_pixels()).last_hidden_state


def _audio(m):
    return m(input_features=torch.randn(2, 16, 32, generator=gen(3))).last_hidden_state


def _build(T, name):
    c = {
        "bert": lambda: T.BertModel(T.BertConfig(**_TEXT)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                                   vocab_size=100, max_position_embeddings=64)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**_TEXT)),
        "albert": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=32, **_TEXT)),
        "electra": lambda: T.ElectraModel(T.ElectraConfig(embedding_size=32, **_TEXT)),
        "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100,
                                                 n_positions=64, bos_token_id=1, eos_token_id=2)),
        "gpt_neox": lambda: T.GPTNeoXModel(T.GPTNeoXConfig(**_TEXT)),
        "opt": lambda: T.OPTModel(T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                              vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=64)),
        "llama": lambda: T.LlamaModel(T.LlamaConfig(num_key_value_heads=2, **_TEXT)),
        "mistral": lambda: T.MistralModel(T.MistralConfig(num_key_value_heads=2, **_TEXT)),
        "qwen2": lambda: T.Qwen2Model(T.Qwen2Config(num_key_value_heads=2, **_TEXT)),
        "qwen3": lambda: T.Qwen3Model(T.Qwen3Config(num_key_value_heads=2, head_dim=16, **_TEXT)),
        "phi3": lambda: T.Phi3Model(T.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, **_TEXT)),
        "gemma2": lambda: T.Gemma2Model(T.Gemma2Config(num_key_value_heads=2, head_dim=16, **_TEXT)),
        "t5": lambda: T.T5Model(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100)),
        "t5_gated": lambda: T.T5Model(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100,
                                                 feed_forward_proj="gated-gelu")),
        "bart": lambda: T.BartModel(T.BartConfig(max_position_embeddings=64, **_SEQ2SEQ)),
        "vit": lambda: T.ViTModel(T.ViTConfig(**_VISION)),
        "deit": lambda: T.DeiTModel(T.DeiTConfig(**_VISION)),
        "swin": lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                                 num_heads=[2, 4], window_size=4)),
        "clip_text": lambda: T.CLIPTextModel(T.CLIPTextConfig(bos_token_id=1, eos_token_id=2, **_TEXT)),
        "clip_vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**_VISION)),
        "whisper_encoder": lambda: T.WhisperModel(T.WhisperConfig(num_mel_bins=16, max_source_positions=16,
                                                                  pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                                  decoder_start_token_id=1, **_SEQ2SEQ)).get_encoder(),
        "mixtral": lambda: T.MixtralModel(T.MixtralConfig(num_key_value_heads=2, num_local_experts=4,
                                                          num_experts_per_tok=2, **_TEXT)),
    }[name]
    return c()


_RUNNERS = {"t5": _seq2seq, "t5_gated": _seq2seq, "bart": _seq2seq, "vit": _vision, "deit": _vision, "swin": _vision,
            "clip_vision": _vision, "whisper_encoder": _audio}
ARCHITECTURES = ["bert", "distilbert", "roberta", "albert", "electra", "gpt2", "gpt_neox", "opt", "llama", "mistral",
                 "qwen2", "qwen3", "phi3", "gemma2", "t5", "t5_gated", "bart", "vit", "deit", "swin", "clip_text",
                 "clip_vision", "whisper_encoder", "mixtral"]


def architecture(name: str, seed: int = 0):
    """(model in eval mode, run(model) -> its last hidden state) for one of ARCHITECTURES."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)  # tiny vocabularies: token-id warnings
    return _build(transformers, name).eval(), _RUNNERS.get(name, _text)
