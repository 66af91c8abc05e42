"""Step time of one layout: compute at a stated MFU, the pipeline bubble, and the communication
the trainer does not overlap.

FLOPs of a step (``T = global_batch * streams * L`` tokens through the layers; dual-stream recipes
run both streams, so their ``T`` is doubled):

* model FLOPs ``6 * N * T + 12 * pairs * a * d * layers * global_batch``, where ``N`` counts the
  matmul weights (the layers and the output layer; the embedding lookup is no matmul) and
  ``pairs`` the (query, key) pairs the layout allows in one sequence (``dual_context_causal``:
  ``L^2 + L B/2 + L/2``; ``dual_block_causal``: ``L^2 + L B``; ``causal``: ``L(L+1)/2``; the
  annealed layout is counted at its end, bidirectional: ``L^2``): forward ``4 * pairs * a * d``
  per layer, backward twice that;
* recomputation adds a forward: ``selective`` the core attention (``4 * pairs * a * d`` per
  layer) and the MLP (``2 * 3hf * T`` per layer), ``full`` the whole layer (``2 * N_layers * T``
  plus the attention forward).

A mixture-of-experts layer counts its active weights: the router (``hE``) and ``k`` experts
(``3 h f_e`` each) per token, in ``N`` and in what ``selective`` replays (the MoE block, megatron's
``moe`` module).

Compute time is the hardware FLOPs over ``world * peak * mfu`` (``mfu``: what the GPUs reach while
computing), stretched by the pipeline bubble ``(p - 1) / (v * m)``. Communication (bus bandwidth
``intra_node_gbs`` when a group stays in a node, ``inter_node_gbs`` otherwise; megatron orders
ranks TP, CP, DP, PP from fastest-varying) is added where the trainer does not overlap it:

* TP with sequence parallelism: per layer and micro-batch, 4 all-gathers / reduce-scatters of the
  ``s x b x h`` activation forward and 4 backward (2 more with ``selective``, the MLP's, and 4 more
  with ``full``), each moving
  ``(t - 1)/t`` of it; in a MoE layer only the attention's 4 (6 with ``full``) — its MLP half is
  the token dispatch below;
* MoE token dispatch, per MoE layer and micro-batch, by the layout's dispatcher
  (:attr:`.layouts.Layout.dispatcher`, the run config's ``train.moe_dispatcher``); ``n = s b / t``
  tokens on a TP rank, balanced routing:

  - ``allgather`` (over the TP x EP ranks, ``G = t * ep`` of them, when ``G > 1``): forward the
    all-gather of every rank's ``n`` tokens (bf16, ``2h`` a token), their routing probabilities
    (fp32, ``4E``) and mask (``E``), and the fp32 reduce-scatter of the combined expert outputs
    (``4h``); backward the reduce-scatters of the tokens' and probabilities' gradients
    (``2h + 4E``) and the all-gather of the output gradient (``4h``): ``12h + 9E`` bytes per
    gathered token, ``6h + 5E`` more when the layer is recomputed (``selective``, ``full``), each
    collective moving ``(G - 1)/G`` of the ``s b ep`` gathered tokens, at the bandwidth of a group
    spanning ``G`` GPUs;
  - ``alltoall``: over the EP ranks (when ``ep > 1``) each rank sends its ``n k`` rows, a token's
    copy per chosen expert, to the ranks holding those experts, ``(ep - 1)/ep`` of them leaving
    the rank: forward the tokens (bf16, ``2h``) with their probabilities (fp32, 4) and the expert
    outputs back (``2h``), backward the same again: ``8h + 8`` bytes a row, ``4h + 4`` more when
    the layer is recomputed. megatron's expert groups are TP-major (``tp-ep-dp-pp``), so the EP
    ranks lie ``t`` apart and span ``t * ep`` GPUs: the share sent to EP ranks in another node
    goes at ``inter_node_gbs``, the rest at ``intra_node_gbs``, both at once (the slower sets the
    time). With TP (when ``t > 1``) the rows are then all-gathered over the TP ranks and the
    outputs reduce-scattered in fp32 before they go back (sequence parallelism):
    ``(t - 1)/t`` of ``s b k`` rows, forward ``2h + 4`` and ``4h``, backward ``4h`` and
    ``2h + 4``: ``12h + 8`` bytes a row, ``6h + 4`` more when recomputed. (The per-expert token
    counts, ``E`` integers per rank, are left out.)
* CP: per layer and micro-batch, the key/value all-gather forward, its reduce-scatter backward,
  and the gather again when attention is recomputed;
* DP: the gradient reduce-scatter (fp32) and parameter all-gather (bf16) of the distributed
  optimizer over the DP x CP ranks, once a step (overlap is off in the trainer today); the
  experts' over their ``dp * cp / ep`` expert-data-parallel ranks;
* PP: the activation and its gradient across each stage boundary per micro-batch.

The effective MFU reported is model FLOPs over (step time x world x peak).
"""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from .layouts import BLOCK_SIZE, Cluster, Layout, Workload
from .parameters import layer_parameters, numel, rank_parameter_counts


