"""Dataclass configs. The model config describes a Llama-style decoder (RMSNorm, SwiGLU, RoPE,
GQA) and lowers to megatron-core's ``TransformerConfig`` for a given parallel layout."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .attention.core_attention import BACKENDS, check_parallel_divisibility
from .fileio import atomic_write

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


# --------------------------------------------------------------------------------------------
# The run config tree: YAML in and out, ``section.key=value`` overrides, unknown keys refused.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    """Where the tokens come from."""

    train: list = dataclasses.field(default_factory=list)
    """Indexed-dataset prefixes, or a flat blend ``[w1, prefix1, w2, prefix2, ...]``."""
    split: str = "98,2,0"
    """Train / validation / test split of the documents of ``train``."""
    tokenizer: Optional[str] = None
    """The tokenizer the data was made with (its end-of-document id separates packed documents);
    default: the tokenizer of ``checkpoint.init_from``."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its sample indices; default ``<save_dir>/data_cache``."""


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, parallel layout, schedule and cadence."""

    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    seq_len: int = 256
    """Stream length L (dual layouts attend over 2L)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate of the decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    lr_schedule: str = "cosine"
    """'cosine', 'wsd' (warmup-stable-decay) or 'constant'."""
    wsd_decay_steps: int = 0
    """Decay steps at the end of a 'wsd' schedule."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    seed: int = 1234
    """Seed of weights (from scratch), data order and noise."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (with tp > 1)."""
    dtype: str = "auto"
    """'auto' (bf16 with CUDA, fp32 without), 'bf16' or 'fp32'."""
    log_interval: int = 1
    """Steps between console / metrics lines."""
    eval_interval: int = 0
    """Steps between held-out evaluations (0: never)."""
    eval_iters: int = 2
    """Global batches per evaluation."""
    nan_policy: str = "stop"
    """A NaN/Inf loss: 'stop' (save nothing, exit with a message) or 'skip' (drop the step)."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU; None: 989 (H100 bf16 dense) with CUDA, no MFU on CPU."""

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "seq_len", "tp", "pp",
                     "log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, found {getattr(self, name)}")
        if self.lr_schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"train.lr_schedule must be cosine, wsd or constant, found {self.lr_schedule!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.dtype must be auto, bf16 or fp32, found {self.dtype!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"train.nan_policy must be stop or skip, found {self.nan_policy!r}")


@dataclasses.dataclass
class CheckpointConfig:
    """Initialisation, saving and resuming."""

    init_from: Optional[str] = None
    """A converted or adapted checkpoint to start from (None: random weights from ``model``)."""
    save_dir: str = "runs/default"
    """Checkpoints, metrics and plots go here; a run resumes from its latest checkpoint."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end and on a signal)."""
    keep: int = 2
    """Checkpoints kept (the newest ones)."""
    optimizer_format: str = "dp_reshardable"
    """Layout of the distributed optimizer's state in checkpoints (megatron-core's
    ``distrib_optim_sharding_type``): ``dp_reshardable`` (fast; resume at the same TP/PP, any DP)
    or ``fully_reshardable`` (gathered on save; resume at any TP/PP/DP)."""

    def __post_init__(self):
        if self.optimizer_format not in ("dp_reshardable", "fully_reshardable"):
            raise ValueError(
                "checkpoint.optimizer_format must be 'dp_reshardable' or 'fully_reshardable', "
                f"found {self.optimizer_format!r}"
            )


@dataclasses.dataclass
class RunConfig:
    """Everything ``tools/train.py`` needs."""

    model: Optional[ModelConfig] = None
    recipe: Any = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        from .training.recipes import RecipeConfig

        if self.recipe is None:
            self.recipe = RecipeConfig()

    # -- YAML ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        from .training.recipes import RecipeConfig

        sections = {"model": ModelConfig, "recipe": RecipeConfig, "data": DataConfig,
                    "train": TrainConfig, "checkpoint": CheckpointConfig}
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of sections, found {type(data).__name__}")
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {', '.join(unknown)}; expected {', '.join(sections)}")
        built = {}
        for name, klass in sections.items():
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{source}: section {name!r} must be a mapping")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(value) - known)
            if bad:
                raise ValueError(
                    f"{source}: unknown key(s) in {name!r}: {', '.join(bad)} "
                    f"(known: {', '.join(sorted(known))})"
                )
            try:
                built[name] = klass(**value)
            except TypeError as exc:
                raise ValueError(f"{source}: section {name!r}: {exc}") from None
        return cls(**built)

    @classmethod
    def load(cls, path: str, overrides: Optional[list] = None) -> "RunConfig":
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from None
        apply_overrides(data, overrides or [])
        return cls.from_dict(data, source=path)

    def save(self, path: str) -> None:
        import yaml

        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def apply_overrides(data: dict, overrides: list) -> None:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars/lists) in place."""
    import yaml

    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        section, field = key.split(".", 1)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][field] = yaml.safe_load(raw)
