"""The model, its megatron-core DDP wrapper, optimizer and LR scheduler, and their sharded state.

The optimizer is megatron-core's (distributed with CUDA; the plain one on CPU, where the
distributed one cannot run) with gradient clipping; the scheduler is its
``OptimizerParamScheduler``.

Mixture-of-experts models: megatron-core's DDP keeps the gradients of expert-parallel parameters
in buffers of their own, reduced over the expert-data-parallel group and pre-scaled by its size
over the data x context parallel size (so every expert gradient is the same mean as a dense one),
and its optimizer steps them in a second, chained optimizer whose gradient norm is summed over
the expert-parallel ranks. megatron marks expert parameters so only at ``ep > 1``;
:func:`mark_expert_params` marks them at every ``ep``, so that the optimizer (one chained
optimizer for the dense and one for the expert parameters) and its sharded state have the same
structure at any ``ep`` and a checkpoint saved at one resumes at another (the experts' sharded
keys carry their global expert index already).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from .. import compat
from ..config import ModelConfig, TrainConfig


class ModelChunks(list):
    """The DDP-wrapped model chunks of a rank under the interleaved pipeline (``train.vpp``): a
    list, as megatron's schedule takes them, that also answers the calls the trainer makes on one
    model."""

    def zero_grad_buffer(self) -> None:
        for chunk in self:
            chunk.zero_grad_buffer()

    def train(self) -> None:
        for chunk in self:
            chunk.train()

    def eval(self) -> None:
        for chunk in self:
            chunk.eval()


@dataclasses.dataclass
class ModelAndOptimizer:
    model: object
    """The DDP-wrapped model (what the pipeline schedule runs); :class:`ModelChunks` with
    ``train.vpp > 1``."""
    inner: object
    """The :class:`~megatron_nbdiff.models.NBDiffModel` inside the wrappers; with ``train.vpp > 1``
    a ``torch.nn.ModuleList`` of one per chunk."""
    optimizer: object
    scheduler: object
    num_params: int
    """Parameters of the whole model (all TP shards and PP stages, and every expert: each
    expert-parallel rank holds ``1 / ep`` of them)."""

    def sharded_state(self, optimizer_format: str, loading: bool = False, with_optimizer: bool = True) -> dict:
        """Model (and optimizer) state for ``dist_checkpointing``. The distributed optimizer's
        state is laid out as ``optimizer_format`` (megatron-core's ``distrib_optim_sharding_type``:
        ``dp_reshardable`` or ``fully_reshardable``); the plain optimizer ignores it."""
        if isinstance(self.inner, torch.nn.ModuleList):  # virtual pipeline chunks: keys are global
            model_sd = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(self.inner)}
        else:
            model_sd = self.inner.sharded_state_dict()
        if not with_optimizer:
            return {"model": model_sd}
        metadata = {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)}

    def load_checkpoint(self, path: str, record: dict) -> None:
        """Load model, optimizer and scheduler state from the training checkpoint at ``path``
        (its ``trainer_state.json`` is ``record``); resharded to the current layout."""
        from megatron.core import dist_checkpointing

        first = int(record["step"]) == 0  # no optimizer step yet: no Adam moments to restore
        if not first:
            self.materialise_optimizer_state()
        wanted = self.sharded_state(record.get("optimizer_format", "dp_reshardable"), loading=True,
                                    with_optimizer=not first)
        with compat.cpu_device_mode():
            loaded = dist_checkpointing.load(wanted, path)
        if isinstance(self.inner, torch.nn.ModuleList):
            for i, chunk in enumerate(self.inner):
                chunk.gpt.load_state_dict(loaded["model"][f"chunk{i}"])
        else:
            self.inner.gpt.load_state_dict(loaded["model"])
        if "optimizer" in loaded:
            self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(record["scheduler"])

    def materialise_optimizer_state(self) -> None:
        """Give a fresh distributed optimizer its Adam state before a checkpoint is loaded into it.

        Without Apex or Transformer Engine, megatron-core's DistributedOptimizer reads the torch
        Adam ``step`` of every parameter when it builds its state dict, and a fresh optimizer has
        none. One Adam step on zero gradients of the fp32 main parameters creates the state
        tensors; the load then overwrites all of them (and the main parameters)."""
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not isinstance(opt, DistributedOptimizer) or len(opt.optimizer.state) > 0:
                continue
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            opt.optimizer.step()
            opt.optimizer.zero_grad(set_to_none=True)


def build_model_and_optimizer(mc: ModelConfig, t: TrainConfig, dtype: str, first_stage: bool,
                              last_stage: bool, model_parallel_group, device) -> ModelAndOptimizer:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..models import NBDiffModel, unwrap_model

    cuda = torch.cuda.is_available()
    from megatron.core import parallel_state as ps

    vpp = t.vpp if t.vpp > 1 else None
    tc = mc.transformer_config(tp=t.tp, pp=t.pp, ep=t.ep, moe_dispatcher=t.moe_dispatcher, dtype=dtype,
                               sequence_parallel=t.sequence_parallel, context_parallel_size=t.cp,
                               virtual_pipeline_model_parallel_size=vpp,
                               **t.recompute_overrides(mc.num_layers // (t.pp * t.vpp)))
    tc.finalize_model_grads_func = finalize_model_grads
    torch.manual_seed(t.seed)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=cuda,
                                            overlap_grad_reduce=False, average_in_collective=True)
    chunks = []
    for stage in range(t.vpp) if vpp else [None]:  # interleaved: chunk i holds virtual stage i
        pre = first_stage if vpp is None else ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = last_stage if vpp is None else ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = NBDiffModel(mc, tc, pre_process=pre, post_process=post, parallel_output=True, vp_stage=stage)
        mark_expert_params(model)
        if cuda:
            model.cuda(torch.cuda.current_device())
        if dtype == "bf16":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(tc, model)
        chunks.append(DistributedDataParallel(tc, ddp_cfg, model, disable_bucketing=bool(stage)))
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=dtype == "bf16", params_dtype=tc.params_dtype,
        use_distributed_optimizer=cuda,
    )
    with compat.cpu_device_mode():
        optimizer = get_megatron_optimizer(opt_cfg, chunks)
    decay_style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[t.lr_schedule]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps, lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style=decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.steps, wd_incr_style="constant",
        wsd_decay_steps=t.wsd_decay_steps if decay_style == "WSD" else None,
        lr_wsd_decay_style="cosine" if decay_style == "WSD" else None,
    )
    # [dense, expert] parameters of this rank's TP shard and stage, summed over them; the experts
    # are split evenly over the expert-parallel ranks
    params = [p for chunk in chunks for p in chunk.parameters()]
    totals = torch.tensor([sum(p.numel() for p in params if getattr(p, "allreduce", True)),
                           sum(p.numel() for p in params if not getattr(p, "allreduce", True))],
                          dtype=torch.float64, device=device)
    dist.all_reduce(totals, group=model_parallel_group)  # nccl needs device tensors
    num_params = int(totals[0].item() + totals[1].item() * t.ep)
    if vpp is None:
        return ModelAndOptimizer(chunks[0], unwrap_model(chunks[0]), optimizer, scheduler, num_params)
    return ModelAndOptimizer(ModelChunks(chunks), torch.nn.ModuleList([unwrap_model(c) for c in chunks]),
                             optimizer, scheduler, num_params)


def mark_expert_params(model) -> int:
    """Mark the routed experts' parameters of every megatron ``MoELayer`` in ``model`` as
    expert-parallel (``allreduce = False``, what megatron sets at ``ep > 1``), whatever the expert
    parallel size (module docstring); returns how many were marked. Call before the DDP wrapper
    and the optimizer are built."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    marked = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            for p in module.experts.parameters():
                p.allreduce = False
                marked += 1
    return marked