@dataclasses.dataclass
class StepTime:
    seconds: float
    compute: float
    bubble: float
    """Seconds lost to the pipeline bubble."""
    tp_comm: float
    cp_comm: float
    dp_comm: float
    pp_comm: float
    ep_comm: float
    """Seconds of MoE token dispatch and combine (the layout's dispatcher, over its TP and EP ranks)."""
    model_tflop: float
    """Model FLOPs of one step / 1e12 (no recomputation)."""
    mfu: float
    """Effective model FLOPs utilisation of the whole step."""
    tokens_per_s: float
    """Training tokens (``global_batch * L``, one stream) per second."""


def attention_pairs(layout_name: str, L: int, B: int = BLOCK_SIZE) -> float:
    if layout_name == "dual_context_causal":
        return L * L + L * B / 2 + L / 2
    if layout_name == "dual_block_causal":
        return L * L + L * B
    if layout_name == "causal":
        return L * (L + 1) / 2
    return float(L) * L  # single_annealed ends bidirectional


def moe_layer_count(mc: ModelConfig) -> int:
    return sum(1 for i in range(mc.num_layers) if mc.is_moe_layer(i))


def mlp_matmul_params(mc: ModelConfig, moe: bool) -> int:
    """Weights one token goes through in a layer's MLP: the dense SwiGLU, or a MoE layer's router
    and ``moe_topk`` experts (0 for a dense model)."""
    if moe:
        if not mc.is_moe:
            return 0
        return mc.hidden_size * mc.num_experts + mc.moe_topk * 3 * mc.hidden_size * mc.moe_ffn_hidden_size
    return 3 * mc.hidden_size * mc.ffn_hidden_size


def matmul_params(mc: ModelConfig) -> tuple[int, int]:
    """(active weights of the layers' matmuls, weights of the output layer)."""
    attention = sum(numel(s) for n, s in layer_parameters(mc, 1, 0, moe=False)
                    if n.endswith("linear_proj.weight") or n.endswith("linear_qkv.weight"))
    n_moe = moe_layer_count(mc)
    layers = (attention * mc.num_layers + mlp_matmul_params(mc, False) * (mc.num_layers - n_moe)
              + mlp_matmul_params(mc, True) * n_moe)
    return layers, mc.vocab_size * mc.hidden_size


