"""Attention layouts as predicates: the single source of truth for every mask backend.

A layout is a rule ``allowed(q, k)`` (True = query ``q`` may attend to key ``k``) written with
tensor operations only, so that one function serves three consumers:

* the dense boolean tensor (CPU reference, SDPA), by broadcasting index grids through it;
* FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``, which calls it on scalar index tensors
  inside the compiled kernel;
* tests, which compare both against the layout table of docs/method.md.

Layouts (docs/method.md, "Attention layouts"; ``L`` = tokens per stream, ``B`` = block size,
``blk(i) = i // B``):

``causal``               ``k <= q`` over ``L`` tokens (plain AR).
``bidirectional``        every pair over ``L`` tokens.
``dual_context_causal``  NBDiff, over ``[x_t ; x_0]`` (``2L`` tokens): noisy q -> noisy k iff
                         same block; noisy q -> clean k iff ``blk(k) < blk(q)``; clean q -> noisy
                         k never; clean q -> clean k iff ``k <= q`` (token-causal).
``dual_block_causal``    the BD3-LM ablation: as above but clean q -> clean k iff
                         ``blk(k) <= blk(q)``.
``single_annealed``      DiffuLLaMA attention-mask annealing over ``L`` tokens: causal edges are
                         always open; a future edge ``k > q`` is open iff a hash of
                         (seed, step, q, k) falls below ``step / K``; from step ``K`` on every
                         edge is open. No dense per-step tensor is needed: the hash is evaluated
                         inside the mask function.
``prefix_block``         inference (block decoding without a cache): the first ``L - B`` positions
                         are causal, the last ``B`` (the active block) see the whole prefix and each
                         other. ``L`` need not be a multiple of ``B``.

Training-only layouts (:data:`COMPLEMENTARY_LAYOUTS`; never recorded in a checkpoint, whose weights
are the dual layout's): complementary masks over ``[x_t ; x_t' ; x_0]`` (``3L`` tokens), two noisy
views and one shared clean stream (docs/method.md, "Instruction tuning"):

``complementary_context_causal``  each noisy view as the noisy stream of ``dual_context_causal``
                         (its own block bidirectionally, clean keys of earlier blocks), never the
                         other view; clean q -> clean k iff ``k <= q``. Each view's rows equal
                         those of a ``[x_t ; x_0]`` forward, so one ``3L`` pass equals two ``2L``.
``complementary_block_causal``    the same with block-causal clean -> clean edges.

With packed documents (``doc_ids``, shape ``[b, L]``, one id per position of a stream), every edge
additionally requires ``doc(q) == doc(k)`` (positions compared within the stream).

Megatron-core's convention is the opposite (True = masked out); :func:`megatron_mask` converts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

LAYOUTS = (
    "causal",
    "bidirectional",
    "dual_context_causal",
    "dual_block_causal",
    "single_annealed",
    "prefix_block",
)
DUAL_LAYOUTS = ("dual_context_causal", "dual_block_causal")
COMPLEMENTARY_LAYOUTS = ("complementary_context_causal", "complementary_block_causal")
"""Training-only: two noisy views and one clean stream (``3L``); not in :data:`LAYOUTS`, the
layouts a checkpoint can record and decoding can run."""
COMPLEMENTARY_OF = dict(zip(DUAL_LAYOUTS, COMPLEMENTARY_LAYOUTS))
"""The complementary (``3L``) form of each dual layout."""
BLOCK_LAYOUTS = DUAL_LAYOUTS + COMPLEMENTARY_LAYOUTS
"""Layouts whose streams are cut into whole blocks of ``B`` (``B`` must divide ``L``)."""

# Annealing hash: 32-bit mixing in int64 arithmetic (every product stays below 2**63), the top
# 24 bits compared with an integer threshold round(step / K * 2**24).
_M32 = 0xFFFFFFFF
_ANNEAL_BITS = 24
ANNEAL_FULL = 1 << _ANNEAL_BITS  # threshold at which every annealed edge is open


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS and layout not in COMPLEMENTARY_LAYOUTS:
        raise ValueError(f"unknown attention layout {layout!r}; expected one of "
                         f"{', '.join(LAYOUTS + COMPLEMENTARY_LAYOUTS)}")
    return layout


def is_dual(layout: str) -> bool:
    return check_layout(layout) in DUAL_LAYOUTS


def num_streams(layout: str) -> int:
    """Streams of ``L`` positions a layout attends over: 3 (complementary), 2 (dual) or 1."""
    check_layout(layout)
    return 3 if layout in COMPLEMENTARY_LAYOUTS else 2 if layout in DUAL_LAYOUTS else 1


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Everything a layout's predicate depends on, except per-sample document ids.

    Hashable, so backends cache what they derive from it (dense tensors, BlockMasks).
    """

    layout: str
    """One of :data:`LAYOUTS` or :data:`COMPLEMENTARY_LAYOUTS`."""
    seq_len: int
    """Tokens per stream ``L``. Dual layouts attend over ``2L`` positions, complementary ``3L``."""
    block_size: int = 1
    """Diffusion block size ``B``; must divide ``seq_len`` for dual and complementary layouts."""
    anneal_step: int = 0
    """Current training step ``s`` for ``single_annealed``."""
    anneal_steps: int = 0
    """Annealing length ``K`` for ``single_annealed``; 0 means fully bidirectional at once."""
    anneal_seed: int = 0
    """Seed of the annealing hash, so that different runs may draw different edges."""

    def __post_init__(self):
        check_layout(self.layout)
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ValueError(f"seq_len must be a positive int, found {self.seq_len!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, found {self.block_size!r}")
        if self.layout == "prefix_block" and self.block_size > self.seq_len:
            raise ValueError(
                f"active block of {self.block_size} tokens is longer than the sequence ({self.seq_len})"
            )
        if self.layout in BLOCK_LAYOUTS and self.seq_len % self.block_size != 0:
            raise ValueError(
                f"sequence length {self.seq_len} is not divisible by block size {self.block_size} "
                f"(layout {self.layout!r} needs whole blocks)"
            )
        if self.anneal_steps < 0 or self.anneal_step < 0:
            raise ValueError(
                f"anneal_step and anneal_steps must be >= 0, found {self.anneal_step}, {self.anneal_steps}"
            )

    @property
    def streams(self) -> int:
        """Streams of ``seq_len`` positions: 3 (complementary), 2 (dual) or 1."""
        return num_streams(self.layout)

    @property
    def total_len(self) -> int:
        """Number of attention positions: ``3L`` complementary, ``2L`` dual, ``L`` otherwise."""
        return self.streams * self.seq_len

    @property
    def anneal_threshold(self) -> int:
        """Integer threshold on the 24-bit edge hash; ``2**24`` opens every edge."""
        full = 1 << _ANNEAL_BITS
        if self.anneal_steps == 0 or self.anneal_step >= self.anneal_steps:
            return full
        return int(round(self.anneal_step / self.anneal_steps * full))


