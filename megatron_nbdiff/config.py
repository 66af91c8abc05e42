"""Dataclass configs. The model config describes a Llama-style decoder (RMSNorm, SwiGLU, RoPE,
GQA) and lowers to megatron-core's ``TransformerConfig`` for a given parallel layout."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .attention.core_attention import BACKENDS, check_parallel_divisibility

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer in the Llama / Qwen / Mistral families."""

    vocab_size: int
    """Vocabulary rows of the embedding (real tokens plus an appended mask token, if any)."""
    hidden_size: int
    """Model width."""
    num_layers: int
    """Transformer layers."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None means equal to ``num_attention_heads``."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner width; None means ``4 * hidden_size``."""
    kv_channels: Optional[int] = None
    """Head dimension; None means ``hidden_size // num_attention_heads``."""
    max_seq_len: int = 4096
    """Longest stream length ``L`` the model is built for."""
    rope_base: float = 10000.0
    """RoPE base (theta)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    attention_backend: str = "dense"
    """``dense`` (SDPA with a boolean mask, the CPU reference) or ``flex`` (FlexAttention)."""
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this times the tensor-parallel size."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, found {value!r}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"ModelConfig.num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"ModelConfig.attention_backend must be one of {BACKENDS}, found {self.attention_backend!r}"
            )

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding rows after padding for tensor parallelism."""
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        dtype: str = "fp32",
        sequence_parallel: bool = False,
        **overrides: Any,
    ):
        """megatron-core ``TransformerConfig`` for this architecture at a parallel layout."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, found {dtype!r}")
        check_parallel_divisibility(self.num_attention_heads, self.num_query_groups, tp)
        if self.num_layers % pp != 0:
            raise ValueError(
                f"pipeline parallel size {pp} does not divide num_layers={self.num_layers}"
            )
        if sequence_parallel and tp == 1:
            sequence_parallel = False
        torch_dtype = _DTYPES[dtype]
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=sequence_parallel,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
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
