"""The lowering of a :class:`~megatron_nbdiff.config.ModelConfig` (a Llama-style decoder:
RMSNorm, SwiGLU, RoPE, GQA; optionally mixture-of-experts layers) to megatron-core's
``TransformerConfig`` at a parallel layout.

MoE routing is set so that megatron-core's ``TopKRouter`` computes what HF Qwen3-MoE and Mixtral
compute: router logits in fp32 (``moe_router_dtype``), ``softmax`` score function, and

* renormalised top-k (``moe_norm_topk_prob``): ``moe_router_pre_softmax=False``, i.e. top-k of
  the logits, then a softmax over those k. HF takes the top-k of the softmax over all experts
  and divides by their sum; softmax is monotonic, so the same experts are chosen, and
  ``softmax(all)[topk] / sum = exp(l_i) / sum_{j in topk} exp(l_j) = softmax(l[topk])``.
* plain top-k: ``moe_router_pre_softmax=True``: softmax over all experts, then top-k (HF's
  order exactly).

In fp32 this is HF's routing up to rounding (tests/test_moe_convert.py compares the experts
chosen and their weights). In bf16 megatron computes the logits in fp32 from the bf16 input and
weight while HF computes them in bf16 before its fp32 softmax: megatron's are the more precise,
and the two can pick different experts for a token whose k-th and (k+1)-th logits are within
bf16 rounding of each other.

No capacity factor (no token is dropped or padded), no input jitter, no expert bias, no group
routing, no shared expert. The token dispatcher is the run's ``train.moe_dispatcher``
(:func:`~megatron_nbdiff.config.resolve_moe_dispatcher`; 'auto', the default here too, is
``alltoall`` at EP > 1 and ``allgather`` at EP = 1, so decoding at EP > 1 uses the all-to-all):

* ``allgather`` gathers every token of the TP x EP group on every rank, permutes the ones routed
  to its experts and reduce-scatters the outputs; at EP=1 TP=1 it communicates nothing;
* ``alltoall`` permutes each rank's tokens by expert (``moe_topk`` copies of each), sends each
  copy to the EP rank holding its expert (``all_to_all_single``), gathers them over TP, and
  sends the outputs back the same way; unfused permutation (``moe_permute_fusion`` False, the
  fused kernels need Transformer Engine). On CPU it needs ``compat``'s shim 9 (no CUDA stream).

Both run with plain torch ops and ``torch.distributed`` collectives that gloo has, and give the
same layer up to the order of floating-point sums. Experts are megatron's ``SequentialMLP`` in the
local spec (:mod:`.spec`); ``moe_grouped_gemm`` is False unless overridden (grouped GEMM needs
CUDA and the Transformer Engine spec).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import TORCH_DTYPES
from ..errors import ConfigError
from ..parallel import check_parallel_sizes

if TYPE_CHECKING:
    from ..config import ModelConfig


def transformer_config(
    model: "ModelConfig",
    tp: int = 1,
    pp: int = 1,
    dtype: str = "fp32",
    sequence_parallel: bool = False,
    ep: int = 1,
    moe_dispatcher: str = "auto",
    **overrides: Any,
):
    """megatron-core ``TransformerConfig`` for ``model`` at a parallel layout (``ep``: expert
    parallel size, MoE models only; ``moe_dispatcher``: ``train.moe_dispatcher``, ignored for a
    dense model); ``overrides`` are passed through (e.g. ``perform_initialization=False``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .rope import softmax_scale

    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(TORCH_DTYPES)}, found {dtype!r}")
    check_parallel_sizes(model, tp=tp, pp=pp, ep=ep)
    if sequence_parallel and tp == 1:
        sequence_parallel = False
    torch_dtype = TORCH_DTYPES[dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # YaRN's factor on cos and sin, folded into the attention scores (see models/rope.py)
        softmax_scale=softmax_scale(model.kv_channels, model.rope_scaling),
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        pipeline_dtype=torch_dtype,
        autocast_dtype=torch_dtype,
    )
    if model.is_moe:
        kwargs.update(moe_kwargs(model, ep, moe_dispatcher))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_kwargs(model: "ModelConfig", ep: int = 1, moe_dispatcher: str = "auto") -> dict[str, Any]:
    """megatron-core's MoE settings for ``model`` at expert-parallel size ``ep`` with the token
    dispatcher ``moe_dispatcher`` chooses (module docstring)."""
    from ..config import resolve_moe_dispatcher

    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        expert_model_parallel_size=ep,
        # the int form keeps megatron's stacked checkpoint layout (ModelConfig.stacked_layers)
        moe_layer_freq=1 if model.stacked_layers else model.moe_layer_pattern(),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_pad_expert_input_to_capacity=False,
        moe_token_dispatcher_type=resolve_moe_dispatcher(moe_dispatcher, ep),
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        moe_shared_expert_intermediate_size=None,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(model.moe_aux_loss_coeff),
        moe_z_loss_coeff=float(model.moe_z_loss_coeff) or None,
    )
