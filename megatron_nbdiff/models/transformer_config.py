"""The lowering of a :class:`~megatron_nbdiff.config.ModelConfig` (a Llama-style decoder:
RMSNorm, SwiGLU, RoPE, GQA) to megatron-core's ``TransformerConfig`` at a parallel layout."""
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
    **overrides: Any,
):
    """megatron-core ``TransformerConfig`` for ``model`` at a parallel layout; ``overrides`` are
    passed through (e.g. ``perform_initialization=False``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .rope import softmax_scale

    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(TORCH_DTYPES)}, found {dtype!r}")
    check_parallel_sizes(model, tp=tp, pp=pp)
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
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
