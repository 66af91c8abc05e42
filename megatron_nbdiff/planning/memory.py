"""Per-GPU memory of one layout: weights, gradients, optimizer state, activations, attention
buffers and logits, on the first and on the last pipeline stage (the two that can peak).

Model state (bytes per element of the rank's DDP buffers, :mod:`.parameters`): bf16 weights 2,
fp32 main gradients 4 (megatron DDP with ``grad_reduce_in_fp32``), distributed-optimizer state 12
per parameter (fp32 master copy, Adam ``m`` and ``v``) sharded over the DP x CP ranks; the
experts' state is sharded over their own expert-data-parallel group, ``dp * cp / ep`` ranks.

Activations per layer follow Korthikanti et al. (2022, "Reducing Activation Recomputation in
Large Transformer Models"), redone for this model: RMSNorm, SwiGLU, GQA, no dropout, a
flash-style core attention (FlexAttention: it keeps ``Q, K, V``, its output and the log-sum-exp,
never an ``s x s`` score matrix), sequence parallelism whenever TP > 1. For ``s`` tokens per
micro-batch sequence on one CP rank (``streams * L / cp``), micro-batch ``b`` and TP ``t``, one
layer keeps ``s * b / t`` times (bf16 = 2 bytes a value):

* ``recompute=none``: ``8h + 6ad + 4gd + 10f + 4a + 8`` — the two norm inputs and the two linear
  inputs they feed (2h each), ``Q`` (2ad), ``K, V`` (4gd), the attention output kept by the core
  attention and again as ``linear_proj``'s input (2ad each, 4ad together), its fp32 log-sum-exp (4a), the
  SwiGLU's ``fc1`` output (4f), ``silu`` output (2f), the linear half plus megatron's GLU offset
  (``x_linear + glu_linear_offset``: a new tensor, 2f), their product (``fc2`` input, 2f), and the
  norms' fp32 ``1/rms`` (8); Qwen3-style q/k norms add ``2(a+g)d``. The MLP's ``10f``
  (:func:`mlp_bytes_per_token`) was checked against the tensors a bf16 SwiGLU MLP saves for its
  backward (tests/test_plan.py).
* ``selective`` (the run config's ``train.recompute: selective`` with ``recompute_modules:
  [core_attn, mlp]``, :data:`.layouts.SELECTIVE_MODULES`: megatron replays the core attention and the
  whole SwiGLU MLP in the backward pass, keeping their inputs): ``8h + 4ad + 4gd + 8`` — the
  norms and their outputs as before, ``Q, K, V`` (the core attention's saved inputs) and the
  attention output as ``linear_proj``'s input, the ``1/rms`` values; no log-sum-exp, no ``10f``.
  (Recomputing only the norms and the SwiGLU activation, Korthikanti's cheaper selective set,
  is not available for a dense MLP in megatron-core 0.16.1, so it is not planned.)
* ``full`` (megatron's uniform method, one layer per checkpoint): the layer input ``2h``, plus
  one layer's ``none`` activations while it is recomputed in the backward pass.

Mixture-of-experts layers (megatron-core 0.16.1's ``MoELayer`` as the trainer builds it: fp32
router, ``SequentialMLP`` experts whose tensor parallelism is TP, no token dropping, and the token
dispatcher of ``train.moe_dispatcher``, :attr:`.layouts.Layout.dispatcher`). Routing is assumed
balanced: a TP rank's ``n = s b / t`` tokens make ``n k`` (token, expert) rows (``k`` the experts
per token), and the rank's experts receive ``n k t`` rows, whichever the dispatcher (the
all-gather brings the TP x EP group's ``n t ep`` tokens and keeps ``k / ep`` of their
assignments; the all-to-all brings the ``n k`` rows routed to the rank's experts from its EP
group, then gathers them over TP). The attention half of the layer and the pre-MLP norm keep what
a dense layer keeps; in place of ``10f`` the MoE block keeps, per token of the TP rank (times
``s * b / t``):

* the router: the top-k indices (int64, ``8k``) and, with renormalised top-k (megatron's softmax
  over the k chosen logits), that softmax (fp32, ``4k``) — else the softmax over all experts
  (``4E``);
* the dispatcher, where the two differ. ``allgather``: for every gathered token (``t ep`` per
  token) the routing mask over the rank's ``E / ep`` experts and the fp32 probabilities it
  selects from (``masked_select`` keeps both: ``5E / ep`` a gathered token, ``5Et``), and the
  permutation indices of the rank's rows (int64: ``8kt``). ``alltoall``: the same mask and
  probabilities over all ``E`` experts, but for the rank's own tokens only (``5E``), and the
  indices of their ``k`` copies (``8k``); the all-to-alls and the TP gather keep nothing;
* the experts, per row (``kt`` rows per token of the TP rank): ``fc1``'s input, whole on every TP
  rank (``2h``), its output (``4f_e / t``), the ``silu`` output, the linear half plus megatron's
  GLU offset (a copy) and their product (``2f_e / t`` each), the product scaled by the fp32
  routing probability (``fc2``'s input, ``2f_e / t``) and that probability (4).

Together ``router + 5Et + kt(2h + 12) + 12 k f_e`` with ``allgather`` and ``router + 5E + 8k +
kt(2h + 4) + 12 k f_e`` with ``alltoall`` (the same at TP 1). :func:`moe_block_bytes` counts
them for given token and row counts; tests/test_plan.py checks it against the tensors a bf16 MoE
layer saves for its backward, with both dispatchers at EP=1, EP=2 and TP=2 (the rows counted
there, not assumed balanced). ``selective`` recomputes the MoE block too (``moe`` joins
``recompute_modules``; megatron's ``mlp`` module only covers dense layers) and keeps only its
input, plus one layer's MoE block while it is replayed; ``full`` as for dense layers. A stage's
layers are weighted by how many of them are MoE layers.

Layers in flight on stage ``k`` of ``p`` with ``m`` micro-batches: 1F1B keeps ``min(p - k, m)``
micro-batches of its ``layers / p`` layers; the interleaved schedule with ``v`` virtual stages
keeps ``min(2(p - k - 1) + (v - 1)p + 1, m v)`` chunks of ``layers / (p v)`` layers (on the first
stage ``layers * (1 + (p - 1)/(p v))`` layer-activations, Korthikanti's figure).

Attention buffers: under CP each rank all-gathers the keys and values of one stream (the clean
stream in dual layouts, the whole stream otherwise): ``(cp - 1)/cp * 2 * L * b * g d / t * 2``
bytes per layer, kept for the backward pass without recomputation (plus one more as the
reduce-scatter buffer of their gradients); with recomputation only those two transient buffers
remain. The FlexAttention block mask is 32 bytes per 128 x 128 tile per micro-batch in flight.

Logits on the last stage (one micro-batch at a time): the final norm keeps ``4h + 4`` bytes per
token on its rank; the vocabulary-parallel cross-entropy (``training/losses.py``) holds the bf16
logits of all streams (2 bytes per value), the fp32 copy, shifted values and exponentials of the
stream being scored (12) and the saved fp32 softmax of the stream scored before (4), over
``V_pad / t`` columns.
"""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from .layouts import Cluster, Layout, Workload
from .parameters import grad_buffers, rank_layers, rank_parameter_counts

