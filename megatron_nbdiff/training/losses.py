"""Losses with the shift convention: the logit at position ``i`` predicts token ``i + 1``.

* Diffusion loss (dual stream): for every masked position ``j``, cross-entropy of ``x_j`` under
  the noisy-stream logit at ``j - 1`` (same block, since a block's first token is never masked),
  weighted 1 or ``1/t``.
* AR loss: next-token cross-entropy on the clean-stream logits at every valid position.
* ``L = L_diff + lambda * L_AR``; both sums are divided by one normaliser, the number of valid
  target tokens (positions ``1..L-1`` with ``loss_mask == 1``), so the two terms count comparable
  numbers of tokens.
* Single-stream (DiffuLLaMA): the diffusion loss alone over one noisy stream (weights ``1/t``).
* Complementary masks (:func:`complementary_stream_loss`): the diffusion sums of the two noisy
  views added, the AR sum of the one clean stream, one normaliser.

The normaliser is this micro-batch's count by default; the training step passes ``normaliser``,
the mean count per micro-batch over the whole step (all micro-batches, all data-parallel ranks),
so that megatron's mean over micro-batches and ranks gives (sum of loss sums) / (global count)
when loss masks make the counts differ (docs/method.md, "Losses").

Logits are ``[b, L, V]``, or ``[b, L, V/tp]`` when a tensor-parallel ``tp_group`` is given (the
cross-entropy then reduces over that group). Cross-entropy is computed in fp32.

Under context parallelism a rank's logits hold only its ``positions`` of each stream
(``StreamLogits.positions``, ``[L/cp]``) while ids, weights and masks are whole ``[b, L]`` (every
rank has the whole sample): the logit at position ``p`` is scored against token ``p + 1``, and the
last position ``L - 1`` has no target. Each rank's sums then cover its own targets, and the sums
over the CP ranks are the whole sequence's (the normaliser is the whole sequence's count).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Logit given to padded vocabulary rows: exp() of it is 0 in fp32, and it stays finite, so a
# tensor-parallel partition made only of padding cannot produce inf - inf.
_PAD_LOGIT = -1.0e9


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits split over the vocabulary across ``group`` (each rank holds the
    columns ``[start, start + V/tp)``): the max, the target logit and the sum of exponentials are
    all-reduced over ``group``; the backward is ``softmax - onehot`` on the local columns, so the
    replicated loss gives every rank the gradient of its own partition (megatron-core's scheme,
    with the process group passed in instead of read from global state)."""

    @staticmethod
    def forward(ctx, logits, targets, group, start):
        part = logits.shape[-1]
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top.unsqueeze(-1)
        local = (targets >= start) & (targets < start + part)
        idx = (targets - start).clamp(0, part - 1)
        picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * local
        dist.all_reduce(picked, group=group)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), idx, local)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, local = ctx.saved_tensors
        g = softmax.scatter_add(-1, idx.unsqueeze(-1), -local.unsqueeze(-1).to(softmax.dtype))
        return g * grad.unsqueeze(-1), None, None, None


def token_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy ``[b, n]`` of ``targets [b, n]`` under ``logits [b, n, V]``.

    ``tp_group``: None when the logits hold the whole vocabulary; the tensor-parallel process
    group when each rank holds its vocabulary partition ``[b, n, V/tp]``. ``vocab_size`` (the real
    vocabulary) excludes the rows added by padding for tensor parallelism from the softmax, so the
    loss does not depend on the padded size (which grows with TP)."""
    if tp_group is not None:
        logits = logits.float()
        part = logits.shape[-1]
        start = dist.get_rank(group=tp_group) * part
        if vocab_size is not None and start + part > vocab_size:
            pad = torch.arange(start, start + part, device=logits.device) >= vocab_size
            logits = logits.masked_fill(pad, _PAD_LOGIT)
        return _VocabParallelCrossEntropy.apply(logits, targets, tp_group, start)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    b, n, v = logits.shape
    return F.cross_entropy(
        logits.reshape(b * n, v).float(), targets.reshape(b * n), reduction="none"
    ).view(b, n)


@dataclasses.dataclass
class LossParts:
    """The scalar loss to back-propagate and its detached parts (all already normalised)."""

    loss: torch.Tensor
    diffusion: torch.Tensor
    ar: torch.Tensor
    num_tokens: torch.Tensor
    num_masked: torch.Tensor


def _shifted(mask_like: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Targets at positions 1..L-1, aligned with logits at 0..L-2; with ``positions`` (context
    parallelism), the values at ``positions + 1``, aligned with the logits at ``positions`` (zero
    where ``positions + 1 == L``, the one position without a target)."""
    if positions is None:
        return mask_like[:, 1:]
    L = mask_like.shape[1]
    nxt = positions + 1
    picked = mask_like[:, nxt.clamp(max=L - 1)]
    return torch.where(nxt < L, picked, torch.zeros_like(picked))


