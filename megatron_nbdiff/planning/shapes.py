"""The model a plan is made for: a named shape, a Hugging Face ``config.json`` directory, or a
converted checkpoint (its ``nbdiff.json``).

Named shapes are the published configurations of their checkpoints (``config.json`` on the
Hugging Face hub). Their vocabulary is the HF vocabulary plus one appended mask token, which is
what ``nbdiff-convert-hf-to-megatron --mask-token append`` (the default) produces; the mask token
is the last real row. Only the shape matters to the planner (RoPE scaling and epsilons are kept so
that the run config it writes describes the real model). Each named shape is the
:class:`ModelConfig` that ``checkpoint.families.parse_hf_config`` reads from its ``config.json``
(tests/test_plan.py compares the mixture-of-experts ones).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..config import ModelConfig
from ..errors import ConfigError

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name -> (HF vocabulary, ModelConfig fields other than vocab_size and max_seq_len, where from)
NAMED_SHAPES: dict[str, tuple[int, dict, str]] = {
    "llama3-8b": (128256, dict(hidden_size=4096, num_layers=32, num_attention_heads=32,
                               num_query_groups=8, ffn_hidden_size=14336, rope_base=500000.0,
                               rope_scaling=_LLAMA31_ROPE, norm_eps=1e-5),
                  "meta-llama/Llama-3.1-8B (Llama 3 8B's shape with 3.1's RoPE scaling)"),
    "llama3-70b": (128256, dict(hidden_size=8192, num_layers=80, num_attention_heads=64,
                                num_query_groups=8, ffn_hidden_size=28672, rope_base=500000.0,
                                rope_scaling=_LLAMA31_ROPE, norm_eps=1e-5),
                   "meta-llama/Llama-3.1-70B"),
    "qwen2.5-7b": (152064, dict(hidden_size=3584, num_layers=28, num_attention_heads=28,
                                num_query_groups=4, ffn_hidden_size=18944, rope_base=1000000.0,
                                norm_eps=1e-6, add_qkv_bias=True),
                   "Qwen/Qwen2.5-7B"),
    "qwen2.5-32b": (152064, dict(hidden_size=5120, num_layers=64, num_attention_heads=40,
                                 num_query_groups=8, ffn_hidden_size=27648, rope_base=1000000.0,
                                 norm_eps=1e-5, add_qkv_bias=True),
                    "Qwen/Qwen2.5-32B"),
    "qwen2.5-72b": (152064, dict(hidden_size=8192, num_layers=80, num_attention_heads=64,
                                 num_query_groups=8, ffn_hidden_size=29568, rope_base=1000000.0,
                                 norm_eps=1e-5, add_qkv_bias=True),
                    "Qwen/Qwen2.5-72B"),
    "bench-1.1b": (32000, dict(hidden_size=2048, num_layers=22, num_attention_heads=16,
                               num_query_groups=4, ffn_hidden_size=5632, norm_eps=1e-5),
                   "the ~1.1B model of benchmarks/train_step.py (BENCHMARKS.md)"),
    # mixture of experts: every layer a MoE layer (Qwen3: decoder_sparse_step 1, no mlp_only_layers)
    "qwen3-30b-a3b": (151936, dict(hidden_size=2048, num_layers=48, num_attention_heads=32,
                                   num_query_groups=4, kv_channels=128, ffn_hidden_size=6144,
                                   rope_base=1000000.0, norm_eps=1e-6, qk_layernorm=True, num_experts=128,
                                   moe_topk=8, moe_ffn_hidden_size=768, moe_norm_topk_prob=True,
                                   moe_dense_layers=[]),
                      "Qwen/Qwen3-30B-A3B (128 experts, top-8)"),
    "mixtral-8x7b": (32000, dict(hidden_size=4096, num_layers=32, num_attention_heads=32,
                                 num_query_groups=8, ffn_hidden_size=14336, rope_base=1000000.0,
                                 norm_eps=1e-5, num_experts=8, moe_topk=2, moe_ffn_hidden_size=14336,
                                 moe_norm_topk_prob=True, moe_dense_layers=[]),
                     "mistralai/Mixtral-8x7B-v0.1 (8 experts, top-2)"),
}


@dataclasses.dataclass
class ModelSource:
    """A model to plan for and where it came from."""

    model: ModelConfig
    """The architecture (vocabulary including the mask token)."""
    kind: str
    """``named``, ``hf`` or ``checkpoint``."""
    name: str
    """The shape's name or the directory given."""
    mask_token_id: Optional[int]
    """The mask token's id when the planner knows it and the run config must name it (named
    shapes, HF directories); None for a checkpoint (its nbdiff.json names it)."""
    described: str
    """One line on where the shape comes from."""


def named_shape(name: str, seq_len: int) -> ModelSource:
    if name not in NAMED_SHAPES:
        raise ConfigError(
            f"unknown model {name!r}: not a named shape ({', '.join(sorted(NAMED_SHAPES))}), "
            "nor a directory with config.json or nbdiff.json"
        )
    hf_vocab, fields, origin = NAMED_SHAPES[name]
    fields = {k: list(v) if isinstance(v, list) else v for k, v in fields.items()}  # no shared lists
    mc = ModelConfig(vocab_size=hf_vocab + 1, max_seq_len=seq_len, attention_backend="flex", **fields)
    return ModelSource(mc, "named", name, hf_vocab, f"{name}: {origin}, vocabulary {hf_vocab} + 1 mask token")


def load_model(spec: str, seq_len: int) -> ModelSource:
    """The model named by ``spec``: a converted checkpoint directory (``nbdiff.json``), an HF
    directory (``config.json``) or a named shape. Raises :class:`ConfigError` (or the checkpoint
    readers' errors) with one line naming what is wrong."""
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "nbdiff.json")):
            from ..checkpoint.metadata import read_metadata

            meta = read_metadata(spec)
            mc = meta.get_model_config()
            if seq_len > mc.max_seq_len:
                raise ConfigError(
                    f"--seq-len {seq_len} exceeds model_config.max_seq_len {mc.max_seq_len} in "
                    f"{os.path.join(spec, 'nbdiff.json')}: the trainer would refuse the run"
                )
            return ModelSource(mc, "checkpoint", spec, None,
                               f"{spec}: converted {meta.hf_architecture} checkpoint (nbdiff.json)")
        if os.path.isfile(os.path.join(spec, "config.json")):
            from ..checkpoint.families import parse_hf_config

            info = parse_hf_config(spec, max_seq_len=seq_len)
            hf_vocab = info.model_config.vocab_size
            mc = dataclasses.replace(info.model_config, vocab_size=hf_vocab + 1,
                                     attention_backend="flex")
            return ModelSource(mc, "hf", spec, hf_vocab,
                               f"{spec}: {info.family.architecture} config.json, vocabulary "
                               f"{hf_vocab} + 1 mask token (appended at conversion)")
        raise ConfigError(f"model directory {spec} has neither nbdiff.json (a converted checkpoint) "
                          "nor config.json (a Hugging Face model)")
    return named_shape(spec, seq_len)

