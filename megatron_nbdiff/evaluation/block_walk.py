"""The block walk: the passes block decoding makes over a sequence that is already known, so that
it can be scored the way block decoding sees it (docs/method.md, "Decoding").

Held-out block-diffusion losses (:mod:`megatron_nbdiff.evaluation.metrics`) and the lm-eval
adapter's Monte-Carlo block bound both walk a span block by block: each block with a masked
position is denoised against the cache of everything before it (bidirectionally inside the block,
the cache not extended), then the clean block is committed causally into the cache, exactly as
:func:`megatron_nbdiff.inference.decode.block_decode` does when it generates.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch


def walk_blocks(runner, clean: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor, block_size: int,
                context: Optional[Sequence[Sequence[int]]] = None) -> Iterator[tuple]:
    """Yield ``(s, e, first_logit, denoise_logits)`` for the blocks ``[s, e)`` of a span.

    ``clean`` and ``noisy`` (``[R, n]``) are the span and its noised copy, ``masked`` its mask
    flags. With ``context`` (token ids per row) the runner first prefills it; without, the span
    starts the sequence and its first block is denoised with full attention over itself.
    ``first_logit`` (``[R, V]``) is the logit that predicts token ``s`` (None for the first block
    without context); ``denoise_logits`` (``[R, e - s - 1, V]``) are the noisy-block logits at
    ``s .. e-2`` that predict tokens ``s+1 .. e-1``, or None when nothing in the block is masked
    (no pass is made). After each block but the last the clean block is committed."""
    R, n = clean.shape
    last = runner.prefill([list(c) for c in context]) if context is not None else None
    for s in range(0, n, block_size):
        e = min(n, s + block_size)
        logits = None
        if e - s > 1 and bool(masked[:, s:e].any()):
            if last is None and s == 0:
                ones = torch.ones(R, e, dtype=torch.bool, device=clean.device)
                logits = runner.full(noisy[:, :e], ones)[:, :-1]
            else:
                logits = runner.denoise(noisy[:, s:e])[:, :-1]
        yield s, e, last, logits
        if e < n:
            if last is None and s == 0:
                last = runner.prefill(clean[:, :e].tolist())
            else:
                last = runner.commit(clean[:, s:e])[:, -1]