def _scored(logits: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """The logits that have targets in :func:`_shifted`'s alignment."""
    return logits[:, :-1] if positions is None else logits


def num_target_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    """The shared normaliser: valid target positions (1..L-1 with loss_mask == 1)."""
    return _shifted(loss_mask).float().sum()


def diffusion_token_losses(
    noisy_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    weight: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted per-target diffusion losses ``[b, L-1]`` (``[b, L/cp]`` with ``positions``);
    ``weight`` is 0 where not masked."""
    ce = token_cross_entropy(_scored(noisy_logits, positions), _shifted(clean_ids, positions), tp_group, vocab_size)
    return ce * _shifted(weight, positions).float()


def ar_token_losses(
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-target next-token losses ``[b, L-1]`` (``[b, L/cp]`` with ``positions``; zero where
    ``loss_mask`` is 0)."""
    ce = token_cross_entropy(_scored(clean_logits, positions), _shifted(clean_ids, positions), tp_group, vocab_size)
    return ce * _shifted(loss_mask, positions).float()


def _normaliser(loss_mask: torch.Tensor, normaliser) -> tuple[torch.Tensor, torch.Tensor]:
    """(divisor, this micro-batch's own count): ``normaliser`` when given, else the count (at
    least 1)."""
    n = num_target_tokens(loss_mask).clamp(min=1.0)
    if normaliser is None:
        return n, n
    return torch.as_tensor(normaliser, dtype=torch.float32, device=n.device), n


def complementary_stream_loss(
    views: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    ar_weight: float,
    tp_group=None,
    vocab_size: Optional[int] = None,
    normaliser=None,
    positions: Optional[torch.Tensor] = None,
) -> LossParts:
    """``L_diff + ar_weight * L_AR`` over any number of noisy views ``(logits, weight, is_masked)``
    of one clean stream: the views' weighted diffusion sums are added and share the AR term's
    normaliser (two views with complementary masks train every eligible token once; no view: the
    block-size-1 step, ``ar_weight * L_AR`` alone)."""
    n, count = _normaliser(loss_mask, normaliser)
    ar = ar_token_losses(clean_logits, clean_ids, loss_mask, tp_group, vocab_size, positions).sum() / n
    if not views:
        diff = clean_logits.new_zeros((), dtype=torch.float32)
        masked = diff.new_zeros(())
    else:
        total = sum(diffusion_token_losses(logits, clean_ids, weight, tp_group, vocab_size, positions).sum()
                    for logits, weight, _ in views)
        diff = total / n
        masked = sum(_shifted(is_masked, positions).float().sum() for _, _, is_masked in views)
    return LossParts(
        loss=diff + ar_weight * ar, diffusion=diff.detach(), ar=ar.detach(),
        num_tokens=count.detach(), num_masked=masked.detach(),
    )


def dual_stream_loss(
    noisy_logits: Optional[torch.Tensor],
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    weight: Optional[torch.Tensor],
    is_masked: Optional[torch.Tensor],
    loss_mask: torch.Tensor,
    ar_weight: float,
    tp_group=None,
    vocab_size: Optional[int] = None,
    normaliser=None,
    positions: Optional[torch.Tensor] = None,
) -> LossParts:
    """NBDiff / transplant / block-causal loss ``L_diff + ar_weight * L_AR``.

    ``noisy_logits=None`` is the block-size-1 case, where the noisy stream has no masked
    positions and is skipped: only ``ar_weight * L_AR`` remains."""
    views = [] if noisy_logits is None else [(noisy_logits, weight, is_masked)]
    return complementary_stream_loss(views, clean_logits, clean_ids, loss_mask, ar_weight, tp_group,
                                     vocab_size, normaliser, positions)


def single_stream_loss(
    noisy_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    weight: torch.Tensor,
    is_masked: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
    normaliser=None,
    positions: Optional[torch.Tensor] = None,
) -> LossParts:
    """DiffuLLaMA loss: masked tokens under the shifted logits of the single noisy stream."""
    n, count = _normaliser(loss_mask, normaliser)
    diff = diffusion_token_losses(noisy_logits, clean_ids, weight, tp_group, vocab_size, positions).sum() / n
    zero = diff.new_zeros(())
    return LossParts(
        loss=diff, diffusion=diff.detach(), ar=zero, num_tokens=count.detach(),
        num_masked=_shifted(is_masked, positions).float().sum().detach(),
    )


def ar_loss(
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
    normaliser=None,
    positions: Optional[torch.Tensor] = None,
) -> LossParts:
    """Plain next-token training (the ``ar`` recipe)."""
    n, count = _normaliser(loss_mask, normaliser)
    ar = ar_token_losses(clean_logits, clean_ids, loss_mask, tp_group, vocab_size, positions).sum() / n
    zero = ar.new_zeros(())
    return LossParts(loss=ar, diffusion=zero, ar=ar.detach(), num_tokens=count.detach(), num_masked=zero)
