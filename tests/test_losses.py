"""Losses (shift convention, weights, shared normaliser) and the block-size curriculum."""
import math

import pytest
import torch

from megatron_nbdiff.training import BlockCurriculum, ar_loss, dual_stream_loss, single_stream_loss


def brute_ce(logits_row, target):
    return -torch.log_softmax(logits_row.double(), -1)[target].item()


def make_case(seed=0, b=2, L=12, V=11, B=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (b, L), generator=g)
    noisy_logits = torch.randn(b, L, V, generator=g)
    clean_logits = torch.randn(b, L, V, generator=g)
    masked = torch.rand(b, L, generator=g) < 0.5
    masked[:, ::B] = False
    loss_mask = torch.ones(b, L, dtype=torch.long)
    loss_mask[1, -3:] = 0  # padding at the end of row 1
    masked &= loss_mask.bool()
    t = torch.rand(b, L, generator=g) * 0.9 + 0.1
    return x, noisy_logits, clean_logits, masked, loss_mask, t


@pytest.mark.parametrize("inv_t", [False, True])
def test_dual_stream_loss_matches_brute_force(inv_t):
    x, nl, cl, masked, lm, t = make_case()
    weight = masked.float() * (1.0 / t if inv_t else 1.0)
    parts = dual_stream_loss(nl, cl, x, weight, masked, lm, ar_weight=0.5)
    b, L = x.shape
    n = sum(int(lm[r, j]) for r in range(b) for j in range(1, L))
    diff = sum(
        brute_ce(nl[r, j - 1], x[r, j]) * (1 / t[r, j].item() if inv_t else 1.0)
        for r in range(b) for j in range(1, L) if masked[r, j]
    ) / n
    ar = sum(brute_ce(cl[r, j - 1], x[r, j]) for r in range(b) for j in range(1, L) if lm[r, j]) / n
    assert math.isclose(parts.diffusion.item(), diff, rel_tol=1e-5)
    assert math.isclose(parts.ar.item(), ar, rel_tol=1e-5)
    assert math.isclose(parts.loss.item(), diff + 0.5 * ar, rel_tol=1e-5)
    assert parts.num_tokens.item() == n
    assert parts.num_masked.item() == int(masked[:, 1:].sum())


def test_block_size_one_leaves_only_the_weighted_ar_term():
    x, nl, cl, masked, lm, t = make_case()
    parts = dual_stream_loss(None, cl, x, None, None, lm, ar_weight=0.5)
    plain = ar_loss(cl, x, lm)
    assert parts.diffusion.item() == 0.0
    torch.testing.assert_close(parts.loss, 0.5 * plain.loss)
    torch.testing.assert_close(parts.ar, plain.ar)


def test_single_stream_loss_is_inverse_t_weighted_masked_ce():
    x, nl, cl, masked, lm, t = make_case(seed=3)
    weight = masked.float() / t
    parts = single_stream_loss(nl, x, weight, masked, lm)
    b, L = x.shape
    n = int(lm[:, 1:].sum())
    ref = sum(brute_ce(nl[r, j - 1], x[r, j]) / t[r, j].item()
              for r in range(b) for j in range(1, L) if masked[r, j]) / n
    assert math.isclose(parts.loss.item(), ref, rel_tol=1e-5)
    assert parts.ar.item() == 0.0


def test_loss_gradients_flow_only_through_loss_positions():
    x, nl, cl, masked, lm, t = make_case(seed=4)
    nl.requires_grad_(True)
    cl.requires_grad_(True)
    dual_stream_loss(nl, cl, x, masked.float(), masked, lm, ar_weight=0.5).loss.backward()
    # the noisy logit at j-1 gets gradient iff token j is masked; the last logit never
    touched = nl.grad.abs().sum(-1) > 0
    assert torch.equal(touched[:, :-1], masked[:, 1:])
    assert not touched[:, -1].any()
    assert torch.equal(cl.grad.abs().sum(-1)[:, :-1] > 0, lm[:, 1:].bool())


def test_curriculum_doubles_at_configured_steps():
    c = BlockCurriculum(start=1, factor=2, maximum=32, interval=500, offset=0)
    assert c.changes(4000) == [(0, 1), (500, 2), (1000, 4), (1500, 8), (2000, 16), (2500, 32)]
    assert c.block_size(10**9) == 32
    shifted = BlockCurriculum(interval=10, offset=100)
    assert shifted.block_size(99) == 1 and shifted.block_size(110) == 2 and shifted.block_size(150) == 32
    assert BlockCurriculum(start=32, interval=0).schedule(3) == [32, 32, 32]
    with pytest.raises(ValueError, match="start 64 exceeds maximum 32"):
        BlockCurriculum(start=64)
    with pytest.raises(ValueError, match="interval and offset must be >= 0"):
        BlockCurriculum(interval=-1)


def test_padded_vocabulary_rows_are_excluded():
    from megatron_nbdiff.training import token_cross_entropy

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 13, generator=g)
    targets = torch.randint(0, 10, (2, 5), generator=g)
    padded = torch.cat([logits, torch.zeros(2, 5, 6)], dim=-1)  # padding rows give logit 0
    ref = token_cross_entropy(logits[..., :10], targets)
    torch.testing.assert_close(token_cross_entropy(padded, targets, vocab_size=10), ref)
    assert not torch.allclose(token_cross_entropy(padded, targets), ref)
