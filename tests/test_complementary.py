"""Complementary masks (docs/method.md, "Instruction tuning"): the ``[x_t ; x_t' ; x_0]`` layouts
against their table written out case by case, the second view's noise (every eligible token in
exactly one view's masked set), and the one ``3L`` forward against two ``[x_t ; x_0]`` forwards
(logits and gradients, fp32)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_nbdiff.attention.masks import COMPLEMENTARY_LAYOUTS, MaskSpec, dense_allowed
from megatron_nbdiff.config import RecipeConfig
from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.training.losses import complementary_stream_loss, dual_stream_loss
from megatron_nbdiff.training.recipes import StepContext, complementary_noise, resolve_recipe

from _dist_workers import MASK, VOCAB, tiny

pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py


def table_rule(layout, q, k, L, B, docs=None):
    """The complementary layout table, with plain ints: stream 0 = x_t, 1 = x_t', 2 = x_0."""
    sq, sk, pq, pk = q // L, k // L, q % L, k % L
    if docs is not None and docs[pq] != docs[pk]:
        return False
    bq, bk = pq // B, pk // B
    if sq < 2 and sk < 2:  # noisy view to noisy view: own view, own block only
        return sq == sk and bq == bk
    if sq < 2:  # noisy view to clean: earlier blocks
        return bk < bq
    if sk < 2:  # clean never sees a noisy view
        return False
    return pk <= pq if layout == "complementary_context_causal" else bk <= bq


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(COMPLEMENTARY_LAYOUTS), st.sampled_from([1, 2, 3, 4]), st.integers(1, 4),
       st.lists(st.integers(1, 15), max_size=3), st.booleans())
def test_complementary_predicate_matches_its_table(layout, B, blocks, cuts, use_docs):
    L = B * blocks
    docs = torch.zeros(L, dtype=torch.long)
    for c in sorted({c for c in cuts if c < L}):
        docs[c:] += 1
    mask = dense_allowed(layout, L, B, doc_ids=docs[None] if use_docs else None)
    mask = mask[0] if use_docs else mask
    assert mask.shape == (3 * L, 3 * L)
    expected = torch.tensor([[table_rule(layout, q, k, L, B, docs if use_docs else None)
                              for k in range(3 * L)] for q in range(3 * L)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("layout,dual", [("complementary_context_causal", "dual_context_causal"),
                                         ("complementary_block_causal", "dual_block_causal")])
def test_each_view_sees_what_the_dual_noisy_stream_sees(layout, dual):
    """Rows of view v over [view v ; clean] keys equal the dual layout's rows; the other view's
    keys are closed."""
    L, B = 12, 4
    comp, two = dense_allowed(layout, L, B), dense_allowed(dual, L, B)
    for v in (0, 1):
        rows = comp[v * L:(v + 1) * L]
        assert torch.equal(torch.cat([rows[:, v * L:(v + 1) * L], rows[:, 2 * L:]], 1), two[:L])
        assert not rows[:, (1 - v) * L:(2 - v) * L].any()
    assert torch.equal(comp[2 * L:, 2 * L:], two[L:, L:]) and not comp[2 * L:, :2 * L].any()


def test_flex_block_masks_equal_the_dense_mask():
    """The flex backend's two calls (both views' queries over all keys; clean causal) give dense SDPA."""
    from megatron_nbdiff.attention.core_attention import block_diffusion_attention

    torch.manual_seed(0)
    for layout in COMPLEMENTARY_LAYOUTS:
        spec = MaskSpec(layout, 64, 16)
        q, k, v = torch.randn(2, 4, 192, 8), torch.randn(2, 2, 192, 8), torch.randn(2, 2, 192, 8)
        docs = torch.tensor([[0] * 20 + [1] * 44, [0] * 64])
        for d in (None, docs):
            with torch.no_grad():
                dense = block_diffusion_attention(q, k, v, spec, d, "dense", 8 ** -0.5)
                flex = block_diffusion_attention(q, k, v, spec, d, "flex", 8 ** -0.5)
            torch.testing.assert_close(flex, dense, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the second view's noise

def _noise(weight_mode, B, L=32, b=3, seed=0, step=5):
    recipe = resolve_recipe(RecipeConfig(name="nbdiff", block_size=B, complementary=True, weight_mode=weight_mode))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK, (b, L), generator=g)
    loss_mask = (torch.rand(b, L, generator=g) < 0.6).long()
    ctx = StepContext(step=step, block_size=B, seed=11, mask_token_id=MASK, doc_ids=None, loss_kwargs={})
    first = recipe.noise(tokens, torch.arange(b) + 40, loss_mask, ctx, block_size=B)
    second = complementary_noise(first, tokens, loss_mask, B, MASK, recipe.weight_mode)
    return tokens, loss_mask, first, second


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(0, 10_000), st.sampled_from(["one", "inv_t"]))
def test_every_eligible_token_is_masked_in_exactly_one_view(B, seed, weight_mode):
    tokens, lm, a, c = _noise(weight_mode, B, seed=seed)
    position = torch.arange(tokens.shape[1])
    eligible = lm.bool() & (position % B != 0)
    assert torch.equal(a.is_masked ^ c.is_masked, eligible)  # a partition of E ...
    assert not (a.is_masked & c.is_masked).any()  # ... into disjoint sets
    assert not c.is_masked[~eligible].any()  # prompt and block-first tokens stay clean in x_t'
    assert torch.equal(c.noisy_ids, torch.where(c.is_masked, torch.full_like(tokens, MASK), tokens))
    assert torch.equal(c.t, 1.0 - a.t)
    expected = (1.0 / (1.0 - a.t)) if weight_mode == "inv_t" else torch.ones_like(a.t)
    torch.testing.assert_close(c.weight, torch.where(c.is_masked, expected, torch.zeros_like(a.t)))


def test_complementary_needs_a_dual_stream_recipe():
    for name in ("diffullama", "ar"):
        with pytest.raises(ConfigError, match="recipe.complementary needs a dual-stream recipe"):
            resolve_recipe(RecipeConfig(name=name, complementary=True, mask_token_id=MASK))
    recipe = resolve_recipe(RecipeConfig(name="nbdiff", complementary=True))
    assert recipe.stream_length(32, 4) == 96 and recipe.stream_length(32, 1) == 32


# ---------------------------------------------------------------------------------------------
# one 3L forward == two 2L forwards

def _model():
    from megatron_nbdiff.models import NBDiffModel

    torch.manual_seed(0)
    mc = tiny()
    return NBDiffModel(mc, mc.transformer_config())


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout,packed", [("dual_context_causal", False), ("dual_context_causal", True),
                                           ("dual_block_causal", False)])
