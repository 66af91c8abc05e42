"""Context parallelism for block-diffusion attention: each rank holds a slice of every stream's
positions and gathers only the keys and values its layout needs.

Split (megatron's load-balanced one). A stream of ``L`` positions is cut into ``2 * cp`` chunks of
``c = L / (2 cp)`` positions; CP rank ``r`` keeps chunks ``r`` and ``2 cp - 1 - r``
(:func:`local_positions`), so that every rank gets the same share of a causal mask's work. In
dual and complementary layouts every rank holds the *same* positions of every stream
(``[x_t ; x_0]`` becomes ``[x_t[pos] ; x_0[pos]]``), and ``c`` must be a multiple of the block
size, so no block straddles two ranks (:func:`check_split`).

What crosses ranks (:func:`cp_attention`):

* dual and complementary layouts: a noisy query sees its own block (local: the block lies in one
  chunk) and clean keys of earlier blocks, a clean query clean keys before it. So only the clean
  stream's keys and values are all-gathered (``L`` positions); the noisy ones never leave the
  rank. That is half the traffic of a generic CP over ``[x_t ; x_0]`` (a third over
  ``[x_t ; x_t' ; x_0]``);
* single-stream layouts (``causal``, ``bidirectional``, ``single_annealed``): the whole stream.

The gather is an autograd function: forward an all-gather over the CP group (the chunks put back
in position order), backward the sum of every rank's gradient for the gathered keys and values,
scattered back to their owners (a reduce-scatter; on gloo, which has none, an all-reduce and a
slice). The mask is the layout's predicate (:func:`masks.allowed`) evaluated on global stream
indices: local queries ``s L + pos`` against keys ``s L + pos`` (local streams) and ``s L + j``
(gathered stream, ``j = 0..L-1``), with document ids ``[b, L]`` of the whole sequence (every rank
reads the whole sample before slicing it, so they need not travel). Both backends: ``dense``
(SDPA with the boolean mask) and ``flex`` (FlexAttention, whose ``mask_mod`` looks the global
indices up).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .masks import BLOCK_LAYOUTS, MaskSpec, allowed


def local_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions of one stream that CP rank ``rank`` of ``cp`` holds, in the order it holds them:
    chunk ``rank`` then chunk ``2 cp - 1 - rank`` of ``2 cp`` equal chunks."""
    c = seq_len // (2 * cp)
    ar = torch.arange(c, device=device)
    return torch.cat([rank * c + ar, (2 * cp - 1 - rank) * c + ar])


def check_split(seq_len: int, cp: int, block_size: int = 1) -> None:
    """Refuse a stream length that ``cp`` cannot split into ``2 cp`` chunks of whole blocks
    (``block_size``: the largest block size a run uses, for a curriculum its maximum)."""
    if cp < 1:
        raise ValueError(f"context-parallel size must be >= 1, found {cp}")
    if cp == 1:
        return
    if seq_len % (2 * cp) != 0:
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 x cp = {2 * cp} "
                         "(megatron's load-balanced split into 2 x cp chunks)")
    chunk = seq_len // (2 * cp)
    if chunk % block_size != 0:
        raise ValueError(f"with cp = {cp} a chunk holds {chunk} positions (L / 2cp), not a multiple of the block "
                         f"size {block_size}: a block would straddle two ranks; choose L a multiple of "
                         f"{2 * cp * block_size}")


def _rank_order(cp: int) -> list[int]:
    """Chunk indices in the order an all-gather returns them (rank 0's two chunks first...)."""
    return [i for r in range(cp) for i in (r, 2 * cp - 1 - r)]


