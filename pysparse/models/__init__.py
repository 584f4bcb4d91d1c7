"""Reference models, implemented in plain PyTorch and loaded offline from pip-installable data."""
from .cnn import resnet18, resnet50, vgg
from .minilm import MiniLM, WordPieceTokenizer, encode, load_minilm

__all__ = ["MiniLM", "WordPieceTokenizer", "encode", "load_minilm", "resnet18", "resnet50", "vgg"]
