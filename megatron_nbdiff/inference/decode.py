"""Decoding algorithms written once against :class:`~megatron_nbdiff.inference.runner.ModelRunner`
(``docs/method.md``, "Decoding").

Block decoding: prefill; each block starts as ``[first, m, ..., m]`` where ``first`` came from the
previous causal pass; denoising passes commit the most confident masked token plus every masked
token whose confidence reaches ``threshold`` (optionally inside left-to-right sub-blocks); a full
block is committed causally, which extends the cache and gives the next block's first token.
With ``block_size=1`` this is exactly greedy AR decoding (``mode="ar"`` runs that path).

Full-sequence decoding (single-stream models): the answer span (between a prompt and an optional
suffix) starts fully masked and is unmasked in ``steps`` bidirectional passes, the most confident
positions first; prefix and suffix are never changed.

Shift convention: the logit at position ``i`` predicts token ``i + 1``. The mask token is never
produced.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import torch

from .runner import DecodingError, ModelRunner

MODES = ("block", "full", "ar")
CONFIDENCES = ("prob", "margin", "entropy")


@dataclasses.dataclass
class DecodeOptions:
    """Options with the CLI's names (see ``tools/generate.py``)."""

    mode: str = "block"
    block_size: Optional[int] = None
    """Block size (default: the one the checkpoint was trained for)."""
    threshold: float = 0.9
    """Commit every masked token whose confidence is at least this, in (0, 1]."""
    sub_blocks: int = 1
    """Split each block into this many sub-blocks filled left to right."""
    confidence: str = "prob"
    """``prob`` (probability of the chosen token), ``margin`` (top-1 minus top-2 probability) or
    ``entropy`` (``exp(-H)``, 1 for a certain prediction)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    steps: Optional[int] = None
    """Full-sequence mode: denoising passes (default: one token per pass)."""
    suffix: Optional[Sequence[int]] = None
    """Full-sequence mode: ids after the span to fill (infilling)."""
    seed: int = 0
    stop_at_eos: bool = True
    stop_token_ids: Sequence[int] = ()
    """Ids that end a row like EOS does (with ``stop_at_eos``), e.g. a chat template's end-of-turn
    token (:mod:`megatron_nbdiff.inference.chat`); the output keeps the stop token."""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DecodingError(f"mode must be one of {MODES}, found {self.mode!r}")
        if not (0.0 < float(self.threshold) <= 1.0):
            raise DecodingError(f"threshold must lie in (0, 1], found {self.threshold}")
        if self.confidence not in CONFIDENCES:
            raise DecodingError(f"confidence must be one of {CONFIDENCES}, found {self.confidence!r}")
        if self.max_new_tokens < 1:
            raise DecodingError(f"max_new_tokens must be >= 1, found {self.max_new_tokens}")
        if self.block_size is not None and self.block_size < 1:
            raise DecodingError(f"block_size must be >= 1, found {self.block_size}")
        if self.sub_blocks < 1:
            raise DecodingError(f"sub_blocks must be >= 1, found {self.sub_blocks}")
        if self.temperature < 0:
            raise DecodingError(f"temperature must be >= 0, found {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise DecodingError(f"top_p must lie in (0, 1], found {self.top_p}")
        if self.steps is not None and self.steps < 1:
            raise DecodingError(f"steps must be >= 1, found {self.steps}")
        if self.suffix is not None and self.mode != "full":
            raise DecodingError("suffix (infilling) needs mode 'full'")
        if any(isinstance(t, bool) or not hasattr(t, "__index__") or int(t) < 0 for t in self.stop_token_ids):
            raise DecodingError(f"stop_token_ids must be non-negative token ids, found {list(self.stop_token_ids)}")


@dataclasses.dataclass
class RowStats:
    forward_passes: int = 0
    denoise_passes: int = 0
    commit_passes: int = 0


@dataclasses.dataclass
class Decoded:
    """One row's result: generated ids and its statistics."""

    token_ids: list
    stats: dict


