"""Losses with the shift convention: the logit at position ``i`` predicts token ``i + 1``.

* Diffusion loss (dual stream): for every masked position ``j``, cross-entropy of ``x_j`` under
  the noisy-stream logit at ``j - 1`` (same block, since a block's first token is never masked),
  weighted 1 or ``1/t``.
* AR loss: next-token cross-entropy on the clean-stream logits at every valid position.
* ``L = L_diff + lambda * L_AR``; both sums are divided by one normaliser, the number of valid
  target tokens (positions ``1..L-1`` with ``loss_mask == 1``), so the two terms count comparable
  numbers of tokens.
* Single-stream (DiffuLLaMA): the diffusion loss alone over one noisy stream (weights ``1/t``).

Logits are ``[b, L, V]``, or ``[b, L, V/tp]`` with ``vocab_parallel=True`` (megatron's
vocab-parallel cross-entropy then reduces over the tensor-parallel group). Cross-entropy is
computed in fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F


# Logit given to padded vocabulary rows: exp() of it is 0 in fp32, and it stays finite, so a
# tensor-parallel partition made only of padding cannot produce inf - inf.
_PAD_LOGIT = -1.0e9


def token_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_parallel: bool = False,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token cross-entropy ``[b, n]`` of ``targets [b, n]`` under ``logits [b, n, V]``.

    ``vocab_size`` (the real vocabulary) excludes the rows added by padding for tensor
    parallelism from the softmax, so the loss does not depend on the padded size (which grows
    with TP)."""
    if vocab_parallel:
        from megatron.core import parallel_state, tensor_parallel

        logits = logits.float()
        if vocab_size is not None:
            part = logits.shape[-1]
            start = parallel_state.get_tensor_model_parallel_rank() * part
            if start + part > vocab_size:
                pad = torch.arange(start, start + part, device=logits.device) >= vocab_size
                logits = logits.masked_fill(pad, _PAD_LOGIT)
        # megatron's kernel takes [s, b, V/tp] and [s, b]
        loss = tensor_parallel.vocab_parallel_cross_entropy(
            logits.transpose(0, 1).contiguous(), targets.transpose(0, 1).contiguous()
        )
        return loss.transpose(0, 1)
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


def _shifted(mask_like: torch.Tensor) -> torch.Tensor:
    """Targets at positions 1..L-1, aligned with logits at 0..L-2."""
    return mask_like[:, 1:]


def num_target_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    """The shared normaliser: valid target positions (1..L-1 with loss_mask == 1)."""
    return _shifted(loss_mask).float().sum()


def diffusion_token_losses(
    noisy_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    weight: torch.Tensor,
    vocab_parallel: bool = False,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Weighted per-target diffusion losses ``[b, L-1]``; ``weight`` is 0 where not masked."""
    ce = token_cross_entropy(noisy_logits[:, :-1], clean_ids[:, 1:], vocab_parallel, vocab_size)
    return ce * _shifted(weight).float()


def ar_token_losses(
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_parallel: bool = False,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-target next-token losses ``[b, L-1]`` (zero where ``loss_mask`` is 0)."""
    ce = token_cross_entropy(clean_logits[:, :-1], clean_ids[:, 1:], vocab_parallel, vocab_size)
    return ce * _shifted(loss_mask).float()


def dual_stream_loss(
    noisy_logits: Optional[torch.Tensor],
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    weight: Optional[torch.Tensor],
    is_masked: Optional[torch.Tensor],
    loss_mask: torch.Tensor,
    ar_weight: float,
    vocab_parallel: bool = False,
    vocab_size: Optional[int] = None,
) -> LossParts:
    """NBDiff / transplant / block-causal loss ``L_diff + ar_weight * L_AR``.

    ``noisy_logits=None`` is the block-size-1 case, where the noisy stream has no masked
    positions and is skipped: only ``ar_weight * L_AR`` remains."""
    n = num_target_tokens(loss_mask).clamp(min=1.0)
    ar = ar_token_losses(clean_logits, clean_ids, loss_mask, vocab_parallel, vocab_size).sum() / n
    if noisy_logits is None:
        diff = clean_logits.new_zeros((), dtype=torch.float32)
        masked = diff.new_zeros(())
    else:
        diff = diffusion_token_losses(noisy_logits, clean_ids, weight, vocab_parallel, vocab_size).sum() / n
        masked = _shifted(is_masked).float().sum()
    return LossParts(
        loss=diff + ar_weight * ar, diffusion=diff.detach(), ar=ar.detach(),
        num_tokens=n.detach(), num_masked=masked.detach(),
    )


def single_stream_loss(
    noisy_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    weight: torch.Tensor,
    is_masked: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_parallel: bool = False,
    vocab_size: Optional[int] = None,
) -> LossParts:
    """DiffuLLaMA loss: masked tokens under the shifted logits of the single noisy stream."""
    n = num_target_tokens(loss_mask).clamp(min=1.0)
    diff = diffusion_token_losses(noisy_logits, clean_ids, weight, vocab_parallel, vocab_size).sum() / n
    zero = diff.new_zeros(())
    return LossParts(
        loss=diff, diffusion=diff.detach(), ar=zero, num_tokens=n.detach(),
        num_masked=_shifted(is_masked).float().sum().detach(),
    )


def ar_loss(
    clean_logits: torch.Tensor,
    clean_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_parallel: bool = False,
    vocab_size: Optional[int] = None,
) -> LossParts:
    """Plain next-token training (the ``ar`` recipe)."""
    n = num_target_tokens(loss_mask).clamp(min=1.0)
    ar = ar_token_losses(clean_logits, clean_ids, loss_mask, vocab_parallel, vocab_size).sum() / n
    zero = ar.new_zeros(())
    return LossParts(loss=ar, diffusion=zero, ar=ar.detach(), num_tokens=n.detach(), num_masked=zero)
