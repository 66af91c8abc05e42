"""The attention layout of one forward, passed down megatron-core's layer stack as an argument.

megatron-core hands every layer's core attention two per-call arguments besides the
activations: ``attention_mask`` (here: the optional document ids, an integer tensor) and
``packed_seq_params``. :class:`LayoutParams` is a ``PackedSeqParams`` in the ordinary ``sbhd``
format (so megatron's THD paths stay off) that also carries the forward's
:class:`~megatron_nbdiff.attention.masks.MaskSpec`. Carrying the layout as an argument, rather
than as state set on the modules around the forward, is what makes activation recomputation
work: megatron's recompute (selective ``core_attn`` in ``Attention._checkpointed_attention_forward``
and full layers in ``TransformerBlock._checkpointed_forward``) re-runs the forward during the
backward pass with the ``packed_seq_params`` its closures captured, long after the forward call
that set any module state has returned.

``max_seqlen_q`` / ``max_seqlen_kv`` are the attended positions (``L``, ``2L`` or ``3L``): megatron's
``get_rotary_seq_len`` reads them when ``packed_seq_params`` is given.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.packed_seq_params import PackedSeqParams

from .masks import MaskSpec


@dataclasses.dataclass
class LayoutParams(PackedSeqParams):
    """``PackedSeqParams`` (``sbhd``) with the forward's mask layout (module docstring)."""

    mask_spec: Optional[MaskSpec] = None


def layout_params(spec: MaskSpec) -> LayoutParams:
    """The per-call argument that gives every core attention of a forward the layout ``spec``."""
    return LayoutParams(qkv_format="sbhd", max_seqlen_q=spec.total_len, max_seqlen_kv=spec.total_len,
                        mask_spec=spec)
