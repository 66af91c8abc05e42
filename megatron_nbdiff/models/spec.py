"""Layer specs: megatron-core's GPT layer specs with the block-diffusion core attention swapped
in through the one field ``core_attention``.

The local spec (pure megatron-core modules) is the default and the only choice on CPU. The
Transformer Engine spec is used when asked for and TE imports; an import that fails or raises
(TE on a CPU host can) falls back to a clear error rather than a traceback from inside TE.

Mixture-of-experts models get megatron-core's ``MoELayer`` (``TopKRouter``, the token dispatcher
the config names, ``SequentialMLP`` experts in the local spec, ``TEGroupedMLP`` with TE and
``moe_grouped_gemm``) in their MoE layers and the dense SwiGLU MLP in the others, layer by layer
from the config's ``moe_layer_freq``. A MoE layer's pre-MLP norm is stored under
``pre_mlp_layernorm.weight`` as the Transformer Engine MoE spec stores it (the local spec would
file it under ``mlp.linear_fc1.layer_norm_weight``, a module MoE layers do not have), so a
checkpoint has one layout whichever spec wrote it.
"""
from __future__ import annotations

import copy

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from ..attention.core_attention import BACKENDS, BlockDiffusionAttention
from .norm import QKRMSNorm, RMSNorm


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - TE can raise anything on a CPU host
        return False
    return True


def get_nbdiff_layer_spec(
    backend: str = "dense",
    qk_layernorm: bool = False,
    use_te: bool = False,
    num_experts=None,
    moe_grouped_gemm: bool = False,
) -> ModuleSpec:
    """GPT layer spec (RMSNorm, SwiGLU MLP; a MoE layer of ``num_experts`` SwiGLU experts when
    given) whose core attention is :class:`BlockDiffusionAttention`. ``moe_grouped_gemm`` (TE
    only) picks grouped-GEMM experts; the local spec always uses ``SequentialMLP``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if use_te:
        if not transformer_engine_available():
            raise RuntimeError(
                "use_te=True but Transformer Engine does not import on this host; use the local spec"
            )
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=bool(num_experts and moe_grouped_gemm),
            qk_layernorm=qk_layernorm,
        )
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False,
                                        qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    if num_experts:  # the pre-MLP norm keeps its own name, as in the TE MoE spec (module docstring)
        keys = dict(spec.submodules.sharded_state_dict_keys_map or {})
        keys.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = keys
    attn = spec.submodules.self_attention
    if not use_te:
        # torch RMSNorm that supports sequence parallelism (see norm.py)
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        if qk_layernorm:
            attn.submodules.q_layernorm = QKRMSNorm
            attn.submodules.k_layernorm = QKRMSNorm
    attn.params = dict(attn.params or {}, attn_mask_type=AttnMaskType.arbitrary)
    attn.submodules.core_attention = ModuleSpec(
        module=BlockDiffusionAttention, params={"backend": backend}
    )
    return spec


def final_norm_spec(use_te: bool = False):
    """The norm after the last layer, matching the layer spec's norms."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def get_nbdiff_block_spec(config, backend: str = "dense", qk_layernorm: bool = False,
                          use_te: bool = False, vp_stage=None):
    """Decoder-block spec for this pipeline stage: its layers (MoE or dense per
    :func:`moe_layer_pattern`) and the final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    dense = get_nbdiff_layer_spec(backend=backend, qk_layernorm=qk_layernorm, use_te=use_te)
    pattern = moe_layer_pattern(config)
    moe = None
    if any(pattern):
        moe = get_nbdiff_layer_spec(backend=backend, qk_layernorm=qk_layernorm, use_te=use_te,
                                    num_experts=config.num_moe_experts,
                                    moe_grouped_gemm=config.moe_grouped_gemm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[moe if pattern[i] else dense for i in range(offset, offset + num_layers)],
        layer_norm=final_norm_spec(use_te),
    )


def moe_layer_pattern(config) -> list[int]:
    """Per global layer 1 (MoE) or 0 (dense) from a ``TransformerConfig``: all 0 without experts;
    ``moe_layer_freq`` as megatron-core reads it otherwise (an int ``N``: layers ``0, N, 2N, ...``;
    a list: one entry per layer)."""
    if not config.num_moe_experts:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers or any(x not in (0, 1) for x in freq):
        raise ValueError(f"moe_layer_freq {freq} must hold a 0 or 1 for each of the {config.num_layers} layers")
    return list(freq)
