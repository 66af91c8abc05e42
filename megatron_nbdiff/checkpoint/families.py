"""The Hugging Face architecture families this project converts, and their configs.

A family is a small record of how an HF decoder differs from the plain Llama shape (bias on the
QKV projection, per-head q/k RMSNorm, mixture-of-experts MLPs and how their tensors are named).
:func:`parse_hf_config` reads an HF ``config.json`` into the family and a
:class:`~megatron_nbdiff.config.ModelConfig`, refusing what the megatron model cannot represent
exactly (other activations, output-projection or MLP biases, RoPE scaling other than
``linear``, ``llama3`` and ``yarn``; for MoE models shared experts, router jitter, capacity
limits or token dropping, and top-1 renormalised routing).
:func:`hf_config_for_export` goes the other way for exported checkpoints.

The MoE families route as megatron-core's ``TopKRouter`` is configured to
(``megatron_nbdiff/models/transformer_config.py``): ``qwen3_moe`` (``Qwen3MoeForCausalLM``:
softmax over all experts, top-k, renormalised when ``norm_topk_prob``; q/k norm; dense layers
from ``mlp_only_layers`` and ``decoder_sparse_step``; no shared expert) and ``mixtral``
(``MixtralForCausalLM``: top-k of a softmax, always renormalised; every layer MoE).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from ..config import ROPE_SCALING_KEYS, ModelConfig, check_rope_scaling
from ..dtypes import HF_DTYPE_NAMES
from ..errors import ConfigError
from .errors import ConversionError


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF architecture family."""

    name: str
    """Family name recorded in ``nbdiff.json`` (``llama``, ``qwen2``, ``qwen3``, ``mistral``)."""
    model_type: str
    """``model_type`` in the HF ``config.json``."""
    architecture: str
    """The HF causal-LM class (``LlamaForCausalLM``)."""
    qkv_bias: bool = False
    """q/k/v projections always carry a bias (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3)."""
    bias_flags: tuple[str, ...] = ()
    """Config flags that add biases the megatron model has no place for; they must be false."""
    window_from_config: bool = False
    """The attention uses ``sliding_window`` whenever the config sets it (Mistral, Mixtral,
    Qwen3-MoE); other families only on layers whose ``layer_types`` say so."""
    moe_block: Optional[str] = None
    """HF submodule of a MoE layer's MLP (``mlp``, ``block_sparse_moe``); None: a dense family.
    Its router is ``<moe_block>.gate`` and expert ``e`` is ``<moe_block>.experts.<e>``."""
    expert_proj: tuple[str, ...] = ()
    """HF names of an expert's gate, up and down projections (``w1``, ``w3``, ``w2`` in Mixtral)."""

    def config_class(self):
        import transformers

        return getattr(transformers, self.architecture.replace("ForCausalLM", "Config"))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "llama", "LlamaForCausalLM", bias_flags=("attention_bias", "mlp_bias")),
        Family("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True),
        Family("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True, bias_flags=("attention_bias",)),
        Family("mistral", "mistral", "MistralForCausalLM", window_from_config=True),
        Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, bias_flags=("attention_bias",),
               window_from_config=True, moe_block="mlp", expert_proj=("gate_proj", "up_proj", "down_proj")),
        Family("mixtral", "mixtral", "MixtralForCausalLM", window_from_config=True,
               moe_block="block_sparse_moe", expert_proj=("w1", "w3", "w2")),
    )
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}

# HF MoE model types that are known and refused, with the reason
_REFUSED_MODEL_TYPES = {
    "qwen2_moe": "its shared expert with a sigmoid gate (added to every token's output) has no "
                 "counterpart in megatron-core's MoE layer that reproduces it exactly",
}

# config.json keys of MoE routing behaviour the megatron model does not reproduce (refused when
# set to anything but null / 0 / false): key -> what it does
_MOE_REFUSED_KEYS = {
    "router_jitter_noise": "multiplies the MoE input by random noise in training (megatron-core only "
                           "jitters the router's input)",
    "shared_expert_intermediate_size": "adds a shared expert",
    "n_shared_experts": "adds shared experts",
    "num_shared_experts": "adds shared experts",
    "capacity_factor": "limits each expert's tokens (token dropping)",
    "moe_capacity_factor": "limits each expert's tokens (token dropping)",
    "expert_capacity": "limits each expert's tokens (token dropping)",
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConversionError(
            f"unknown architecture family {name!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


@dataclasses.dataclass
class HFModelInfo:
    """What conversion learns from an HF config."""

    family: Family
    model_config: ModelConfig
    """The architecture with the HF vocabulary (no mask token yet)."""
    raw_config: dict[str, Any]
    """``config.json`` as written, kept for export."""
    dtype: Optional[str]
    """The checkpoint's declared dtype as ``fp32``/``bf16``/``fp16``, if it declares one."""
    notes: list[str]
    """Facts worth recording in ``nbdiff.json`` (for example an ignored sliding window)."""




def read_config_json(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return raw


def family_of(raw: dict[str, Any]) -> Family:
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    family = _BY_MODEL_TYPE.get(model_type)
    if model_type in _REFUSED_MODEL_TYPES:
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported: {_REFUSED_MODEL_TYPES[model_type]}; "
            f"supported model types: {', '.join(sorted(_BY_MODEL_TYPE))}"
        )
    if family is None:
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r}, architectures={archs}; supported "
            f"model types: {', '.join(sorted(_BY_MODEL_TYPE))}"
        )
    if archs and archs[0] != family.architecture:
        raise ConversionError(
            f"unsupported architecture {archs[0]!r} for model_type {model_type!r}: only "
            f"{family.architecture} (a decoder-only causal LM) is converted"
        )
    return family


