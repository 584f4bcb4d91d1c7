"""Reference models, implemented in plain PyTorch and loaded offline from pip-installable data."""
from .minilm import MiniLM, WordPieceTokenizer, encode, load_minilm

__all__ = ["MiniLM", "WordPieceTokenizer", "encode", "load_minilm"]
