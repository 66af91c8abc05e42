"""One forward (and backward) pass over a global batch's micro-batches through megatron-core's
pipeline schedule, with the recipe's forward-and-loss, and the reduction of the loss parts.

Process groups are explicit: the step reduces over ``dp_group`` and broadcasts from the last
pipeline stage over ``pp_group``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .. import compat
from ..data.datasets import doc_ids_from_eod
from .recipes import Recipe, StepContext


@dataclasses.dataclass
class StepSettings:
    """What every micro-batch of a run shares."""

    recipe: Recipe
    seed: int
    mask_token_id: Optional[int]
    eod_id: int
    seq_len: int
    micro_batch_size: int
    loss_kwargs: dict
    device: torch.device
    validate_noise: bool


def forward_step_func(settings: StepSettings, step: int, block_size: int):
    """megatron's ``forward_step_func`` for one step: the recipe's forward and loss, packed as
    ``[loss, diffusion, ar]`` for the loss function the schedule calls."""
    recipe = settings.recipe

    def forward_step(data_iterator: Iterator, model):
        tokens, sample_index = next(data_iterator)
        tokens = tokens.to(settings.device)
        doc_ids = doc_ids_from_eod(tokens, settings.eod_id) if recipe.cfg.pack_documents else None
        ctx = StepContext(step=step, block_size=block_size, seed=settings.seed,
                          mask_token_id=settings.mask_token_id, doc_ids=doc_ids,
                          loss_kwargs=settings.loss_kwargs, validate_noise=settings.validate_noise)
        out, loss_fn = recipe.forward_and_loss(tokens, sample_index, model, ctx)
        if out.hidden is not None:  # not the last pipeline stage
            return out.hidden, lambda x: (x.sum() * 0.0, {})
        parts = loss_fn(out)
        packed = torch.stack([parts.loss, parts.diffusion, parts.ar]).float()
        return packed, lambda x: (x[0], {"parts": x.detach().clone()})

    return forward_step


def run_micro_batches(settings: StepSettings, model, step: int, block_size: int, batches: list,
                      forward_only: bool) -> list:
    """Run ``batches`` through the pipeline schedule; returns the schedule's per-micro-batch
    results (on the last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with compat.cpu_device_mode():
        return get_forward_backward_func()(
            forward_step_func=forward_step_func(settings, step, block_size),
            data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
            seq_length=settings.recipe.stream_length(settings.seq_len, block_size),
            micro_batch_size=settings.micro_batch_size, forward_only=forward_only,
        )


def reduce_parts(results: list, last_stage: bool, dp_group, pp_group, dp_size: int,
                 device: torch.device) -> torch.Tensor:
    """Mean (loss, diffusion, ar) over micro-batches and data-parallel ranks, on every rank."""
    if last_stage and results:
        parts = torch.stack([r["parts"] for r in results]).mean(0).to(torch.float64).cpu()
    else:
        parts = torch.zeros(3, dtype=torch.float64)
    parts = parts.to(device)
    dist.all_reduce(parts, group=dp_group)
    parts /= dp_size
    dist.all_reduce(parts, group=pp_group)  # from the last pipeline stage to all stages
    return parts.cpu()
