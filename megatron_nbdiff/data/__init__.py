"""Tokenizers and indexed-dataset helpers."""
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError"]
