"""Tokenizer files and the mask token (``docs/method.md``, "Mask token").

The mask token is chosen at conversion in one of three ways:

``append``  a new token (``<|mask|>`` unless told otherwise) added to the tokenizer. Its id is the
            next id the tokenizer assigns, ``len(tokenizer)``. When that equals the embedding's
            row count (the usual case) a new row is appended to the embedding and the output
            layer; when the embedding already has rows the tokenizer never produces (Qwen-style
            padding), the token takes the first of them. Either way its embedding and output rows
            are set to the mean of the rows of the tokens the tokenizer knows. Without tokenizer
            files the new row is appended and the token has no string.
``ID``      reuse an id the tokenizer does not map to any token (refused otherwise); rows as-is.
``TOKEN``   reuse a token string of the tokenizer's vocabulary (for example a reserved special
            token); rows as-is.
``none``    no mask token (an AR checkpoint for evaluation or a round trip).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

from .errors import ConversionError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)
EXTRA_FILES = ("generation_config.json",)
DEFAULT_MASK_STRING = "<|mask|>"


def tokenizer_files(directory: str) -> list[str]:
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]


def load_tokenizer(directory: str):
    """The HF tokenizer of ``directory`` (no remote code), or None without tokenizer files."""
    if not tokenizer_files(directory):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConversionError(f"cannot load the tokenizer in {directory}: {e}") from None


@dataclasses.dataclass
class MaskPlan:
    id: int
    token: Optional[str]
    method: str
    new_row: bool
    """An embedding/output row is appended for the token."""
    init_rows: Optional[int]
    """Rows ``[0, init_rows)`` are averaged into the token's rows (None: rows kept as they are)."""

    def as_json(self) -> dict:
        init = (f"mean of embedding and output rows [0, {self.init_rows})"
                if self.init_rows is not None else "existing rows kept")
        return {"id": self.id, "token": self.token, "method": self.method, "init": init}


def resolve_mask(spec: str, tokenizer, hf_rows: int, mask_string: str = DEFAULT_MASK_STRING,
                 notes: Optional[list[str]] = None) -> Optional[MaskPlan]:
    """Turn ``--mask-token`` into a plan (see module docstring); None for ``none``."""
    notes = notes if notes is not None else []
    spec = (spec or "").strip()
    if not spec:
        raise ConversionError("--mask-token is empty; use append, an id, a token string or none")
    if spec == "none":
        return None
    n_tok = len(tokenizer) if tokenizer is not None else None
    if n_tok is not None and n_tok > hf_rows:
        raise ConversionError(
            f"the tokenizer knows {n_tok} tokens but the embedding has only {hf_rows} rows"
        )
    if spec == "append":
        if tokenizer is None:
            notes.append("no tokenizer files: the appended mask token has an id but no string")
            return MaskPlan(hf_rows, None, "append", True, hf_rows)
        if mask_string in tokenizer.get_vocab():
            raise ConversionError(
                f"the tokenizer already has a token {mask_string!r}; reuse it with "
                f"--mask-token {mask_string!r} or choose another --mask-token-string"
            )
        if n_tok < hf_rows:
            notes.append(
                f"the tokenizer knows {n_tok} of the embedding's {hf_rows} rows; the appended mask "
                f"token took the first unused row {n_tok} (no row was added)"
            )
        return MaskPlan(n_tok, mask_string, "append", n_tok == hf_rows, n_tok)
    if spec.isdigit():
        mid = int(spec)
        if mid >= hf_rows:
            raise ConversionError(
                f"mask token id {mid} is outside the embedding's {hf_rows} rows; use "
                "--mask-token append to add a row"
            )
        if tokenizer is None:
            notes.append(f"no tokenizer files: mask token id {mid} could not be checked for use")
            return MaskPlan(mid, None, "id", False, None)
        if mid < n_tok:
            token = tokenizer.convert_ids_to_tokens(mid)
            if token is not None:
                raise ConversionError(
                    f"mask token id {mid} is already used by the token {token!r}; choose an id "
                    f"the tokenizer does not use (it uses 0..{n_tok - 1}), use append, or name the "
                    f"token itself (--mask-token {token!r}) to reuse it deliberately"
                )
        return MaskPlan(mid, None, "id", False, None)
    if tokenizer is None:
        raise ConversionError(
            f"--mask-token {spec!r} names a token, but the checkpoint has no tokenizer files"
        )
    vocab = tokenizer.get_vocab()
    if spec not in vocab:
        raise ConversionError(
            f"mask token {spec!r} is not in the tokenizer's vocabulary (use append to add it)"
        )
    mid = vocab[spec]
    if mid >= hf_rows:
        raise ConversionError(f"token {spec!r} has id {mid}, outside the embedding's {hf_rows} rows")
    return MaskPlan(mid, spec, "token", False, None)


def write_tokenizer(src_dir: str, dst_dir: str, tokenizer, plan: Optional[MaskPlan]) -> list[str]:
    """Copy the tokenizer (and generation config) into ``dst_dir``; when a mask token was
    appended, save the tokenizer with it added instead. Returns the tokenizer files written."""
    for name in EXTRA_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    if tokenizer is None:
        return []
    if plan is not None and plan.method == "append":
        tokenizer.add_special_tokens({"mask_token": plan.token})
        got = tokenizer.convert_tokens_to_ids(plan.token)
        if got != plan.id:
            raise ConversionError(
                f"the tokenizer gave the mask token id {got}, expected {plan.id}; use --mask-token ID"
            )
        tokenizer.save_pretrained(dst_dir)
        return tokenizer_files(dst_dir)
    for name in tokenizer_files(src_dir):
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return tokenizer_files(dst_dir)
