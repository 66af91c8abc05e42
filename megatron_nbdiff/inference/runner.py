"""The model-runner interface the decoding algorithms are written against.

A runner wraps one model (an exported HF checkpoint or the project's Megatron model) and holds the
state of one batch being decoded: the token history, which positions are padding, and (with
``use_cache``) the model's key/value cache. Four operations:

``prefill(prompts)``  run the prompts causally, keep their KV; return each row's last logit.
``denoise(block)``    run a block bidirectionally against the cache (every cached key and every
                      key of the block visible); the cache is NOT extended. Logits ``[b, n, V]``.
``commit(block)``     run the block causally against the cache and append its KV. Logits ``[b, n, V]``.
``full(ids, valid)``  one bidirectional forward over whole sequences, no cache (full-sequence
                      decoding of single-stream models).

Batches of prompts of different lengths are left-padded: padding keys are masked out of every
attention row and position ids count only real tokens, so each row computes what it would
compute alone. A pad query attends to itself only (a row with no visible key would turn into NaN
and spread through the values). Masks are boolean ``[b, 1, queries, keys]``, True = may attend.

Without ``use_cache`` a runner recomputes the whole history at every call (the reference the
KV-cached path is tested against); the masks are the same.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..errors import NBDiffError


class DecodingError(NBDiffError):
    """Bad input to decoding: the message names the problem."""


@dataclasses.dataclass
class RunnerInfo:
    """What a checkpoint says about decoding it (from ``nbdiff.json``, when it has one)."""

    vocab_size: int
    mask_token_id: Optional[int]
    eos_token_ids: tuple
    block_size: Optional[int]
    """Block size the weights were trained for; None without ``nbdiff.json``."""
    layout: Optional[str]
    """Attention layout of training (``dual_context_causal``, ``single_annealed``, ``causal``...)."""
    has_metadata: bool
    source: str
    max_length: Optional[int] = None
    """Most positions (prompt, suffix and generated tokens) one row may use: the model's
    ``max_seq_len`` / ``max_position_embeddings``; None when unknown."""


def attention_mask(key_valid: torch.Tensor, q_start: int, block_start: Optional[int]) -> torch.Tensor:
    """Boolean ``[b, 1, K - q_start, K]`` mask for queries at positions ``q_start..K-1``.

    Keys ``k <= q`` are visible (causal); queries at or after ``block_start`` (a block being
    denoised) see every key up to ``K``. Padding keys are hidden; every query sees itself.
    """
    b, K = key_valid.shape
    dev = key_valid.device
    q = torch.arange(q_start, K, device=dev)[:, None]
    k = torch.arange(K, device=dev)[None, :]
    visible = k <= q
    if block_start is not None:
        visible = visible | (q >= block_start)
    allowed = visible[None] & key_valid[:, None, :]
    allowed = allowed | (k == q)[None]
    return allowed[:, None]


class ModelRunner:
    """Base class: batch state and masks; subclasses implement :meth:`_forward`."""

    def __init__(self, info: RunnerInfo, device: torch.device, use_cache: bool = True, tokenizer=None):
        self.info = info
        self.device = torch.device(device)
        self.use_cache = use_cache
        self.tokenizer = tokenizer
        self._ids: Optional[torch.Tensor] = None  # [b, past] history (padding included)
        self._valid: Optional[torch.Tensor] = None  # [b, past] real tokens
        self._next_pos: Optional[torch.Tensor] = None  # [b] position id of the next token
        self._mask_key = None  # (past, n, block, padded) of the cached mask
        self._mask: Optional[torch.Tensor] = None

    # -- subclass hooks ---------------------------------------------------------------------------
    def _reset_cache(self) -> None:
        raise NotImplementedError

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 past: int, cached: bool, append: bool) -> torch.Tensor:
        """Logits ``[b, n, V]`` (float32, real vocabulary) of ``ids [b, n]``. With ``cached`` the
        model's cache holds ``past`` positions and ``ids`` are the new ones (``append``: keep their
        KV); otherwise ``ids`` is the whole sequence and no cache is used."""
        raise NotImplementedError

    # -- the interface ----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return 0 if self._ids is None else self._ids.shape[0]

    @property
    def past_length(self) -> int:
        return 0 if self._ids is None else self._ids.shape[1]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start a batch: left-pad ``prompts``, run them causally; last logits ``[b, V]``."""
        if len(prompts) == 0:
            raise DecodingError("no prompts to decode")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise DecodingError("an empty prompt: block decoding needs at least one prompt token")
        P = max(lengths)
        ids = torch.zeros(len(prompts), P, dtype=torch.long)
        valid = torch.zeros(len(prompts), P, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            valid[i, P - len(p):] = True
        self._check_ids(ids[valid])
        self._ids = ids[:, :0].to(self.device)
        self._valid = valid[:, :0].to(self.device)
        self._next_pos = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        self._mask_key = None
        self._reset_cache()
        return self._run(ids.to(self.device), valid.to(self.device), block=False, append=True)[:, -1]

    def denoise(self, block: torch.Tensor) -> torch.Tensor:
        """Logits of ``block [b, n]`` run bidirectionally against the cache; cache unchanged."""
        return self._run(block, None, block=True, append=False)

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        """Logits of ``block [b, n]`` run causally; its KV joins the cache."""
        return self._run(block, None, block=False, append=True)

    def full(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Bidirectional logits ``[b, n, V]`` of whole sequences (``valid`` marks real tokens)."""
        ids, valid = ids.to(self.device), valid.to(self.device)
        self._check_ids(ids[valid])
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = attention_mask(valid, 0, 0)
        return self._forward(ids, pos, mask, past=0, cached=False, append=False)

    # -- internals --------------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size):
            raise DecodingError(
                f"token ids must lie in [0, {self.info.vocab_size}), found {int(ids.min())}..{int(ids.max())}"
            )

    def _run(self, new_ids: torch.Tensor, new_valid: Optional[torch.Tensor], block: bool,
             append: bool) -> torch.Tensor:
        if self._ids is None:
            raise DecodingError("call prefill() before denoise() or commit()")
        new_ids = new_ids.to(self.device)
        b, n = new_ids.shape
        if b != self.batch_size:
            raise DecodingError(f"block has {b} rows, the batch has {self.batch_size}")
        new_valid_given = new_valid is not None
        if new_valid is None:
            new_valid = torch.ones(b, n, dtype=torch.bool, device=self.device)
        past = self.past_length
        key_valid = torch.cat([self._valid, new_valid], 1)
        new_pos = self._next_pos[:, None] + (new_valid.long().cumsum(1) - 1).clamp(min=0)
        block_start = past if block else None
        if self.use_cache:
            # the denoising passes of a block share one mask: build it once per (past, n, kind)
            key = (past, n, block, new_valid_given)
            if self._mask_key != key:
                self._mask_key, self._mask = key, attention_mask(key_valid, past, block_start)
            mask = self._mask
            logits = self._forward(new_ids, new_pos, mask, past=past, cached=True, append=append)
        else:
            all_ids = torch.cat([self._ids, new_ids], 1)
            hist_pos = (self._valid.long().cumsum(1) - 1).clamp(min=0)
            all_pos = torch.cat([hist_pos, new_pos], 1)
            mask = attention_mask(key_valid, 0, block_start)
            logits = self._forward(all_ids, all_pos, mask, past=0, cached=False, append=False)[:, past:]
        if append:
            self._ids = torch.cat([self._ids, new_ids], 1)
            self._valid = key_valid
            self._next_pos = self._next_pos + new_valid.long().sum(1)
        return logits