class _GatherStream(torch.autograd.Function):
    """All-gather ``x [b, h, L/cp, d]`` (this rank's two chunks) into ``[b, h, L, d]`` in position
    order; backward: the gradients summed over ranks, each rank keeping its own chunks."""

    @staticmethod
    def forward(ctx, x, group):
        cp = dist.get_world_size(group)
        ctx.group, ctx.cp = group, cp
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        chunks = [c for p in parts for c in p.chunk(2, dim=2)]  # rank order
        order = _rank_order(cp)
        by_position = [None] * (2 * cp)
        for chunk, index in zip(chunks, order):
            by_position[index] = chunk
        return torch.cat(by_position, dim=2)

    @staticmethod
    def backward(ctx, grad):
        cp, group = ctx.cp, ctx.group
        chunks = grad.contiguous().chunk(2 * cp, dim=2)  # position order
        mine = [torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim=2) for r in range(cp)]
        if dist.get_backend(group) == "nccl":
            out = torch.empty_like(mine[0])
            dist.reduce_scatter(out, mine, group=group)
        else:  # gloo has no reduce-scatter: sum everything, keep this rank's part
            full = torch.stack(mine)
            dist.all_reduce(full, group=group)
            out = full[dist.get_rank(group)]
        return out, None


def gather_stream(x: torch.Tensor, group) -> torch.Tensor:
    """``[b, h, L/cp, d]`` per rank -> ``[b, h, L, d]`` in position order (differentiable)."""
    return _GatherStream.apply(x, group)


def cp_indices(spec: MaskSpec, cp: int, rank: int, device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Global stream indices of this rank's queries and of the keys it attends over, and how
    many of its local streams' positions come before the gathered one (see module docstring).
    Block layouts: keys = the local noisy view(s) then the whole clean stream; other layouts:
    the whole stream."""
    L = spec.seq_len
    pos = local_positions(L, cp, rank, device)
    streams = spec.streams
    queries = torch.cat([s * L + pos for s in range(streams)])
    if spec.layout in BLOCK_LAYOUTS:
        clean = streams - 1
        keys = torch.cat([s * L + pos for s in range(clean)] + [clean * L + torch.arange(L, device=device)])
        return queries, keys, clean * pos.numel()
    return queries, torch.arange(L, device=device), 0


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, group,
                 doc_ids: Optional[torch.Tensor] = None, backend: str = "dense",
                 scale: Optional[float] = None) -> torch.Tensor:
    """Attention of this CP rank's ``q [b, hq, S/cp, d]`` under ``spec`` (global ``L``), keys and
    values ``[b, hkv, S/cp, d]`` of its positions; returns ``[b, hq, S/cp, d]``."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    local = spec.seq_len // cp
    if q.shape[2] != spec.streams * local:
        raise ValueError(f"context-parallel attention: {q.shape[2]} local positions, expected "
                         f"{spec.streams} stream(s) x L/cp = {spec.streams} x {local}")
    qi, ki, kept = cp_indices(spec, cp, rank, q.device)
    gathered_from = kept  # the stream whose keys and values are gathered starts here locally
    k_full = torch.cat([k[:, :, :kept], gather_stream(k[:, :, gathered_from:], group)], dim=2)
    v_full = torch.cat([v[:, :, :kept], gather_stream(v[:, :, gathered_from:], group)], dim=2)
    if backend == "dense":
        if doc_ids is None:
            zero = torch.zeros((), dtype=torch.long, device=q.device)
            mask = allowed(spec, zero, qi[:, None], ki[None, :])[None, None]
        else:
            b = torch.arange(doc_ids.shape[0], device=q.device)[:, None, None]
            mask = allowed(spec, b, qi[None, :, None], ki[None, None, :], doc_ids=doc_ids)[:, None]
        return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=scale, enable_gqa=True)
    if backend != "flex":
        raise ValueError(f"unknown attention backend {backend!r}")
    from torch.nn.attention.flex_attention import create_block_mask

    from .core_attention import _flex

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(spec, b, qi[q_idx], ki[kv_idx], doc_ids)

    bsz = doc_ids.shape[0] if doc_ids is not None else None
    block_mask = create_block_mask(mask_mod, bsz, None, qi.numel(), ki.numel(), device=q.device)
    return _flex(q, k_full, v_full, block_mask, scale)
