"""Parameters held by one rank of a parallel layout, tensor by tensor, and the gradient buffer
megatron-core's DDP builds from them.

:func:`rank_parameters` lists the tensors of one (TP rank, pipeline stage) in the order
``NBDiffModel.named_parameters()`` yields them, with the per-rank shapes megatron-core's local
layer spec gives them (docs/architecture.md, "Model"):

==============================  ===========================  ================================
tensor                          shape on one TP rank          where
==============================  ===========================  ================================
``embedding.word_embeddings``   ``[V_pad / tp, h]``           first stage
``input_layernorm``             ``[h]``                       every layer (replicated)
``linear_proj``                 ``[h, a*d / tp]``             every layer
``linear_qkv`` (+ bias)         ``[(a + 2g)*d / tp, h]``      every layer
``q_layernorm``, ``k_layernorm``  ``[d]``                     every layer, Qwen3-style only
``pre_mlp_layernorm``           ``[h]``                       every layer
``linear_fc1``                  ``[2f / tp, h]``              every layer (SwiGLU: gate + up)
``linear_fc2``                  ``[h, f / tp]``               every layer
``final_layernorm``             ``[h]``                       last stage
``output_layer``                ``[V_pad / tp, h]``           last stage; with tied embeddings
                                                              only when PP > 1 (a copy)
==============================  ===========================  ================================

``V_pad`` is the vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp``, ``a``
heads, ``g`` query groups, ``d`` the head dimension, ``f`` the SwiGLU width. With virtual
pipeline stages a rank holds the same number of layers, in ``vpp`` chunks.

:func:`grad_buffer_numel` reproduces megatron-core's ``_ParamAndGradBuffer`` sizing: with the
distributed optimizer every parameter starts at a multiple of 64 elements and the buffer (one
bucket: the trainer turns gradient-reduce overlap off) ends at a multiple of ``lcm(dp, 128)``;
the shared embedding of a tied model split over stages gets a bucket of its own.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import ModelConfig


def layer_parameters(mc: ModelConfig, tp: int, index: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of transformer layer ``index`` on one TP rank, in module order."""
    h, a, g, d, f = (mc.hidden_size, mc.num_attention_heads, mc.num_query_groups, mc.kv_channels,
                     mc.ffn_hidden_size)
    p = f"gpt.decoder.layers.{index}."
    out = [(p + "input_layernorm.weight", (h,)),
           (p + "self_attention.linear_proj.weight", (h, a * d // tp)),
           (p + "self_attention.linear_qkv.weight", ((a + 2 * g) * d // tp, h))]
    if mc.add_qkv_bias:
        out.append((p + "self_attention.linear_qkv.bias", ((a + 2 * g) * d // tp,)))
    if mc.qk_layernorm:
        out += [(p + "self_attention.q_layernorm.weight", (d,)),
                (p + "self_attention.k_layernorm.weight", (d,))]
    out += [(p + "pre_mlp_layernorm.weight", (h,)),
            (p + "mlp.linear_fc1.weight", (2 * f // tp, h)),
            (p + "mlp.linear_fc2.weight", (h, f // tp))]
    return out


def rank_parameters(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0,
                    ) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter one rank of pipeline stage ``stage`` holds (layer
    indices are local to the stage, as megatron-core numbers them)."""
    vocab = mc.padded_vocab_size(tp) // tp
    out = []
    if stage == 0:
        out.append(("gpt.embedding.word_embeddings.weight", (vocab, mc.hidden_size)))
    for i in range(mc.num_layers // pp):
        out += layer_parameters(mc, tp, i)
    if stage == pp - 1:
        out.append(("gpt.decoder.final_layernorm.weight", (mc.hidden_size,)))
        if not mc.tie_embeddings or pp > 1:
            out.append(("gpt.output_layer.weight", (vocab, mc.hidden_size)))
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def rank_parameter_count(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    return sum(numel(s) for _, s in rank_parameters(mc, tp, pp, stage))


def grad_buffer_numel(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, dp: int = 1,
                      distributed_optimizer: bool = True) -> int:
    """Elements of the DDP parameter/gradient buffer of one rank (see the module docstring);
    without the distributed optimizer it is the plain parameter count."""
    params = rank_parameters(mc, tp, pp, stage)
    if not distributed_optimizer:
        return sum(numel(s) for _, s in params)
    shared = mc.tie_embeddings and pp > 1
    divisor = math.lcm(dp, 128)

    def pad(n: int, m: int) -> int:
        return -(-n // m) * m

    start = 0
    in_bucket = 0
    end: Optional[int] = None
    for name, shape in reversed(params):  # megatron walks the parameters backwards
        own_bucket = shared and name in ("gpt.embedding.word_embeddings.weight", "gpt.output_layer.weight")
        start = pad(start, 64)
        if own_bucket and in_bucket:
            start = pad(start, divisor)
            in_bucket = 0
        end = start + numel(shape)
        in_bucket += 1
        if own_bucket:
            start = pad(end, divisor)
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        start = pad(end, divisor)
    return start
