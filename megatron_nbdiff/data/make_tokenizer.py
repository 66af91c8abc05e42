"""Train a small byte-level BPE tokenizer (Hugging Face ``tokenizers``) and save it as a
``PreTrainedTokenizerFast`` directory: for tests and the CPU quickstart, where no tokenizer can be
downloaded."""
from __future__ import annotations

import os
from typing import Iterable

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str, split_digits: bool = False) -> str:
    """``split_digits``: every digit is its own pre-token, so numbers are never merged into
    multi-digit tokens (as in the Llama tokenizers); arithmetic then has to be learnt digit by
    digit instead of as a lookup table over number tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
