"""Layer specs: megatron-core's GPT layer specs with the block-diffusion core attention swapped
in through the one field ``core_attention``.

The local spec (pure megatron-core modules) is the default and the only choice on CPU. The
Transformer Engine spec is used when asked for and TE imports; an import that fails or raises
(TE on a CPU host can) falls back to a clear error rather than a traceback from inside TE.
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
) -> ModuleSpec:
    """GPT layer spec (RMSNorm, SwiGLU MLP) whose core attention is :class:`BlockDiffusionAttention`."""
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

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec = copy.deepcopy(spec)
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
    """Decoder-block spec for this pipeline stage: its layers and the final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = get_nbdiff_layer_spec(backend=backend, qk_layernorm=qk_layernorm, use_te=use_te)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=final_norm_spec(use_te)
    )