def anneal_salt(step: int, seed: int) -> int:
    """The (step, seed) part of the annealing hash, a 32-bit integer."""
    return (step * 0x27D4EB2F + seed * 0x165667B1 + 0x3C6EF372) & _M32


def anneal_hash(step: int, seed: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """24-bit hash of (seed, step, q, k) as an int64 tensor; pure tensor ops (FlexAttention-safe)."""
    return salted_anneal_hash(anneal_salt(step, seed), q, k)


def salted_anneal_hash(salt, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`anneal_hash` from a precomputed salt (an int or an int64 tensor: a tensor keeps a
    compiled FlexAttention kernel valid across training steps)."""
    q = q.to(torch.int64)
    k = k.to(torch.int64)
    h = (q * 0x9E3779B1 + k * 0x85EBCA77 + salt) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _M32
    h = h ^ (h >> 12)
    h = (h * 0x297A2D39) & _M32
    h = h ^ (h >> 15)
    return h >> (32 - _ANNEAL_BITS)


def allowed(
    spec: MaskSpec,
    b: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    doc_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The predicate: True where query position ``q`` may attend to key position ``k``.

    ``b``, ``q`` and ``k`` are broadcastable integer tensors (batch row, query and key index in
    ``[0, spec.total_len)``). ``doc_ids`` is ``[batch, L]`` or None. Only tensor operations are
    used, so this runs unchanged inside a FlexAttention ``mask_mod``.
    """
    layout = spec.layout
    L, B = spec.seq_len, spec.block_size
    if layout in BLOCK_LAYOUTS:
        # stream index: noisy views 0 (and 1 for complementary layouts), clean the last one
        clean = spec.streams - 1
        sq, sk = q // L, k // L
        pq, pk = q - sq * L, k - sk * L
        q_noisy, k_noisy = sq < clean, sk < clean
        bq = pq // B
        bk = pk // B
        noisy_row = torch.where(k_noisy, (sq == sk) & (bq == bk), bk < bq)
        if layout in ("dual_context_causal", "complementary_context_causal"):
            clean_clean = pk <= pq
        else:
            clean_clean = bk <= bq
        clean_row = (~k_noisy) & clean_clean
        ok = torch.where(q_noisy, noisy_row, clean_row)
    else:
        pq, pk = q, k
        if layout == "causal":
            ok = k <= q
        elif layout == "bidirectional":
            ok = (k >= 0) & (q >= 0)
        elif layout == "prefix_block":
            start = L - B
            ok = (k <= q) | ((q >= start) & (k >= start))
        else:  # single_annealed
            thr = spec.anneal_threshold
            if thr >= (1 << _ANNEAL_BITS):
                ok = (k >= 0) & (q >= 0)
            else:
                ok = (k <= q) | (anneal_hash(spec.anneal_step, spec.anneal_seed, q, k) < thr)
    if doc_ids is not None:
        ok = ok & (doc_ids[b, pq] == doc_ids[b, pk])
    return ok


def _check_doc_ids(spec: MaskSpec, doc_ids: Optional[torch.Tensor]) -> None:
    if doc_ids is None:
        return
    if doc_ids.dim() != 2 or doc_ids.shape[1] != spec.seq_len:
        raise ValueError(
            f"doc_ids must have shape [batch, {spec.seq_len}] (one id per position of a stream), "
            f"found {tuple(doc_ids.shape)}"
        )
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise TypeError(f"doc_ids must be an integer tensor, found {doc_ids.dtype}")


def dense_allowed_from_spec(
    spec: MaskSpec, doc_ids: Optional[torch.Tensor] = None, device=None
) -> torch.Tensor:
    """Dense boolean mask (True = may attend): ``[S, S]``, or ``[b, S, S]`` with ``doc_ids``."""
    _check_doc_ids(spec, doc_ids)
    if doc_ids is not None:
        return _dense_with_docs(spec, doc_ids)
    return _dense_cached(spec, torch.device(device) if device is not None else torch.device("cpu"))


# Small: a dense mask is O(S^2) bytes, and annealing makes a new spec every step.
@functools.lru_cache(maxsize=8)
def _dense_cached(spec: MaskSpec, device: torch.device) -> torch.Tensor:
    S = spec.total_len
    idx = torch.arange(S, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return allowed(spec, zero, idx[:, None], idx[None, :])


def _dense_with_docs(spec: MaskSpec, doc_ids: torch.Tensor) -> torch.Tensor:
    S = spec.total_len
    device = doc_ids.device
    idx = torch.arange(S, device=device)
    b = torch.arange(doc_ids.shape[0], device=device)[:, None, None]
    return allowed(spec, b, idx[None, :, None], idx[None, None, :], doc_ids=doc_ids)


def dense_allowed(
    layout: str,
    seq_len: int,
    block_size: int = 1,
    *,
    doc_ids: Optional[torch.Tensor] = None,
    anneal_step: int = 0,
    anneal_steps: int = 0,
    anneal_seed: int = 0,
) -> torch.Tensor:
    """Public helper: bool tensor, True = may attend.

    Shape ``[3L, 3L]`` for complementary layouts, ``[2L, 2L]`` for dual layouts, ``[L, L]``
    otherwise (with a leading batch dimension when
    ``doc_ids`` is given). ``seq_len`` is ``L``, the tokens of one stream.
    """
    spec = MaskSpec(layout, seq_len, block_size, anneal_step, anneal_steps, anneal_seed)
    return dense_allowed_from_spec(spec, doc_ids).clone()


def megatron_mask(allowed_mask: torch.Tensor) -> torch.Tensor:
    """Convert a "may attend" mask to megatron-core's convention (True = masked out), 4D."""
    m = ~allowed_mask
    while m.dim() < 4:
        m = m.unsqueeze(0) if m.dim() < 3 else m.unsqueeze(1)
    return m
