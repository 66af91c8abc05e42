"""Mixture-of-experts training metrics: how each stream's tokens spread over the experts, and
megatron's router losses.

Expert load per stream. Dual-stream recipes run ``[x_t ; x_0]`` (and ``[x_t ; x_t' ; x_0]`` with
complementary masks) through every layer, so every MoE layer routes the noisy and the clean copy
of each token. A forward hook on each of megatron's ``TopKRouter`` reads its routing map
(``[tokens, experts]``, tokens in megatron's ``[s, b]`` order) and adds, per layer, stream and
expert, the tokens routed there. The stream of a position follows from the layout: the model's
sequence is the recipe's streams one after the other, each ``L`` long (``L / cp`` under context
parallelism, where every rank holds its positions of every stream), and a sequence-parallel rank
holds the ``tp_rank``-th contiguous slice of it. The hook only sums the routing map over the
micro-batch, per position; the step's end maps positions to streams. Only passes that build a
graph are counted (the rule megatron applies to its router losses), so an evaluation adds
nothing and a recomputed layer counts once. The counts are summed over the ranks of a pipeline
stage (data, context and, with sequence parallelism, tensor ranks see different tokens) and over
the stages. Per stream ``s`` a step's record gets

* ``expert_load_<s>``: the fraction of the stream's routed (token, expert) assignments that went
  to each expert, over all MoE layers (sums to 1; ``1 / num_experts`` each when balanced);
* ``expert_max_mean_<s>``: per MoE layer the most loaded expert's count over the mean count,
  averaged over the MoE layers (1 is perfect balance, ``num_experts / moe_topk`` the worst), and
  ``expert_max_mean_<s>_layers`` per MoE layer;
* with a noisy and a clean stream, ``expert_load_tv_noisy_clean``: the total-variation distance
  between the two streams' expert distributions per MoE layer, averaged over the MoE layers (0:
  both streams use the experts alike).

Router losses. megatron's ``TopKRouter`` attaches the load-balancing loss
(``moe_aux_loss_coeff``) and the z-loss (``moe_z_loss_coeff``) to the backward pass through
``MoEAuxLossAutoScaler``, whose gradient scale the pipeline schedule sets to
``cp / micro-batches`` before each micro-batch's backward; DDP's average over the data x context
ranks completes the mean over every micro-batch of the step. The objective is thus the recipe's
loss plus, per MoE layer, each coefficient times the mean over micro-batches of that layer's loss.
The router records each loss (without its coefficient) in megatron's tracker; :meth:`collect`
sums the load-balancing loss over its tensor x context group (each rank holds a partial sum), as
Megatron-LM's logging does, then averages both losses over the ranks of the stage (Megatron-LM
logs the z-loss of one data-parallel rank), and reports the mean over micro-batches and MoE
layers as ``moe_load_balancing_loss`` and ``moe_z_loss``, for the losses whose coefficient is not
0. The recipe's ``loss`` in the record stays the recipe's alone.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import ModelConfig

AUX_LOSSES = (("load_balancing_loss", "moe_aux_loss_coeff", "moe_load_balancing_loss"),
              ("z_loss", "moe_z_loss_coeff", "moe_z_loss"))
"""(megatron's tracker name, the ModelConfig coefficient, the metrics key)."""


class MoEMetrics:
    """Expert load per stream and router losses of one model on this rank (module docstring); for
    a dense model it hooks nothing and reports nothing.

    ``stream_len``: the positions of one stream on this rank (``seq_len / cp``);
    ``stage_group``: every rank of this pipeline stage (tensor x data x context parallel);
    ``pp_group``: the pipeline group; ``tp_rank`` / ``tp_size`` and ``sequence_parallel`` say
    which slice of the sequence a router sees."""

    def __init__(self, model, mc: ModelConfig, stream_len: int, stage_group, pp_group, tp_rank: int, tp_size: int,
                 sequence_parallel: bool, device):
        from megatron.core.transformer.moe.router import TopKRouter

        self.mc, self.stream_len, self.device = mc, stream_len, device
        self.stage_group, self.pp_group = stage_group, pp_group
        self.tp_rank, self.tp_size, self.sequence_parallel = tp_rank, tp_size, sequence_parallel
        self.moe_layers = [i for i in range(mc.num_layers) if mc.is_moe_layer(i)]
        self.counts: dict[int, torch.Tensor] = {}
        """Per layer index, the tokens routed to each expert at each local position ``[s, experts]``,
        summed over the micro-batches of the step so far."""
        self.handles = [m.register_forward_hook(self._count) for m in model.modules() if isinstance(m, TopKRouter)]

    @classmethod
    def attach(cls, model, mc: ModelConfig, train, device) -> "MoEMetrics":
        """The metrics of ``model`` trained with ``train`` (a TrainConfig), with megatron's groups
        of the current parallel layout."""
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        stage = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        return cls(model, mc, train.seq_len // train.cp, stage, ps.get_pipeline_model_parallel_group(),
                   ps.get_tensor_model_parallel_rank(), tp, train.sequence_parallel and tp > 1, device)

    def _count(self, router, args, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        hidden, routing_map = args[0], output[1]
        per_position = routing_map.detach().reshape(hidden.shape[0], hidden.shape[1], -1).sum(1)
        layer = router.layer_number - 1
        self.counts[layer] = self.counts[layer] + per_position if layer in self.counts else per_position

    def collect(self, num_micro: int, streams: tuple[str, ...]) -> dict:
        """The metrics of the training step just run, whose model sequence was ``streams``
        (``Recipe.streams``) over ``num_micro`` micro-batches; the same on every rank (a
        collective over the stage and pipeline groups). Starts the next step's counts."""
        if not self.mc.is_moe:
            return {}
        counts = torch.zeros(self.mc.num_layers, len(streams), self.mc.num_experts, dtype=torch.float64,
                             device=self.device)
        for layer, per_position in self.counts.items():
            s = per_position.shape[0]
            first = self.tp_rank * s if self.sequence_parallel else 0
            stream = torch.div(torch.arange(first, first + s), self.stream_len, rounding_mode="floor")
            counts[layer].index_add_(0, stream.to(self.device), per_position.to(self.device, torch.float64))
        self.counts = {}
        dist.all_reduce(counts, group=self.stage_group)
        if not self.sequence_parallel:
            counts /= self.tp_size  # tensor-parallel ranks routed the same tokens
        dist.all_reduce(counts, group=self.pp_group)
        out = load_metrics(counts[self.moe_layers].cpu(), tuple(streams))
        out.update(self._router_losses(num_micro))
        return out

    def _router_losses(self, num_micro: int) -> dict:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        out = {}
        for name, coeff, key in AUX_LOSSES:
            if not getattr(self.mc, coeff) or name not in tracker:
                continue
            values = tracker[name]["values"].to(self.device, torch.float64)
            if tracker[name].get("reduce_group") is not None:
                dist.all_reduce(values, group=tracker[name]["reduce_group"])
            dist.all_reduce(values, group=self.stage_group)
            values /= dist.get_world_size(self.stage_group)
            dist.all_reduce(values, group=self.pp_group)
            out[key] = float(values[self.moe_layers].mean()) / num_micro
        clear_aux_losses_tracker()
        return out


def load_metrics(counts: torch.Tensor, streams: tuple[str, ...]) -> dict:
    """The expert-load entries of a step's record from ``counts [moe layers, streams, experts]``
    (the tokens each layer routed to each expert, per stream; module docstring)."""
    out = {}
    per_layer = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    for i, name in enumerate(streams):
        total = counts[:, i].sum(0)
        out[f"expert_load_{name}"] = (total / total.sum().clamp_min(1)).tolist()
        ratio = counts[:, i].max(-1).values / counts[:, i].mean(-1).clamp_min(1e-12)
        out[f"expert_max_mean_{name}"] = float(ratio.mean())
        out[f"expert_max_mean_{name}_layers"] = ratio.tolist()
    if "noisy" in streams and "clean" in streams:
        noisy, clean = per_layer[:, streams.index("noisy")], per_layer[:, streams.index("clean")]
        out["expert_load_tv_noisy_clean"] = float(0.5 * (noisy - clean).abs().sum(-1).mean())
    return out