def _rope_scaling(rope: dict[str, Any], max_position_embeddings) -> Optional[dict[str, Any]]:
    """:attr:`ModelConfig.rope_scaling` from the config's (transformers-standardised) RoPE
    parameters: None for plain RoPE; the type and the parameters its frequencies read for
    ``linear``, ``llama3`` and ``yarn`` (YaRN without a ``factor`` takes
    ``max_position_embeddings / original_max_position_embeddings``, as transformers does); any
    other type refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ConversionError(
            f"RoPE scaling {rope_type!r} is not supported; only plain RoPE and the scaling types "
            f"{', '.join(sorted(ROPE_SCALING_KEYS))} convert exactly"
            + (" (its frequencies change with the sequence length)" if rope_type == "dynamic" else "")
        )
    required, optional = ROPE_SCALING_KEYS[rope_type]
    out = {"rope_type": rope_type}
    out.update({k: rope[k] for k in required + optional if k in rope})
    if rope_type == "yarn" and out.get("factor") is None and max_position_embeddings \
            and out.get("original_max_position_embeddings"):
        out["factor"] = max_position_embeddings / out["original_max_position_embeddings"]
    try:
        return check_rope_scaling(out)
    except ConfigError as e:
        raise ConversionError(f"config.json's RoPE scaling is not usable: {e}") from None


def parse_hf_config(hf_dir: str, max_seq_len: Optional[int] = None,
                    make_vocab_size_divisible_by: int = 128) -> HFModelInfo:
    """Read ``hf_dir/config.json`` into a family and a :class:`ModelConfig`."""
    raw = read_config_json(hf_dir)
    family = family_of(raw)
    try:
        cfg = family.config_class().from_dict(dict(raw))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise ConversionError(f"invalid {family.architecture} config in {hf_dir}: {e}") from None

    def need(name):
        value = getattr(cfg, name, None)
        if value is None:
            raise ConversionError(f"config.json lacks {name!r}, needed for a {family.name} model")
        return value

    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act={act!r} is not supported (the megatron model uses SwiGLU with silu)")
    for flag in family.bias_flags:
        if getattr(cfg, flag, False):
            raise ConversionError(
                f"{flag}=true is not supported: the megatron model has no bias on the output "
                "projection or the MLP"
            )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = rope["full_attention"]
    rope_scaling = _rope_scaling(rope, getattr(cfg, "max_position_embeddings", None))
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope_theta is None:
        raise ConversionError("config.json gives no rope_theta")
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ConversionError(f"partial_rotary_factor={partial} is not supported")

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    groups = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    notes: list[str] = []
    seq = max_seq_len or int(getattr(cfg, "max_position_embeddings", None) or 4096)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    uses_window = window is not None and (
        family.window_from_config or "sliding_attention" in layer_types
    )
    if uses_window and window < seq:
        notes.append(
            f"the HF model uses a sliding attention window of {window} tokens; the megatron model "
            f"attends over the whole context, so outputs agree for sequences up to {window} tokens"
        )
    moe = _moe_fields(family, raw, cfg, need, notes) if family.moe_block else {}
    try:
        mc = ModelConfig(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=need("intermediate_size"),
            kv_channels=head_dim,
            max_seq_len=seq,
            rope_base=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            qk_layernorm=family.qk_norm,
            add_qkv_bias=family.qkv_bias,
            tie_embeddings=tie,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            **moe,
        )
    except ValueError as e:
        raise ConversionError(f"config.json describes an unsupported shape: {e}") from None
    declared = raw.get("dtype", raw.get("torch_dtype"))
    return HFModelInfo(family, mc, raw, HF_DTYPE_NAMES.get(str(declared)), notes)


def _moe_fields(family: Family, raw: dict[str, Any], cfg, need, notes: list[str]) -> dict[str, Any]:
    """The :class:`ModelConfig` MoE fields of a MoE family's config (module docstring), after
    refusing the routing options megatron-core's router cannot reproduce."""
    for key, what in _MOE_REFUSED_KEYS.items():
        value = raw.get(key)
        if value:
            raise ConversionError(
                f"config.json: {key}={value!r} is not supported: it {what}, which the megatron model "
                "does not reproduce"
            )
    layers = need("num_hidden_layers")
    experts = getattr(cfg, "num_experts", None)
    topk = need("num_experts_per_tok")
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ConversionError(
            f"config.json: num_experts={experts!r} leaves no MoE layer; convert a dense model as its "
            "dense family"
        )
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= experts:
        raise ConversionError(
            f"config.json: num_experts_per_tok={topk!r} must be an int in [1, num_experts={experts}]"
        )
    if family.name == "qwen3_moe":
        step = getattr(cfg, "decoder_sparse_step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConversionError(f"config.json: decoder_sparse_step={step!r} must be a positive int")
        only = list(getattr(cfg, "mlp_only_layers", None) or [])
        bad = [i for i in only if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers]
        if bad:
            raise ConversionError(
                f"config.json: mlp_only_layers holds {bad[0]!r}, not a layer index in [0, {layers})"
            )
        dense = [i for i in range(layers) if i in only or (i + 1) % step != 0]
        norm, width = bool(getattr(cfg, "norm_topk_prob", False)), need("moe_intermediate_size")
    else:  # mixtral: every layer MoE, experts as wide as intermediate_size, always renormalised
        dense, norm, width = [], True, need("intermediate_size")
    if len(dense) == layers:
        raise ConversionError(
            "config.json: mlp_only_layers and decoder_sparse_step leave no MoE layer; convert a dense "
            "model as its dense family"
        )
    if topk == 1 and norm:
        raise ConversionError(
            "config.json: num_experts_per_tok=1 with renormalised routing (every token's expert weighted "
            "by exactly 1) is not reproduced by megatron-core's router"
        )
    coef = raw.get("router_aux_loss_coef")
    if coef:
        notes.append(
            f"the HF config's router_aux_loss_coef={coef} (a training setting) was not carried over: "
            "model_config.moe_aux_loss_coeff is 0 (see ModelConfig.moe_aux_loss_coeff)"
        )
    return dict(num_experts=experts, moe_topk=topk, moe_ffn_hidden_size=width, moe_norm_topk_prob=norm,
                moe_dense_layers=dense)


def _moe_export_fields(family: Family, mc: ModelConfig) -> dict[str, Any]:
    """The HF config fields of ``mc``'s experts for a fresh config of ``family``; refuses what the
    family's HF class cannot express."""
    if mc.is_moe != bool(family.moe_block):
        kind = "mixture-of-experts" if mc.is_moe else "dense"
        raise ConversionError(f"a {kind} model_config cannot be exported as {family.architecture}")
    if not mc.is_moe:
        return {}
    if family.name == "qwen3_moe":
        return dict(num_experts=mc.num_experts, num_experts_per_tok=mc.moe_topk,
                    moe_intermediate_size=mc.moe_ffn_hidden_size, norm_topk_prob=mc.moe_norm_topk_prob,
                    decoder_sparse_step=1, mlp_only_layers=list(mc.moe_dense_layers))
    if mc.moe_dense_layers or not mc.moe_norm_topk_prob or mc.moe_ffn_hidden_size != mc.ffn_hidden_size:
        raise ConversionError(
            "MixtralForCausalLM has no dense layers, renormalises the top-k probabilities and has one FFN "
            "width: model_config's moe_dense_layers, moe_norm_topk_prob or moe_ffn_hidden_size do not fit it"
        )
    return dict(num_local_experts=mc.num_experts, num_experts_per_tok=mc.moe_topk, router_jitter_noise=0.0)


_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config_for_export(family: Family, mc: ModelConfig, dtype: str,
                         stored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``config.json`` for an exported checkpoint: the stored original with the vocabulary and
    dtype brought up to date, or (without one) a fresh config of the family's class."""
    if stored:
        out = dict(stored)
    else:
        moe = _moe_export_fields(family, mc)
        cls = family.config_class()
        out = cls(
            vocab_size=mc.vocab_size,
            hidden_size=mc.hidden_size,
            intermediate_size=mc.ffn_hidden_size,
            num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_attention_heads,
            num_key_value_heads=mc.num_query_groups,
            head_dim=mc.kv_channels,
            max_position_embeddings=mc.max_seq_len,
            rms_norm_eps=mc.norm_eps,
            rope_parameters=dict(mc.rope_scaling or {"rope_type": "default"}, rope_theta=mc.rope_base),
            tie_word_embeddings=mc.tie_embeddings,
            **moe,
        ).to_dict()
    out["architectures"] = [family.architecture]
    out["model_type"] = family.model_type
    out["vocab_size"] = mc.vocab_size
    out["tie_word_embeddings"] = mc.tie_embeddings
    out["dtype"] = _TORCH_DTYPE_NAMES[dtype]
    if "torch_dtype" in out:
        out["torch_dtype"] = _TORCH_DTYPE_NAMES[dtype]
    return out