def choose(logits: torch.Tensor, opts: DecodeOptions, mask_token_id: Optional[int],
           generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and confidences for logits ``[..., V]`` (greedy or temperature / top-p)."""
    if opts.temperature > 0:
        logits = logits.float() / opts.temperature  # a new tensor
    else:
        logits = logits.float().clone()
    if mask_token_id is not None:
        logits[..., mask_token_id] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if opts.temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        if opts.top_p < 1.0:
            sorted_p, order = flat.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < opts.top_p  # the smallest set reaching top_p
            sorted_p = sorted_p * keep
            filtered = torch.zeros_like(flat).scatter(-1, order, sorted_p)
        else:
            filtered = flat
        tokens = torch.multinomial(filtered, 1, generator=generator).reshape(probs.shape[:-1])
    else:
        tokens = probs.argmax(-1)
    if opts.confidence == "prob":
        conf = probs.gather(-1, tokens[..., None])[..., 0]
    elif opts.confidence == "margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    else:
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        conf = torch.exp(-ent)
    return tokens, conf


def _generator(opts: DecodeOptions, device) -> Optional[torch.Generator]:
    if opts.temperature <= 0:
        return None
    return torch.Generator(device=device).manual_seed(opts.seed)


def _stop_ids(runner: ModelRunner, opts: DecodeOptions) -> tuple:
    """EOS ids of the model and the caller's extra stop ids."""
    return tuple(runner.info.eos_token_ids) + tuple(int(t) for t in opts.stop_token_ids)


def _truncate(ids: list, eos: tuple, stop: bool) -> tuple[list, bool]:
    if stop:
        for i, t in enumerate(ids):
            if t in eos:
                return ids[: i + 1], True
    return ids, False


def block_decode(runner: ModelRunner, prompts: Sequence[Sequence[int]], opts: DecodeOptions,
                 block_size: int) -> list[Decoded]:
    """Block decoding with KV cache and threshold commits (module docstring)."""
    mask_id = runner.info.mask_token_id
    if block_size > 1 and mask_id is None:
        raise DecodingError(f"{runner.info.source}: no mask token id, so block sizes > 1 cannot decode")
    if opts.sub_blocks > block_size:
        raise DecodingError(f"sub_blocks {opts.sub_blocks} exceeds the block size {block_size}")
    eos = _stop_ids(runner, opts)
    gen = _generator(opts, runner.device)
    t0 = time.perf_counter()
    logits = runner.prefill(prompts)
    b = logits.shape[0]
    stats = [RowStats(forward_passes=1) for _ in range(b)]
    first, _ = choose(logits, opts, mask_id, gen)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    produced = 0
    while produced < opts.max_new_tokens and not all(done):
        n = min(block_size, opts.max_new_tokens - produced)
        block = torch.full((b, n), mask_id if mask_id is not None else 0, dtype=torch.long, device=runner.device)
        block[:, 0] = first
        filled = torch.zeros(b, n, dtype=torch.bool, device=runner.device)
        filled[:, 0] = True
        # sub-block of every position (position 0 is filled already)
        sub = (torch.arange(n, device=runner.device) * opts.sub_blocks) // max(n, 1)
        while not bool(filled.all()):
            work = (~filled.all(1)).tolist()  # one host sync per pass
            lg = runner.denoise(block)
            for i in range(b):
                if work[i] and not done[i]:
                    stats[i].forward_passes += 1
                    stats[i].denoise_passes += 1
            tok, conf = choose(lg[:, :-1], opts, mask_id, gen)  # logit j-1 predicts position j
            open_ = ~filled[:, 1:]
            # current sub-block: the first one of each row that still has masked positions
            big = opts.sub_blocks + 1
            current = torch.where(open_, sub[1:][None].expand(b, -1), torch.full_like(open_, big, dtype=torch.long))
            current = current.min(1, keepdim=True).values
            cand = open_ & (sub[1:][None] == current)
            conf = torch.where(cand, conf, torch.full_like(conf, -1.0))
            commit = cand & (conf >= opts.threshold)
            # the most confident candidate of every row that has one (no host sync)
            best = torch.zeros_like(commit).scatter_(1, conf.argmax(1, keepdim=True), True)
            commit |= best & cand.any(1, keepdim=True)
            block[:, 1:] = torch.where(commit, tok, block[:, 1:])
            filled[:, 1:] |= commit
        produced += n
        rows = block.tolist()
        for i in range(b):
            if not done[i]:
                out[i].extend(rows[i])
                out[i], done[i] = _truncate(out[i], eos, opts.stop_at_eos)
        if produced >= opts.max_new_tokens or all(done):
            break
        lg = runner.commit(block)
        for i in range(b):
            if not done[i]:
                stats[i].forward_passes += 1
                stats[i].commit_passes += 1
        first, _ = choose(lg[:, -1], opts, mask_id, gen)
    return _results(out, stats, time.perf_counter() - t0)


def full_decode(runner: ModelRunner, prompts: Sequence[Sequence[int]], opts: DecodeOptions) -> list[Decoded]:
    """Full-sequence iterative unmasking over ``max_new_tokens`` positions, optional suffix."""
    mask_id = runner.info.mask_token_id
    if mask_id is None:
        raise DecodingError(f"{runner.info.source}: no mask token id, so full-sequence decoding cannot run")
    if any(len(p) == 0 for p in prompts):
        raise DecodingError("an empty prompt: full-sequence decoding needs at least one prompt token")
    suffix = list(opts.suffix or [])
    N = opts.max_new_tokens
    steps = opts.steps or N
    gen = _generator(opts, runner.device)
    t0 = time.perf_counter()
    b = len(prompts)
    P = max(len(p) for p in prompts)
    S = P + N + len(suffix)
    ids = torch.full((b, S), mask_id, dtype=torch.long)
    valid = torch.zeros(b, S, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, P - len(p):] = True
    if suffix:
        ids[:, P + N:] = torch.as_tensor(suffix, dtype=torch.long)
    ids, valid = ids.to(runner.device), valid.to(runner.device)
    masked = torch.zeros(b, S, dtype=torch.bool, device=runner.device)
    masked[:, P:P + N] = True
    stats = [RowStats() for _ in range(b)]
    for step in range(steps):
        remaining = int(masked[0].sum())
        if remaining == 0:
            break
        k = math.ceil(remaining / (steps - step))
        lg = runner.full(ids, valid)
        for s in stats:
            s.forward_passes += 1
            s.denoise_passes += 1
        tok, conf = choose(lg[:, P - 1:P + N - 1], opts, mask_id, gen)  # logit j-1 predicts j
        span_masked = masked[:, P:P + N]
        conf = torch.where(span_masked, conf, torch.full_like(conf, -1.0))
        top = conf.topk(k, dim=1).indices
        commit = torch.zeros_like(span_masked)
        commit.scatter_(1, top, True)
        commit &= span_masked
        ids[:, P:P + N] = torch.where(commit, tok, ids[:, P:P + N])
        masked[:, P:P + N] &= ~commit
    eos = _stop_ids(runner, opts)
    out = []
    for i in range(b):
        span = ids[i, P:P + N].tolist()
        out.append(_truncate(span, eos, opts.stop_at_eos and not suffix)[0])
    return _results(out, stats, time.perf_counter() - t0)


def _results(out: list, stats: list, seconds: float) -> list[Decoded]:
    total = sum(len(o) for o in out)
    results = []
    for ids, s in zip(out, stats):
        results.append(Decoded(ids, dict(
            tokens=len(ids),
            forward_passes=s.forward_passes,
            denoise_passes=s.denoise_passes,
            commit_passes=s.commit_passes,
            tokens_per_forward=len(ids) / max(s.forward_passes, 1),
            seconds=seconds,
            tokens_per_s=total / seconds if seconds > 0 else float("inf"),
            batch_tokens=total,
        )))
    return results
