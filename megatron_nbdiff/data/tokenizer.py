"""Tokenizers: a Hugging Face tokenizer directory or a sentencepiece ``.model`` file, behind one
small interface (encode, decode, vocabulary size, end-of-document id)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..errors import DataError


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded or lacks what the project needs."""


class Tokenizer:
    """Uniform face over HF tokenizers and sentencepiece."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise TokenizerError(f"tokenizer not found: {path} (a HF tokenizer directory or a .model file)")
        if os.path.isfile(path) and path.endswith(".model"):
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=path)
            except Exception as exc:  # noqa: BLE001 - sentencepiece raises bare RuntimeErrors
                raise TokenizerError(f"{path}: not a sentencepiece model ({exc})") from None
            self._hf = None
            self.vocab_size = int(self._sp.get_piece_size())
            eos = int(self._sp.eos_id())
            self.eod_id: Optional[int] = eos if eos >= 0 else None
        elif os.path.isdir(path):
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
                raise TokenizerError(f"{path}: cannot load a Hugging Face tokenizer ({exc})") from None
            self._sp = None
            self.vocab_size = len(self._hf)
            self.eod_id = self._hf.eos_token_id
        else:
            raise TokenizerError(
                f"{path}: expected a Hugging Face tokenizer directory or a sentencepiece .model file"
            )

    @property
    def hf(self):
        """The Hugging Face tokenizer behind this one (chat templates, special tokens, batch
        encoding); None for a sentencepiece model."""
        return self._hf

    @property
    def sentencepiece(self):
        """The sentencepiece processor behind this one; None for a Hugging Face tokenizer."""
        return self._sp

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._hf.decode(list(ids))