def model_flops(mc: ModelConfig, work: Workload) -> tuple[float, float]:
    """(model FLOPs of a step, the attention-score part of one forward over all layers)."""
    layers, output = matmul_params(mc)
    tokens = work.global_batch * work.streams * work.seq_len
    attn_fwd = (4 * attention_pairs(work.layout, work.seq_len) * mc.num_attention_heads
                * mc.kv_channels * mc.num_layers * work.global_batch)
    return 6 * (layers + output) * tokens + 3 * attn_fwd, attn_fwd


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s of a group whose ranks span ``span`` consecutive GPUs."""
    gbs = cluster.intra_node_gbs if span <= cluster.gpus_per_node else cluster.inter_node_gbs
    return gbs * 1e9


def _all_to_all_seconds(nbytes: float, ranks: int, stride: int, cluster: Cluster) -> float:
    """Seconds of an all-to-all in which every rank of a group of ``ranks`` ranks, ``stride``
    GPUs apart, sends ``nbytes`` spread evenly over the group (itself included): the share for
    ranks in another node at the inter-node bandwidth, the rest at the intra-node one, at once."""
    if ranks * stride <= cluster.gpus_per_node:
        same_node = ranks
    else:
        same_node = max(1, min(ranks, cluster.gpus_per_node // stride))
    inter = (ranks - same_node) / ranks * nbytes / (cluster.inter_node_gbs * 1e9)
    intra = (same_node - 1) / ranks * nbytes / (cluster.intra_node_gbs * 1e9)
    return max(inter, intra)


def dispatch_seconds(mc: ModelConfig, layout: Layout, tokens: int, cluster: Cluster) -> float:
    """Seconds of one MoE layer's token dispatch and combine for one micro-batch of ``tokens``
    tokens per TP group (``s * b``), forward and backward, plus the forward again when the layer
    is recomputed (see the module docstring)."""
    t, ep, h, e, k = layout.tp, layout.ep, mc.hidden_size, mc.num_experts, mc.moe_topk
    again = layout.recompute != "none"
    if layout.dispatcher == "allgather":
        group = t * ep
        if group == 1:
            return 0.0
        per_token = 12 * h + 9 * e + (6 * h + 5 * e if again else 0)
        return (group - 1) / group * tokens * ep * per_token / _bandwidth(cluster, group)
    if layout.dispatcher != "alltoall":
        raise ValueError(f"unknown MoE token dispatcher {layout.dispatcher!r}")
    seconds = 0.0
    if ep > 1:
        per_row = 8 * h + 8 + (4 * h + 4 if again else 0)
        seconds += _all_to_all_seconds(tokens // t * k * per_row, ep, t, cluster)
    if t > 1:
        per_row = 12 * h + 8 + (6 * h + 4 if again else 0)
        seconds += (t - 1) / t * tokens * k * per_row / _bandwidth(cluster, t)
    return seconds


def step_time(mc: ModelConfig, work: Workload, layout: Layout, cluster: Cluster) -> StepTime:
    t, p, v, cp, dp, b = layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp, layout.mbs
    m = layout.microbatches(work)
    flops, attn_fwd = model_flops(mc, work)
    layers, _ = matmul_params(mc)
    tokens = work.global_batch * work.streams * work.seq_len
    n_moe = moe_layer_count(mc)
    mlp_fwd = 2 * (mlp_matmul_params(mc, False) * (mc.num_layers - n_moe)
                   + mlp_matmul_params(mc, True) * n_moe) * tokens
    extra = {"none": 0.0, "selective": attn_fwd + mlp_fwd, "full": 2 * layers * tokens + attn_fwd}[layout.recompute]
    compute = (flops + extra) / (cluster.world * cluster.peak_tflops * 1e12 * cluster.mfu)
    bubble = compute * (p - 1) / (v * m)

    s = work.streams * work.seq_len // cp
    layers_per_stage = mc.num_layers // p
    act = s * b * mc.hidden_size * 2
    tp_comm = 0.0
    if t > 1:
        collectives = {"none": 8, "selective": 10, "full": 12}[layout.recompute]
        if n_moe:  # a MoE layer has only the attention's; its MLP half is the token dispatch
            attention_only = {"none": 4, "selective": 4, "full": 6}[layout.recompute]
            collectives = (collectives * (mc.num_layers - n_moe) + attention_only * n_moe) / mc.num_layers
        tp_comm = collectives * (t - 1) / t * act * layers_per_stage * m / _bandwidth(cluster, t)
    ep_comm = 0.0
    if n_moe:
        moe_per_stage = n_moe / mc.num_layers * layers_per_stage
        ep_comm = dispatch_seconds(mc, layout, s * b, cluster) * moe_per_stage * m
    cp_comm = 0.0
    if cp > 1:
        kv = 2 * work.seq_len * b * mc.num_query_groups * mc.kv_channels / t * 2
        passes = 2 if layout.recompute == "none" else 3
        cp_comm = passes * (cp - 1) / cp * kv * layers_per_stage * m / _bandwidth(cluster, t * cp)
    shards = dp * cp
    expert_shards = shards // layout.ep
    dp_comm = 0.0
    if shards > 1:
        per_stage = []
        for stage in (0, p - 1):
            dense, expert = rank_parameter_counts(mc, t, p, stage, ep=layout.ep, vpp=v)
            seconds = (4 + 2) * dense * (shards - 1) / shards / _bandwidth(cluster, t * shards)
            if expert and expert_shards > 1:
                seconds += (4 + 2) * expert * (expert_shards - 1) / expert_shards / _bandwidth(cluster, t * shards)
            per_stage.append(seconds)
        dp_comm = max(per_stage)
    pp_comm = 0.0
    if p > 1:
        pp_comm = 2 * m * v * act / t / _bandwidth(cluster, t * cp * dp * 2)
    seconds = compute + bubble + tp_comm + cp_comm + dp_comm + pp_comm + ep_comm
    mfu = flops / (seconds * cluster.world * cluster.peak_tflops * 1e12)
    return StepTime(seconds, compute, bubble, tp_comm, cp_comm, dp_comm, pp_comm, ep_comm, flops / 1e12, mfu,
                    work.global_batch * work.seq_len / seconds)
