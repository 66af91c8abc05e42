"""Small helpers shared by the evaluation modules: the error type, atomic file writes, and what a
runner says about its context length and special tokens."""
from __future__ import annotations

import os
from typing import Optional

from ..fileio import atomic_write
from ..inference.runner import DecodingError

SINGLE_STREAM_LAYOUTS = ("single_annealed", "bidirectional")
DEFAULT_MAX_LENGTH = 2048


class EvaluationError(DecodingError):
    """Bad input to evaluation (a subclass of :class:`DecodingError`, so one ``except`` catches
    both); the message names the problem."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """:func:`megatron_nbdiff.fileio.atomic_write`, with a missing output directory reported as
    an :class:`EvaluationError`."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise EvaluationError(f"output directory {directory} does not exist")
    atomic_write(path, data)


def runner_max_length(runner) -> Optional[int]:
    """The longest sequence the runner's model accepts (HF ``max_position_embeddings``, the
    project model's ``max_seq_len``), or None when the model does not say."""
    model = getattr(runner, "model", None)
    mc = getattr(model, "model_config", None)
    if mc is not None and getattr(mc, "max_seq_len", None):
        return int(mc.max_seq_len)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "max_position_embeddings", None):
        return int(cfg.max_position_embeddings)
    return None


def tokenizer_bos_id(tokenizer) -> Optional[int]:
    """Beginning-of-sequence id of a :class:`megatron_nbdiff.data.tokenizer.Tokenizer`, if any."""
    if tokenizer is None:
        return None
    hf = tokenizer.hf
    if hf is not None:
        return hf.bos_token_id
    sp = tokenizer.sentencepiece
    if sp is not None:
        bos = int(sp.bos_id())
        return bos if bos >= 0 else None
    return None


def is_single_stream(runner) -> bool:
    return runner.info.layout in SINGLE_STREAM_LAYOUTS