GIB = 1024 ** 3


@dataclasses.dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    stage: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    attention: int
    logits: int
    reserve: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.attention
                + self.logits + self.reserve)

    def gib(self) -> dict:
        return {k: round(v / GIB, 3) for k, v in dataclasses.asdict(self).items() if k != "stage"} | {
            "stage": self.stage, "total": round(self.total / GIB, 3)}


def mlp_bytes_per_token(mc: ModelConfig) -> int:
    """Bytes a dense SwiGLU MLP keeps for the backward pass per token of one TP rank times TP,
    besides its input: ``10f`` (see the module docstring)."""
    return 10 * mc.ffn_hidden_size


def moe_block_bytes(mc: ModelConfig, tokens: int, rows: int, tp: int = 1, ep: int = 1,
                    dispatcher: str = "allgather") -> int:
    """Bytes a MoE layer's router, dispatcher and experts keep for the backward pass on one rank
    whose TP rank routes ``tokens`` tokens and whose experts receive ``rows`` (token, expert)
    rows, besides the layer's input (see the module docstring)."""
    h, e, k, f = mc.hidden_size, mc.num_experts, mc.moe_topk, mc.moe_ffn_hidden_size
    router = (12 * k if mc.moe_norm_topk_prob else 4 * e + 8 * k) * tokens
    experts = rows * (2 * h + 4 + 12 * f // tp)
    if dispatcher == "allgather":
        dispatch = 5 * (e // ep) * tokens * tp * ep + 8 * rows
    elif dispatcher == "alltoall":
        dispatch = (5 * e + 8 * k) * tokens
    else:
        raise ValueError(f"unknown MoE token dispatcher {dispatcher!r}")
    return router + dispatch + experts


def moe_block_bytes_per_token(mc: ModelConfig, tp: int = 1, ep: int = 1, dispatcher: str = "allgather") -> int:
    """:func:`moe_block_bytes` per token of one TP rank times TP under balanced routing: each
    token's rank receives ``k t`` rows."""
    return moe_block_bytes(mc, 1, mc.moe_topk * tp, tp, ep, dispatcher)


def layer_activation_bytes_per_token(mc: ModelConfig, recompute: str, moe: bool = False, tp: int = 1,
                                     ep: int = 1, dispatcher: str = "allgather") -> int:
    """Bytes one layer (a MoE layer with ``moe``, at TP ``tp`` and EP ``ep`` with the token
    ``dispatcher``) keeps per token on one TP rank times TP (see the module docstring)."""
    h, a, g, d = mc.hidden_size, mc.num_attention_heads, mc.num_query_groups, mc.kv_channels
    qk = 2 * (a + g) * d if mc.qk_layernorm else 0
    if recompute == "none":
        mlp = moe_block_bytes_per_token(mc, tp, ep, dispatcher) if moe else mlp_bytes_per_token(mc)
        return 8 * h + 6 * a * d + 4 * g * d + mlp + 4 * a + 8 + qk
    if recompute == "selective":
        return 8 * h + 4 * a * d + 4 * g * d + 8 + qk
    if recompute == "full":
        return 2 * h
    raise ValueError(f"unknown recompute {recompute!r}")


def stage_activation_bytes_per_token(mc: ModelConfig, layout: Layout, stage: int) -> tuple[float, int]:
    """(bytes per token and layer-activation, averaged over the stage's dense and MoE layers; the
    bytes per token of what one layer adds while it is recomputed in the backward pass)."""
    rc, t = layout.recompute, layout.tp
    moe_layout = dict(tp=t, ep=layout.ep, dispatcher=layout.dispatcher)
    layers = rank_layers(mc, layout.pp, stage, layout.vpp)
    n_moe = sum(1 for i in layers if mc.is_moe_layer(i))
    dense = layer_activation_bytes_per_token(mc, rc)
    replay = layer_activation_bytes_per_token(mc, "none", moe=n_moe > 0, **moe_layout) if rc == "full" else 0
    if n_moe == 0:
        return dense, replay
    moe = layer_activation_bytes_per_token(mc, rc, moe=True, **moe_layout)
    if rc == "selective":  # one layer's MoE block while it is replayed
        replay = moe_block_bytes_per_token(mc, **moe_layout)
    return (moe * n_moe + dense * (len(layers) - n_moe)) / len(layers), replay


def layers_in_flight(mc: ModelConfig, layout: Layout, stage: int, microbatches: int) -> float:
    """Layer-activations (layers x micro-batches) a stage keeps at its peak."""
    p, v = layout.pp, layout.vpp
    per_stage = mc.num_layers // p
    if v == 1:
        return min(p - stage, microbatches) * per_stage
    chunks = min(2 * (p - stage - 1) + (v - 1) * p + 1, microbatches * v)
    return chunks * per_stage / v


def stage_memory(mc: ModelConfig, work: Workload, layout: Layout, cluster: Cluster,
                 stage: int) -> StageMemory:
    t, cp, b = layout.tp, layout.cp, layout.mbs
    m = layout.microbatches(work)
    last = stage == layout.pp - 1
    dp_shards = layout.dp * cp  # the distributed optimizer shards over data x context parallel ranks
    expert_shards = dp_shards // layout.ep  # ... and the experts over the expert-data-parallel ranks
    buffer = sum(grad_buffers(mc, t, layout.pp, stage, dp=dp_shards, ep=layout.ep, vpp=layout.vpp))
    dense, expert = rank_parameter_counts(mc, t, layout.pp, stage, ep=layout.ep, vpp=layout.vpp)
    weights, grads = 2 * buffer, 4 * buffer
    optimizer = -(-12 * dense // dp_shards) + -(-12 * expert // expert_shards)

    s = work.streams * work.seq_len // cp  # tokens of one sequence on this CP rank
    tokens = s * b / t  # per TP rank (sequence parallelism)
    in_flight = layers_in_flight(mc, layout, stage, m)
    per_layer, replay = stage_activation_bytes_per_token(mc, layout, stage)
    acts = per_layer * tokens * in_flight
    if replay:  # one layer's activations while it is recomputed
        acts += replay * tokens

    gd = mc.num_query_groups * mc.kv_channels
    gather = (cp - 1) / cp * 2 * work.seq_len * b * gd / t * 2 if cp > 1 else 0.0
    kept = in_flight if layout.recompute == "none" else 0
    attention = gather * (kept + 2)
    tiles_q, tiles_k = -(-s // 128), -(-(work.streams * work.seq_len) // 128)
    # micro-batches with activations in flight (interleaved: at most 2p, an upper bound)
    microbatches_in_flight = min(layout.pp - stage if layout.vpp == 1 else 2 * layout.pp, m)
    attention += 32 * tiles_q * tiles_k * b * microbatches_in_flight

    logits = 0.0
    if last:
        vocab = mc.padded_vocab_size(t) // t
        stream = work.seq_len // cp
        logits = (4 * mc.hidden_size + 4) * tokens
        logits += vocab * b * (2 * s + 12 * stream + 4 * (s - stream))
    return StageMemory(stage, int(weights), int(grads), int(optimizer), int(acts), int(attention),
                       int(logits), int(cluster.reserve_gib * GIB))


def peak_memory(mc: ModelConfig, work: Workload, layout: Layout, cluster: Cluster) -> StageMemory:
    """The stage (first or last) with the most memory."""
    stages = {0, layout.pp - 1}
    return max((stage_memory(mc, work, layout, cluster, k) for k in sorted(stages)),
               key=lambda sm: sm.total)
