"""One forward (and backward) pass over a global batch's micro-batches through megatron-core's
pipeline schedule, with the recipe's forward-and-loss, and the reduction of the loss parts.

Process groups are explicit: the step reduces over the data x context parallel group
(``dp_group``; megatron's with context parallelism) and broadcasts from the last pipeline stage
over ``pp_group``.

Normalisation (docs/method.md, "Losses"). megatron's schedule divides each micro-batch's loss by
the number of micro-batches and its DDP averages gradients over data-parallel ranks. Before the
schedule runs, :func:`step_normaliser` counts the step's loss-bearing targets over every
micro-batch of every data-parallel rank, ``N``, and every micro-batch divides its loss sums by
``N / (micro-batches x DP)``; the two means then give exactly (sum of all loss sums) / ``N``,
whatever the loss masks, the micro-batch split or the DP size. Without loss masks every
micro-batch counts the same, and that divisor is each one's own count, as before.

Context parallelism (``cp`` ranks per data-parallel rank, each with the same micro-batches and
its own positions of them): every rank's loss sums cover its own targets, and the sequence's loss
is their sum over the CP ranks. megatron's schedule multiplies each micro-batch's loss by ``cp``
before the backward pass and its DDP averages gradients over the data x context parallel ranks,
which together make that sum. The counts summed over the data x context parallel group count
every data-parallel rank's micro-batches ``cp`` times, which leaves ``N / (micro-batches x DP)``
unchanged; the reported parts are summed over the CP ranks (:func:`reduce_parts`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .. import compat
from ..data.datasets import doc_ids_from_eod
from .losses import num_target_tokens
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
    dp_group: object = None
    """The data x context parallel group the step's loss-token count is summed over; None:
    megatron's (its parallel state must be initialised)."""
    cp: int = 1
    """Context-parallel size: the split of the stream length between pipeline stages."""


def _loss_mask(batch) -> Optional[torch.Tensor]:
    """The loss mask of a micro-batch ``(tokens, sample_index[, loss_mask])``, or None."""
    return batch[2] if len(batch) > 2 else None


def step_normaliser(batches: list, dp_group, device: torch.device) -> float:
    """``N / (micro-batches x DP)``: the step's loss-bearing targets ``N`` (this rank's
    ``batches`` summed over ``dp_group``, at least 1) per micro-batch (see the module
    docstring)."""
    local = 0.0
    for batch in batches:
        mask = _loss_mask(batch)
        local += float(num_target_tokens(mask)) if mask is not None else batch[0].shape[0] * (batch[0].shape[1] - 1)
    total = torch.tensor([local, float(len(batches))], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=dp_group)
    count, micro = float(total[0]), float(total[1])
    return max(count, 1.0) / max(micro, 1.0)


def forward_step_func(settings: StepSettings, step: int, block_size: int, normaliser: Optional[float] = None):
    """megatron's ``forward_step_func`` for one step: the recipe's forward and loss, packed as
    ``[loss, diffusion, ar]`` for the loss function the schedule calls. Micro-batches are
    ``(tokens, sample_index)`` or ``(tokens, sample_index, loss_mask)``; ``normaliser`` is the
    losses' divisor (:func:`step_normaliser`; None: each micro-batch's own count)."""
    recipe = settings.recipe

    def forward_step(data_iterator: Iterator, model):
        batch = next(data_iterator)
        tokens, sample_index, loss_mask = batch[0], batch[1], _loss_mask(batch)
        tokens = tokens.to(settings.device)
        if loss_mask is not None:
            loss_mask = loss_mask.to(settings.device)
        doc_ids = doc_ids_from_eod(tokens, settings.eod_id) if recipe.cfg.pack_documents else None
        ctx = StepContext(step=step, block_size=block_size, seed=settings.seed,
                          mask_token_id=settings.mask_token_id, doc_ids=doc_ids,
                          loss_kwargs=settings.loss_kwargs, validate_noise=settings.validate_noise,
                          loss_mask=loss_mask, normaliser=normaliser)
        out, loss_fn = recipe.forward_and_loss(tokens, sample_index, model, ctx)
        if out.hidden is not None:  # not the last pipeline stage
            return out.hidden, lambda x: (x.sum() * 0.0, {})
        parts = loss_fn(out)
        packed = torch.stack([parts.loss, parts.diffusion, parts.ar]).float()
        return packed, lambda x: (x[0], {"parts": x.detach().clone()})

    return forward_step


def run_micro_batches(settings: StepSettings, model, step: int, block_size: int, batches: list,
                      forward_only: bool) -> list:
    """Run ``batches`` through the pipeline schedule, every loss divided by the step's
    :func:`step_normaliser`; returns the schedule's per-micro-batch results (on the last
    stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_group = (settings.dp_group if settings.dp_group is not None
                else ps.get_data_parallel_group(with_context_parallel=True))
    normaliser = step_normaliser(batches, dp_group, settings.device)
    with compat.cpu_device_mode():
        return get_forward_backward_func()(
            forward_step_func=forward_step_func(settings, step, block_size, normaliser),
            # the interleaved schedule (train.vpp) takes a list of model chunks, each reading the
            # micro-batches through its own iterator
            data_iterator=[iter(batches) for _ in model] if isinstance(model, list) else iter(batches),
            model=model if isinstance(model, list) else [model], num_microbatches=len(batches),
            seq_length=settings.recipe.stream_length(settings.seq_len, block_size) // settings.cp,
            micro_batch_size=settings.micro_batch_size, forward_only=forward_only,
        )


def reduce_parts(results: list, last_stage: bool, dp_group, pp_group, dp_size: int,
                 device: torch.device) -> torch.Tensor:
    """(loss, diffusion, ar) on every rank: the mean over micro-batches and data-parallel ranks of
    the sum over context-parallel ranks. ``dp_group`` is the data x context parallel group, whose
    sum is divided by ``dp_size``, the data-parallel size alone."""
    if last_stage and results:
        parts = torch.stack([r["parts"] for r in results]).mean(0).to(torch.float64).cpu()
    else:
        parts = torch.zeros(3, dtype=torch.float64)
    parts = parts.to(device)
    dist.all_reduce(parts, group=dp_group)
    parts /= dp_size
    dist.all_reduce(parts, group=pp_group)  # from the last pipeline stage to all stages
    return parts.cpu()
