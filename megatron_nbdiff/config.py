"""Dataclass configs: the model, the recipe and the run tree (YAML in and out).

This module is a leaf: it imports nothing of the package but the file writer, so loading a
config never imports megatron-core or torch. Every field has a docstring; choice fields are
``Literal`` types. :func:`coerce_fields` type-checks every section against its field types when a
config is built from YAML or overrides, coercing what YAML reads as a string (``lr: 3e-4``) and
refusing the rest with one line that names the key, the expected type and what was found. The
lowering of :class:`ModelConfig` to megatron-core's ``TransformerConfig`` lives beside the models
(``megatron_nbdiff/models/transformer_config.py``); run validation that needs more than one
section lives in ``megatron_nbdiff/training/validation.py``.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Optional

from .errors import ConfigError
from .fileio import atomic_write

AttentionBackend = Literal["dense", "flex"]
Dtype = Literal["auto", "bf16", "fp32"]
LRSchedule = Literal["cosine", "wsd", "constant"]
NaNPolicy = Literal["stop", "skip"]
WeightMode = Literal["one", "inv_t"]
TMode = Literal["per_block", "per_sequence"]
TSampling = Literal["uniform", "antithetic", "stratified"]
OptimizerFormat = Literal["dp_reshardable", "fully_reshardable"]
Recompute = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
MoeDispatcher = Literal["auto", "allgather", "alltoall"]
# megatron-core's selective-recompute modules that this model has: no MLA; ``moe_act`` needs
# grouped GEMM; ``layernorm`` goes through ``CheckpointWithoutOutput``, which in megatron-core
# 0.16.1 always takes its FP8 path (``self.fp8 = fp8 is not None``) and so needs Transformer Engine
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe")


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
    rope_scaling: Optional[dict] = None
    """RoPE frequency scaling as the HF config gives it (``rope_parameters`` without
    ``rope_theta``): None for plain RoPE, or ``{"rope_type": "linear", "factor": ...}``,
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` or ``{"rope_type": "yarn", "factor",
    "original_max_position_embeddings"}`` plus YaRN's optional ``attention_factor``,
    ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``truncate``. The frequencies
    are computed as transformers computes them (``megatron_nbdiff/models/rope.py``)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    attention_backend: AttentionBackend = "dense"
    """``dense`` (SDPA with a boolean mask, the CPU reference) or ``flex`` (FlexAttention)."""
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this times the tensor-parallel size."""

    # -- mixture of experts (all unset for a dense model; see check_moe_fields) --------------
    num_experts: Optional[int] = None
    """Routed experts of each MoE layer; None: a dense model (the other ``moe_*`` fields unset).
    Every MoE layer routes each token to ``moe_topk`` of them through a linear router without
    bias whose logits are computed in fp32: softmax over all experts, the top ``moe_topk``,
    renormalised to sum to 1 when ``moe_norm_topk_prob`` (HF Qwen3-MoE, Mixtral). No shared
    expert, no capacity limit: no token is ever dropped."""
    moe_topk: Optional[int] = None
    """Experts per token (HF ``num_experts_per_tok``); required with ``num_experts``."""
    moe_ffn_hidden_size: Optional[int] = None
    """SwiGLU inner width of one expert (HF ``moe_intermediate_size``; Mixtral's
    ``intermediate_size``); None means ``ffn_hidden_size``. ``ffn_hidden_size`` stays the width
    of the dense layers."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k probabilities to sum to 1 (HF ``norm_topk_prob``; Mixtral always)."""
    moe_dense_layers: Optional[list] = None
    """0-based indices of the layers that keep a dense SwiGLU MLP of width ``ffn_hidden_size``
    (HF Qwen3-MoE: ``mlp_only_layers`` plus the layers ``decoder_sparse_step`` skips); None or
    empty: every layer is a MoE layer (Mixtral)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss coefficient (megatron-core's ``aux_loss``, the Switch
    Transformer loss over each micro-batch's tokens). Default 0: the base models were pretrained
    with a balancing loss (Mixtral's config: ``router_aux_loss_coef`` 0.02; Qwen3-MoE: a
    global-batch balancing loss, ``router_aux_loss_coef`` 0.001), so adaptation starts from a
    balanced router, and megatron's micro-batch loss is a different objective than Qwen3's
    global-batch one that would pull the router away from its learned specialisation. Set it
    (e.g. to the base model's coefficient) if the expert load drifts during adaptation."""
    moe_z_loss_coeff: float = 0.0
    """Router z-loss coefficient (ST-MoE: the squared log-sum-exp of the router logits). Default
    0: neither base family was trained with one (their HF configs have no z-loss)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, found {value!r}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ConfigError(
                f"ModelConfig.num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        check_moe_fields(self)
        _check_literals(self, "model")

    @property
    def is_moe(self) -> bool:
        """Whether the model has mixture-of-experts layers."""
        return self.num_experts is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether (0-based) ``layer`` is a MoE layer."""
        return self.is_moe and layer not in (self.moe_dense_layers or ())

    @property
    def stacked_layers(self) -> bool:
        """Whether megatron-core stores the layers stacked (one checkpoint tensor per parameter
        with a leading layer axis): a dense model, or a MoE model whose every layer is a MoE layer
        (lowered as ``moe_layer_freq=1``). With dense layers among MoE ones the lowering gives
        megatron the list form of ``moe_layer_freq``, and megatron stores each layer under its own
        keys (``decoder.layers.<i>.``; ``checkpoint/mapping.py``)."""
        return not (self.is_moe and self.moe_dense_layers)

    def moe_layer_pattern(self) -> Optional[list]:
        """Per layer 1 (MoE) or 0 (dense), megatron-core's ``moe_layer_freq`` list form; None for a
        dense model."""
        if not self.is_moe:
            return None
        return [1 if self.is_moe_layer(i) else 0 for i in range(self.num_layers)]

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding rows after padding for tensor parallelism."""
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; a dense model leaves the MoE fields out, so its dict (and the
        ``nbdiff.json`` and run configs holding it) is what it was before MoE existed."""
        out = dataclasses.asdict(self)
        if not self.is_moe:
            for name in MOE_FIELDS:
                out.pop(name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**coerce_fields(cls, data, "model"))

    def transformer_config(self, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                           sequence_parallel: bool = False, ep: int = 1, **overrides: Any):
        """megatron-core ``TransformerConfig`` for this architecture at a parallel layout (see
        :func:`megatron_nbdiff.models.transformer_config.transformer_config`)."""
        from .models.transformer_config import transformer_config

        return transformer_config(self, tp=tp, pp=pp, dtype=dtype, sequence_parallel=sequence_parallel,
                                  ep=ep, **overrides)


MOE_FIELDS = ("num_experts", "moe_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob", "moe_dense_layers",
              "moe_aux_loss_coeff", "moe_z_loss_coeff")
"""The :class:`ModelConfig` fields of mixture-of-experts models."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_moe_fields(mc: "ModelConfig") -> None:
    """The MoE fields of ``mc`` checked (and ``moe_ffn_hidden_size`` / ``moe_dense_layers``
    normalised): all at their defaults for a dense model; for a MoE model a positive expert
    count, ``1 <= moe_topk <= num_experts``, dense-layer indices in range, at least one MoE
    layer, coefficients >= 0, and no top-1 renormalised routing (every token's expert would get
    weight exactly 1, which megatron-core's router cannot express)."""
    where = "ModelConfig"
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = getattr(mc, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}.{name} must be a number >= 0, found {value!r}")
    if not isinstance(mc.moe_norm_topk_prob, bool):
        raise ConfigError(f"{where}.moe_norm_topk_prob must be true or false, found {mc.moe_norm_topk_prob!r}")
    if mc.num_experts is None:
        set_fields = [n for n in ("moe_topk", "moe_ffn_hidden_size") if getattr(mc, n) is not None]
        set_fields += ["moe_dense_layers"] if mc.moe_dense_layers else []
        set_fields += [n for n in ("moe_aux_loss_coeff", "moe_z_loss_coeff") if getattr(mc, n)]
        if set_fields:
            raise ConfigError(
                f"{where}.{set_fields[0]} is set but num_experts is null (a dense model); set "
                "num_experts for a mixture-of-experts model"
            )
        return
    if not _positive_int(mc.num_experts):
        raise ConfigError(f"{where}.num_experts must be a positive int or null, found {mc.num_experts!r}")
    if mc.moe_topk is None:
        raise ConfigError(f"{where}.moe_topk (experts per token) is required with num_experts={mc.num_experts}")
    if not _positive_int(mc.moe_topk) or mc.moe_topk > mc.num_experts:
        raise ConfigError(
            f"{where}.moe_topk must be an int in [1, num_experts={mc.num_experts}], found {mc.moe_topk!r}"
        )
    if mc.moe_topk == 1 and mc.moe_norm_topk_prob:
        raise ConfigError(
            f"{where}: moe_topk=1 with moe_norm_topk_prob=true weights every token's expert by exactly 1, "
            "which megatron-core's router cannot reproduce; use moe_norm_topk_prob=false or moe_topk > 1"
        )
    if mc.moe_ffn_hidden_size is None:
        mc.moe_ffn_hidden_size = mc.ffn_hidden_size
    if not _positive_int(mc.moe_ffn_hidden_size):
        raise ConfigError(f"{where}.moe_ffn_hidden_size must be a positive int, found {mc.moe_ffn_hidden_size!r}")
    dense = list(mc.moe_dense_layers or [])
    for i in dense:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < mc.num_layers:
            raise ConfigError(
                f"{where}.moe_dense_layers must hold layer indices in [0, num_layers={mc.num_layers}), "
                f"found {i!r}"
            )
    if len(set(dense)) != len(dense):
        raise ConfigError(f"{where}.moe_dense_layers lists a layer twice: {dense}")
    if len(dense) == mc.num_layers:
        raise ConfigError(
            f"{where}.moe_dense_layers makes every layer dense; a dense model has num_experts null"
        )
    mc.moe_dense_layers = sorted(dense)


# RoPE scaling types the model computes exactly as transformers does: type -> (required keys,
# optional keys). Other HF types (``dynamic``, ``longrope``, ...) change with the sequence length
# or need per-dimension tables, and are refused.
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
}
_ROPE_INT_KEYS = ("original_max_position_embeddings",)
_ROPE_NONNEGATIVE_KEYS = ("mscale", "mscale_all_dim")  # zero is meaningful (means "unset")
_ROPE_BOOL_KEYS = ("truncate",)


def check_rope_scaling(value: Any) -> dict:
    """``value`` checked as :attr:`ModelConfig.rope_scaling`: a known ``rope_type``, its required
    keys, no unknown key, positive numbers (optional keys may be null). Returns a copy."""
    where = "ModelConfig.rope_scaling"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping or null, found {value!r}")
    rope_type = value.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        raise ConfigError(
            f"{where}.rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(sorted(ROPE_SCALING_KEYS))} (plain RoPE: rope_scaling null)"
        )
    required, optional = ROPE_SCALING_KEYS[rope_type]
    missing = [k for k in required if value.get(k) is None]
    if missing:
        raise ConfigError(f"{where} ({rope_type}) lacks {', '.join(missing)}")
    unknown = sorted(set(value) - set(required) - set(optional) - {"rope_type"})
    if unknown:
        raise ConfigError(f"{where} ({rope_type}) has unknown key(s) {', '.join(unknown)}")
    for key in required + optional:
        v = value.get(key)
        if v is None:
            continue
        if key in _ROPE_BOOL_KEYS:
            if not isinstance(v, bool):
                raise ConfigError(f"{where}.{key} must be true or false, found {v!r}")
            continue
        number = (int,) if key in _ROPE_INT_KEYS else (int, float)
        if isinstance(v, bool) or not isinstance(v, number):
            kind = "an int" if key in _ROPE_INT_KEYS else "a number"
            raise ConfigError(f"{where}.{key} must be {kind}, found {v!r}")
        if v < 0 or (v == 0 and key not in _ROPE_NONNEGATIVE_KEYS):
            raise ConfigError(f"{where}.{key} must be positive, found {v!r}")
    if rope_type == "llama3" and not value["high_freq_factor"] > value["low_freq_factor"]:
        raise ConfigError(
            f"{where}: high_freq_factor ({value['high_freq_factor']}) must exceed low_freq_factor "
            f"({value['low_freq_factor']})"
        )
    return dict(value)


# --------------------------------------------------------------------------------------------
# The run config tree: YAML in and out, ``section.key=value`` overrides, unknown keys refused.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecipeConfig:
    """Which recipe, and any departures from its defaults (None = the recipe's default). The
    recipes themselves (their defaults, layout, noise and loss) are objects in
    ``megatron_nbdiff/training/recipes.py``; the name is checked against them when a run is
    validated, so a recipe registered by user code is a valid name too."""

    name: str = "nbdiff"
    """nbdiff, transplant, block_causal, diffullama, ar, or a registered recipe's name."""
    ar_weight: Optional[float] = None
    """lambda, the weight of the clean-stream AR loss (dual-stream recipes)."""
    block_size: Optional[int] = None
    """Fixed block size; None means the recipe's own (its curriculum, or 32)."""
    block_max: int = 32
    """Curriculum target B_max."""
    block_factor: int = 2
    """Curriculum growth factor r."""
    block_interval: int = 500
    """Curriculum steps per growth D."""
    block_offset: int = 0
    """Curriculum start step s_0."""
    anneal_steps: int = 1000
    """DiffuLLaMA attention-mask annealing length K (0: bidirectional from the start)."""
    weight_mode: Optional[WeightMode] = None
    """Diffusion loss weight per masked token: 'one' or 'inv_t' (None: the recipe's)."""
    t_mode: Optional[TMode] = None
    """One t 'per_block' or 'per_sequence' (None: the recipe's)."""
    t_sampling: TSampling = "uniform"
    """How the batch's t are drawn: 'uniform', 'antithetic' or 'stratified'."""
    eps: float = 1e-3
    """Lower end of t ~ U(eps, 1)."""
    mask_token_id: Optional[int] = None
    """Mask token id; None takes it from the init checkpoint's nbdiff.json."""
    pack_documents: bool = True
    """Restrict attention to document boundaries inside packed sequences."""
    complementary: bool = False
    """Dual-stream recipes: two noise draws per sample whose masked sets are complements within
    each block's eligible positions, run as one ``[x_t ; x_t' ; x_0]`` forward
    (docs/method.md, "Instruction tuning")."""

    def __post_init__(self):
        _check_literals(self, "recipe")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"recipe.eps must be in (0, 1), found {self.eps}")
        if self.ar_weight is not None and self.ar_weight < 0:
            raise ConfigError(f"recipe.ar_weight must be >= 0, found {self.ar_weight}")
        if self.anneal_steps < 0:
            raise ConfigError(f"recipe.anneal_steps must be >= 0, found {self.anneal_steps}")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"recipe.block_size must be >= 1, found {self.block_size}")
        for name in ("block_max", "block_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"recipe.{name} must be >= 1, found {getattr(self, name)}")
        for name in ("block_interval", "block_offset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"recipe.{name} must be >= 0, found {getattr(self, name)}")


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
    loss_mask: bool = False
    """Read a per-token loss mask from each prefix's sibling dataset ``<prefix>.loss_mask``
    (``tools/preprocess_data.py --format chat``): tokens with mask 0 are never noised nor counted
    in a loss (docs/method.md, "Instruction tuning"). False: every token carries loss."""


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
    lr_schedule: LRSchedule = "cosine"
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
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (megatron's interleaved 1F1B schedule; with
    ``pp > 1``): each rank holds ``vpp`` chunks of ``num_layers / (pp * vpp)`` layers, and the
    micro-batches of a step must be a multiple of ``pp``. docs/architecture.md, "Interleaved
    pipeline"."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (with tp > 1)."""
    cp: int = 1
    """Context-parallel size: every stream's positions split over ``cp`` ranks (megatron's
    load-balanced split into ``2 cp`` chunks; ``seq_len`` a multiple of ``2 cp`` times the largest
    block size). docs/architecture.md, "Context parallelism"."""
    ep: int = 1
    """Expert-parallel size (mixture-of-experts models only): every MoE layer's experts split over
    ``ep`` ranks, carved out of the data-parallel ranks (``ep`` divides ``num_experts`` and the
    data-parallel size). Routers, attention and dense layers stay data-parallel; a checkpoint
    resumes at any ``ep``."""
    moe_dispatcher: MoeDispatcher = "auto"
    """megatron-core's token dispatcher of the MoE layers (mixture-of-experts models; a dense model
    ignores it): 'allgather' (every rank of the TP x EP group receives every token of the group and
    keeps those routed to its experts: the traffic grows with ``ep``), 'alltoall' (each token's
    ``moe_topk`` routed copies go only to the EP ranks holding their experts, then are gathered
    over TP), or 'auto': 'alltoall' when ``ep > 1``, 'allgather' at ``ep = 1``.

    Why this default: both compute the same layer (on CPU with gloo, EP=2 with 'alltoall' trains
    with the EP=1 losses and gradient norms step for step, and gives exactly the steps of
    'allgather' at EP=2; tests/test_moe_training.py), and 'alltoall' is megatron's dispatcher for
    expert parallelism, whose traffic does not grow with the EP group. At ``ep = 1`` there is no
    EP traffic to save and its TP gather of ``k`` copies per token is larger than the all-gather's
    one copy. It is not always the faster at ``ep > 1``: with many experts per token and a small
    EP group inside a node 'allgather' can move fewer bytes; the capacity planner
    (docs/plans.md) estimates both and writes the faster one explicitly. The dispatcher does not
    change the checkpoint: a run may resume with another one."""
    dtype: Dtype = "auto"
    """'auto' (bf16 with CUDA, fp32 without), 'bf16' or 'fp32'."""
    log_interval: int = 1
    """Steps between console / metrics lines."""
    eval_interval: int = 0
    """Steps between held-out evaluations (0: never)."""
    eval_iters: int = 2
    """Global batches per evaluation."""
    nan_policy: NaNPolicy = "stop"
    """A NaN/Inf loss: 'stop' (save nothing, exit with a message) or 'skip' (drop the step)."""
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU; None: 989 (H100 bf16 dense) with CUDA, no MFU on CPU."""
    recompute: Recompute = "none"
    """Activation recomputation (docs/architecture.md, "Activation recomputation"): 'none'; 'selective'
    (megatron's selective recompute of ``recompute_modules``: the core attention, whose ``O(S^2)``
    work is cheap to redo next to the activations it would keep, by default); 'full' (whole layers
    are replayed in the backward pass: ``recompute_method`` and ``recompute_num_layers``)."""
    recompute_modules: Optional[list] = None
    """With 'selective': megatron module names among core_attn, mlp, moe; None: core_attn."""
    recompute_method: RecomputeMethod = "uniform"
    """With 'full': 'uniform' (the layers of a stage in groups of ``recompute_num_layers``, each
    group's input kept) or 'block' (only the first ``recompute_num_layers`` layers of each
    pipeline stage recomputed)."""
    recompute_num_layers: int = 1
    """With 'full': the group size ('uniform') or the number of recomputed layers per stage ('block')."""

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "seq_len", "tp", "pp", "vpp", "cp", "ep",
                     "log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, found {getattr(self, name)}")
        _check_literals(self, "train")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, found {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.wsd_decay_steps < 0:
            raise ConfigError("train.warmup_steps, eval_interval and wsd_decay_steps must be >= 0")
        if not isinstance(self.recompute_num_layers, int) or self.recompute_num_layers < 1:
            raise ConfigError(f"train.recompute_num_layers must be an int >= 1, found {self.recompute_num_layers!r}")
        if self.recompute_modules is not None:
            if self.recompute != "selective":
                raise ConfigError(f"train.recompute_modules applies to train.recompute 'selective', not "
                                  f"{self.recompute!r}")
            bad = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES] if isinstance(
                self.recompute_modules, list) else [self.recompute_modules]
            if bad or not self.recompute_modules:
                raise ConfigError(f"train.recompute_modules must be a non-empty list of "
                                  f"{', '.join(RECOMPUTE_MODULES)}; found {self.recompute_modules!r}")

    def recompute_overrides(self, layers_per_stage: int) -> dict:
        """megatron ``TransformerConfig`` fields for :attr:`recompute` (a stage of
        ``layers_per_stage`` layers); a 'block' count beyond the stage is refused."""
        if self.recompute == "none":
            return {}
        if self.recompute == "selective":
            return dict(recompute_granularity="selective",
                        recompute_modules=list(self.recompute_modules or ["core_attn"]))
        if self.recompute_method == "block" and self.recompute_num_layers > layers_per_stage:
            raise ConfigError(f"train.recompute_num_layers {self.recompute_num_layers} exceeds the {layers_per_stage} "
                              "layers of a pipeline stage (recompute_method 'block')")
        return dict(recompute_granularity="full", recompute_method=self.recompute_method,
                    recompute_num_layers=min(self.recompute_num_layers, layers_per_stage))


def resolve_moe_dispatcher(choice: str, ep: int) -> str:
    """The token dispatcher a :attr:`TrainConfig.moe_dispatcher` choice means at expert-parallel
    size ``ep``: 'auto' is 'alltoall' when ``ep > 1``, else 'allgather'."""
    if choice not in typing.get_args(MoeDispatcher):
        raise ConfigError(f"train.moe_dispatcher must be one of {', '.join(typing.get_args(MoeDispatcher))}, "
                          f"found {choice!r}")
    if choice == "auto":
        return "alltoall" if ep > 1 else "allgather"
    return choice


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
    optimizer_format: OptimizerFormat = "dp_reshardable"
    """Layout of the distributed optimizer's state in checkpoints (megatron-core's
    ``distrib_optim_sharding_type``): ``dp_reshardable`` (fast; resume at the same TP/PP, any DP)
    or ``fully_reshardable`` (gathered on save; resume at any TP/PP/DP)."""

    def __post_init__(self):
        _check_literals(self, "checkpoint")
        if self.save_interval < 0:
            raise ConfigError(f"checkpoint.save_interval must be >= 0, found {self.save_interval}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, found {self.keep}")


@dataclasses.dataclass
class RunConfig:
    """Everything ``tools/train.py`` needs."""

    model: Optional[ModelConfig] = None
    recipe: RecipeConfig = dataclasses.field(default_factory=RecipeConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.recipe is None:
            self.recipe = RecipeConfig()

    # -- YAML ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.model is not None:
            out["model"] = self.model.to_dict()  # a dense model's dict has no MoE fields
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        sections = {"model": ModelConfig, "recipe": RecipeConfig, "data": DataConfig,
                    "train": TrainConfig, "checkpoint": CheckpointConfig}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, found {type(data).__name__}")
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; expected {', '.join(sections)}")
        built = {}
        for name, klass in sections.items():
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(value) - known)
            if bad:
                raise ConfigError(
                    f"{source}: unknown key(s) in {name!r}: {', '.join(bad)} "
                    f"(known: {', '.join(sorted(known))})"
                )
            try:
                built[name] = klass(**coerce_fields(klass, value, name))
            except TypeError as exc:
                raise ConfigError(f"{source}: section {name!r}: {exc}") from None
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        return cls(**built)

    @classmethod
    def load(cls, path: str, overrides: Optional[list] = None) -> "RunConfig":
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
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
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        section, field = key.split(".", 1)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][field] = yaml.safe_load(raw)


# --------------------------------------------------------------------------------------------
# Field type checks
# --------------------------------------------------------------------------------------------


def _check_literals(obj: Any, section: str) -> None:
    """Refuse a value outside a ``Literal`` field's choices (also for configs built in Python)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = _literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(
                f"{section}.{f.name} must be one of {', '.join(map(str, choices))}, found {value!r}"
            )


def _literal_choices(tp: Any) -> Optional[tuple]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return args
    if typing.get_origin(tp) is typing.Union:
        for a in args:
            if typing.get_origin(a) is Literal:
                return typing.get_args(a)
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``: strings YAML left unparsed (``3e-4``, ``1_000``) become numbers,
    ints become floats where a float is wanted; anything else that does not fit is refused."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, found {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return [value]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, found {value!r} ({type(value).__name__})")


def coerce_fields(klass: type, values: dict, section: str) -> dict:
    """``values`` with every field coerced to ``klass``'s annotation (see :func:`_coerce`)."""
    hints = typing.get_type_hints(klass)
    return {k: _coerce(v, hints[k], f"{section}.{k}") if k in hints else v for k, v in values.items()}