def optimizer_step(optimizer) -> tuple[bool, float]:
    """One optimizer step (with clipping); returns (whether it was applied, the gradient norm)."""
    with compat.cpu_device_mode():
        ok, grad_norm, _ = optimizer.step()
    return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")


def peak_flops_per_token(num_params: int, mc: ModelConfig, seq: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls plus the attention scores
    (6 * layers * heads * head_dim * seq, causal-like density). For a mixture-of-experts model
    ``N`` counts the parameters a token uses: the ``num_experts - moe_topk`` SwiGLU experts a
    token skips in each MoE layer (``3 * hidden * moe_ffn_hidden_size`` weights each) are left
    out of ``num_params``."""
    if mc.is_moe:
        moe_layers = sum(1 for i in range(mc.num_layers) if mc.is_moe_layer(i))
        num_params -= moe_layers * (mc.num_experts - mc.moe_topk) * 3 * mc.hidden_size * mc.moe_ffn_hidden_size
    return 6 * num_params + 6 * mc.num_layers * mc.num_attention_heads * mc.kv_channels * seq


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: Optional[float], world: int) -> Optional[float]:
    """Model FLOPs utilisation; None without a peak (CPU without ``train.peak_tflops``)."""
    if peak_tflops is None and torch.cuda.is_available():
        peak_tflops = 989.0  # H100 bf16 dense
    if peak_tflops is None:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * world)