def test_one_3L_forward_equals_two_2L_forwards(layout, packed):
    """Logits of x_t, x_t' and x_0 and the gradients of the complementary loss (both views'
    diffusion sums, the AR sum once, one normaliser) agree to 1e-5 in fp32."""
    from megatron_nbdiff.attention.masks import COMPLEMENTARY_OF

    model = _model()
    B, L = 4, 16
    tokens, lm, a, c = _noise("one", B, L=L, b=2, seed=3)
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 16]) if packed else None
    ar_weight = 0.5

    model.zero_grad()
    out = model(tokens, a.noisy_ids, complement_ids=c.noisy_ids, layout=COMPLEMENTARY_OF[layout],
                block_size=B, doc_ids=docs)
    parts = complementary_stream_loss([(out.noisy, a.weight, a.is_masked), (out.complement, c.weight, c.is_masked)],
                                      out.clean, tokens, lm, ar_weight, vocab_size=VOCAB)
    parts.loss.backward()
    one = _grads(model)

    model.zero_grad()
    first = model(tokens, a.noisy_ids, layout=layout, block_size=B, doc_ids=docs)
    second = model(tokens, c.noisy_ids, layout=layout, block_size=B, doc_ids=docs)
    # the same loss from the two forwards: view 1 with the AR term, view 2's diffusion sum alone
    ref = (dual_stream_loss(first.noisy, first.clean, tokens, a.weight, a.is_masked, lm, ar_weight,
                            vocab_size=VOCAB).loss
           + dual_stream_loss(second.noisy, second.clean, tokens, c.weight, c.is_masked, lm, 0.0,
                              vocab_size=VOCAB).loss)
    ref.backward()
    two = _grads(model)

    torch.testing.assert_close(out.noisy, first.noisy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.complement, second.noisy, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.clean, first.clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.loss, ref, atol=1e-5, rtol=0)
    assert one.keys() == two.keys() and len(one) > 5
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=0, msg=name)
    # the views differ, so a view reading the other view's keys would have shown above
    assert not torch.equal(out.noisy, out.complement)


def test_recipe_complementary_step_loss_brute_force():
    """The recipe's complementary forward and loss: (sum over both views' masked tokens of
    w * CE + lambda * AR sum) / n, written out with F.cross_entropy."""
    model = _model()
    model.eval()
    B, L = 4, 16
    recipe = resolve_recipe(RecipeConfig(name="nbdiff", block_size=B, complementary=True))
    tokens, lm, a, c = _noise("one", B, L=L, b=2, seed=7, step=2)
    ctx = StepContext(step=2, block_size=B, seed=11, mask_token_id=MASK, doc_ids=None,
                      loss_kwargs=dict(tp_group=None, vocab_size=VOCAB), loss_mask=lm)
    with torch.no_grad():
        out, loss_fn = recipe.forward_and_loss(tokens, torch.arange(2) + 40, model, ctx)
        parts = loss_fn(out)
        first = model(tokens, a.noisy_ids, layout="dual_context_causal", block_size=B)
        second = model(tokens, c.noisy_ids, layout="dual_context_causal", block_size=B)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1, :VOCAB].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1),
                               reduction="none").view(2, L - 1)

    n = lm[:, 1:].sum()
    diff = ((ce(first.noisy) * a.is_masked[:, 1:]).sum() + (ce(second.noisy) * c.is_masked[:, 1:]).sum()) / n
    ar = (ce(first.clean) * lm[:, 1:]).sum() / n
    assert int(a.is_masked.sum()) > 3 and int(c.is_masked.sum()) > 3
    torch.testing.assert_close(parts.diffusion, diff, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(parts.ar, ar, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(parts.loss, diff + 0.5 * ar, atol=1e-5, rtol=1e-6)
    assert int(parts.num_masked) == int((a.is_masked | c.is_masked)[:, 1:].sum())
