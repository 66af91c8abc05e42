"""Parameters held by one rank of a parallel layout, tensor by tensor, and the gradient buffers
megatron-core's DDP builds from them.

:func:`rank_parameters` lists the tensors of one (TP rank, EP rank, pipeline stage) in the order
``NBDiffModel.named_parameters()`` yields them, with the per-rank shapes megatron-core's local
layer spec gives them (docs/architecture.md, "Model" and "Mixture of experts"):

==============================  ===========================  ================================
tensor                          shape on one TP rank          where
==============================  ===========================  ================================
``embedding.word_embeddings``   ``[V_pad / tp, h]``           first stage
``input_layernorm``             ``[h]``                       every layer (replicated)
``linear_proj``                 ``[h, a*d / tp]``             every layer
``linear_qkv`` (+ bias)         ``[(a + 2g)*d / tp, h]``      every layer
``q_layernorm``, ``k_layernorm``  ``[d]``                     every layer, Qwen3-style only
``pre_mlp_layernorm``           ``[h]``                       every layer
``linear_fc1``                  ``[2f / tp, h]``              dense layers (SwiGLU: gate + up)
``linear_fc2``                  ``[h, f / tp]``               dense layers
``router``                      ``[E, h]``                    MoE layers (replicated, fp32 logits)
``local_experts.<j>.linear_fc1``  ``[2f_e / tp, h]``          MoE layers, ``j < E / ep``
``local_experts.<j>.linear_fc2``  ``[h, f_e / tp]``           MoE layers, ``j < E / ep``
``final_layernorm``             ``[h]``                       last stage
``output_layer``                ``[V_pad / tp, h]``           last stage; with tied embeddings
                                                              only when PP > 1 (a copy)
==============================  ===========================  ================================

``V_pad`` is the vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp``, ``a``
heads, ``g`` query groups, ``d`` the head dimension, ``f`` the dense SwiGLU width, ``E`` the
experts of a MoE layer and ``f_e`` an expert's width. The layers listed in ``moe_dense_layers``
stay dense. Experts are split over the ``ep`` expert-parallel ranks and each expert's matrices
over the expert-tensor-parallel ranks, which the trainer leaves at megatron's default, TP. With
virtual pipeline stages a rank holds ``vpp`` chunks: chunk ``j`` of pipeline rank ``k`` is virtual
stage ``j * pp + k``, ``layers / (pp * vpp)`` consecutive layers.

:func:`grad_buffers` reproduces megatron-core's ``_ParamAndGradBuffer`` sizing. Its DDP keeps the
experts in a buffer of their own (the trainer marks them expert-parallel at every ``ep``,
``training/model_and_optimizer.py``), reduced over the expert-data-parallel group of
``dp * cp / ep`` ranks; the other parameters (the routers among them) go in the dense buffer,
reduced over the ``dp * cp`` ranks. With the distributed optimizer every parameter starts at a
multiple of 64 elements and a buffer (one bucket: the trainer turns gradient-reduce overlap off)
ends at a multiple of ``lcm(its group size, 128)``; the shared embedding of a tied model split
over stages gets a bucket of its own. Buffers are walked backwards, so a buffer's size is the sum
of its tensors padded to 64 elements, less the padding of its first tensor in module order.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import ModelConfig

PARAM_ALIGN = 64
"""Elements each parameter of a distributed-optimizer buffer starts at a multiple of."""


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def expert_shapes(mc: ModelConfig, tp: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of one expert's ``linear_fc1`` and ``linear_fc2`` on one expert-TP rank."""
    f = mc.moe_ffn_hidden_size
    return (2 * f // tp, mc.hidden_size), (mc.hidden_size, f // tp)


def layer_parameters(mc: ModelConfig, tp: int, index: int, ep: int = 1, moe: Optional[bool] = None,
                     experts: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of transformer layer ``index`` (its name on the rank) on one TP and EP rank, in
    module order. ``moe``: whether it is a MoE layer (default: ``mc.is_moe_layer(index)``; pass it
    when ``index`` is local to a stage); ``experts=False`` leaves the expert tensors out."""
    h, a, g, d, f = (mc.hidden_size, mc.num_attention_heads, mc.num_query_groups, mc.kv_channels,
                     mc.ffn_hidden_size)
    moe = mc.is_moe_layer(index) if moe is None else moe
    p = f"gpt.decoder.layers.{index}."
    out = [(p + "input_layernorm.weight", (h,)),
           (p + "self_attention.linear_proj.weight", (h, a * d // tp)),
           (p + "self_attention.linear_qkv.weight", ((a + 2 * g) * d // tp, h))]
    if mc.add_qkv_bias:
        out.append((p + "self_attention.linear_qkv.bias", ((a + 2 * g) * d // tp,)))
    if mc.qk_layernorm:
        out += [(p + "self_attention.q_layernorm.weight", (d,)),
                (p + "self_attention.k_layernorm.weight", (d,))]
    out.append((p + "pre_mlp_layernorm.weight", (h,)))
    if not moe:
        return out + [(p + "mlp.linear_fc1.weight", (2 * f // tp, h)),
                      (p + "mlp.linear_fc2.weight", (h, f // tp))]
    out.append((p + "mlp.router.weight", (mc.num_experts, h)))
    if experts:
        fc1, fc2 = expert_shapes(mc, tp)
        for j in range(mc.num_experts // ep):
            q = f"{p}mlp.experts.local_experts.{j}."
            out += [(q + "linear_fc1.weight", fc1), (q + "linear_fc2.weight", fc2)]
    return out


def rank_layers(mc: ModelConfig, pp: int = 1, stage: int = 0, vpp: int = 1) -> list[int]:
    """Global indices of the layers one rank of pipeline stage ``stage`` holds, in module order."""
    per_chunk = mc.num_layers // (pp * vpp)
    return [(j * pp + stage) * per_chunk + i for j in range(vpp) for i in range(per_chunk)]


def rank_parameters(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, ep: int = 1,
                    ) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter one rank of pipeline stage ``stage`` holds (layer
    indices are local to the stage, as megatron-core numbers them)."""
    vocab = mc.padded_vocab_size(tp) // tp
    out = []
    if stage == 0:
        out.append(("gpt.embedding.word_embeddings.weight", (vocab, mc.hidden_size)))
    for i, layer in enumerate(rank_layers(mc, pp, stage)):
        out += layer_parameters(mc, tp, i, ep, moe=mc.is_moe_layer(layer))
    if stage == pp - 1:
        out.append(("gpt.decoder.final_layernorm.weight", (mc.hidden_size,)))
        if not mc.tie_embeddings or pp > 1:
            out.append(("gpt.output_layer.weight", (vocab, mc.hidden_size)))
    return out


def _rank_tensors(mc: ModelConfig, tp: int, pp: int, stage: int, ep: int, vpp: int):
    """One rank's non-expert tensor sizes as (first tensor, sizes before the layers, per dense layer,
    per MoE layer, after the layers), its dense and MoE layer counts, and its expert tensor pairs."""
    vocab = mc.padded_vocab_size(tp) // tp * mc.hidden_size
    layers = rank_layers(mc, pp, stage, vpp)
    n_moe = sum(1 for i in layers if mc.is_moe_layer(i))
    dense = [numel(s) for _, s in layer_parameters(mc, tp, 0, ep, moe=False)]
    moe = [numel(s) for _, s in layer_parameters(mc, tp, 0, ep, moe=True, experts=False)] if n_moe else []
    head = [vocab] if stage == 0 else []
    tail = []
    if stage == pp - 1:
        tail = [mc.hidden_size] + ([vocab] if not mc.tie_embeddings or pp > 1 else [])
    pairs = n_moe * (mc.num_experts // ep) if n_moe else 0
    return head, dense, moe, tail, len(layers) - n_moe, n_moe, pairs


def rank_parameter_counts(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, ep: int = 1,
                          vpp: int = 1) -> tuple[int, int]:
    """(non-expert, expert) parameter elements of one rank."""
    head, dense, moe, tail, n_dense, n_moe, pairs = _rank_tensors(mc, tp, pp, stage, ep, vpp)
    expert = 0
    if pairs:
        fc1, fc2 = expert_shapes(mc, tp)
        expert = pairs * (numel(fc1) + numel(fc2))
    return sum(head) + n_dense * sum(dense) + n_moe * sum(moe) + sum(tail), expert


def rank_parameter_count(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, ep: int = 1,
                         vpp: int = 1) -> int:
    return sum(rank_parameter_counts(mc, tp, pp, stage, ep, vpp))


def active_parameter_count(mc: ModelConfig) -> int:
    """Parameters one token goes through: the dense model, each MoE layer's router and ``moe_topk``
    experts (the embedding and output layer included)."""
    dense, expert = rank_parameter_counts(mc)
    if not mc.is_moe:
        return dense
    return dense + expert * mc.moe_topk // mc.num_experts


def grad_buffers(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, dp: int = 1, ep: int = 1,
                 vpp: int = 1, distributed_optimizer: bool = True) -> tuple[int, int]:
    """Elements of the (dense, expert) DDP parameter/gradient buffers of one rank; ``dp`` is the
    data x context parallel size, the experts' group has ``dp / ep`` ranks (see the module
    docstring). Without the distributed optimizer they are the plain parameter counts."""
    head, dense, moe, tail, n_dense, n_moe, pairs = _rank_tensors(mc, tp, pp, stage, ep, vpp)
    if not distributed_optimizer:
        return rank_parameter_counts(mc, tp, pp, stage, ep, vpp)
    shared = 0
    if mc.tie_embeddings and pp > 1:  # the embedding (first stage) or its copy (last) buckets alone
        if head:
            shared, head = head[0], []
        elif tail:
            shared, tail = tail[-1], tail[:-1]

    def padded(sizes: list[int]) -> int:
        return sum(_pad(n, PARAM_ALIGN) for n in sizes)

    first = (head or dense)[0]  # the embedding, else the first layer's input_layernorm (any layer type)
    end = padded(head) + n_dense * padded(dense) + n_moe * padded(moe) + padded(tail)
    end -= _pad(first, PARAM_ALIGN) - first
    divisor = math.lcm(dp, 128)
    dense_buffer = _pad(end, divisor) + (_pad(shared, divisor) if shared else 0)
    expert_buffer = 0
    if pairs:
        fc1, fc2 = (numel(s) for s in expert_shapes(mc, tp))
        end = pairs * (_pad(fc1, PARAM_ALIGN) + _pad(fc2, PARAM_ALIGN)) - (_pad(fc1, PARAM_ALIGN) - fc1)
        expert_buffer = _pad(end, math.lcm(dp // ep, 128))
    return dense_buffer, expert_buffer


def grad_buffer_numel(mc: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, dp: int = 1,
                      distributed_optimizer: bool = True, ep: int = 1, vpp: int = 1) -> int:
    """Elements of all DDP parameter/gradient buffers of one rank (:func:`grad_buffers`)."""
    return sum(grad_buffers(mc, tp, pp, stage, dp, ep, vpp, distributed_optimizer))
