"""FlexAttention ``BlockMask`` builders derived from :func:`masks.allowed`.

Dual and complementary layouts are split in two query groups, because clean queries never see
noisy keys (docs/method.md, "Attention layouts", "Instruction tuning"):

* noisy queries (``L``, or ``2L`` for the two views of a complementary layout) attend over all
  ``2L`` (``3L``) keys through a sparse block mask;
* clean queries (``L``) attend over the ``L`` clean keys only: plain causal attention for the
  context-causal layouts without documents (so the fast causal kernel can serve it), otherwise a
  block mask of their own.

Every ``mask_mod`` here is :func:`masks.allowed` with index offsets, never a second copy of the
rule. BlockMasks that do not depend on document ids are cached per (spec, part, device).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .masks import ANNEAL_FULL, BLOCK_LAYOUTS, MaskSpec, _check_doc_ids, allowed, anneal_salt, salted_anneal_hash

PARTS = ("full", "noisy", "clean")


def mask_mod_for(spec: MaskSpec, part: str = "full", doc_ids: Optional[torch.Tensor] = None, device=None):
    """FlexAttention ``mask_mod`` for one query group of ``spec``.

    ``part``: ``"full"`` (all ``total_len`` queries and keys), ``"noisy"`` (dual and
    complementary only: the noisy queries, ``L`` or ``2L``, against all keys) or ``"clean"`` (the
    ``L`` clean queries against the ``L`` clean keys).
    """
    if part not in PARTS:
        raise ValueError(f"unknown mask part {part!r}; expected one of {PARTS}")
    if part != "full" and spec.layout not in BLOCK_LAYOUTS:
        raise ValueError(f"part {part!r} exists only for dual and complementary layouts, not {spec.layout!r}")
    off = noisy_len(spec) if part == "clean" else 0
    if spec.layout == "single_annealed" and spec.anneal_threshold < ANNEAL_FULL:
        # the step-dependent numbers travel as tensors, not Python ints: torch.compile guards on
        # a closure's ints and would recompile the kernel at every training step
        dev = doc_ids.device if doc_ids is not None else device
        salt = torch.tensor(anneal_salt(spec.anneal_step, spec.anneal_seed), dtype=torch.int64, device=dev)
        thr = torch.tensor(spec.anneal_threshold, dtype=torch.int64, device=dev)

        def annealed_mask_mod(b, h, q_idx, kv_idx):
            ok = (kv_idx <= q_idx) | (salted_anneal_hash(salt, q_idx, kv_idx) < thr)
            if doc_ids is not None:
                ok = ok & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            return ok

        return annealed_mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(spec, b, q_idx + off, kv_idx + off, doc_ids)

    return mask_mod


def noisy_len(spec: MaskSpec) -> int:
    """Positions of the noisy views (all streams but the clean one)."""
    return (spec.streams - 1) * spec.seq_len


def part_shape(spec: MaskSpec, part: str) -> tuple[int, int]:
    """(queries, keys) of a part."""
    L = spec.seq_len
    if part == "full":
        return spec.total_len, spec.total_len
    return (noisy_len(spec), spec.total_len) if part == "noisy" else (L, L)


def block_mask_for(
    spec: MaskSpec,
    part: str = "full",
    doc_ids: Optional[torch.Tensor] = None,
    device=None,
    block: int = 128,
) -> BlockMask:
    """The BlockMask of one part of ``spec``; cached when ``doc_ids`` is None."""
    _check_doc_ids(spec, doc_ids)
    if doc_ids is not None:
        q_len, kv_len = part_shape(spec, part)
        return create_block_mask(
            mask_mod_for(spec, part, doc_ids, device=doc_ids.device),
            doc_ids.shape[0],
            None,
            q_len,
            kv_len,
            device=doc_ids.device,
            BLOCK_SIZE=block,
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _cached_block_mask(spec, part, dev, block)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(spec: MaskSpec, part: str, device: torch.device, block: int) -> BlockMask:
    q_len, kv_len = part_shape(spec, part)
    return create_block_mask(
        mask_mod_for(spec, part, device=device), None, None, q_len, kv_len, device=device, BLOCK_SIZE=block
    )


def clean_part_is_causal(spec: MaskSpec, doc_ids: Optional[torch.Tensor]) -> bool:
    """Whether the clean queries of a dual or complementary layout need nothing but plain causal
    attention."""
    return spec.layout in ("dual_context_causal", "complementary_context_causal") and doc_ids is None
