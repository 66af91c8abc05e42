"""Packed documents: document ids from end-of-document tokens, and a packed sequence computes what
its documents compute alone (docs/method.md, "Attention layouts": with packed documents every
edge also needs ``doc(q) == doc(k)``).

References are independent of the code under test: document ids written out position by
position; per-document forwards of the documents alone; the losses' formulas (docs/method.md,
"Losses") written here with ``F.cross_entropy``.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_nbdiff.data.datasets import doc_ids_from_eod

from _dist_workers import MASK, VOCAB, free_port, tiny

EOD = 1

# (tokens, document ids written out: the number of EOD tokens strictly before each position)
DOC_ID_ROWS = [
    ([5, 6, EOD, 7, EOD, EOD, 8, 9], [0, 0, 0, 1, 1, 2, 3, 3]),
    ([EOD, 5, 6, 7, 8, 9, 10, 11], [0, 1, 1, 1, 1, 1, 1, 1]),
    ([5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 0, 0, 0, 0, 0]),
    ([5, 6, 7, 8, 9, 10, 11, EOD], [0, 0, 0, 0, 0, 0, 0, 0]),
    ([EOD, EOD, EOD, 4, EOD, 4, 4, EOD], [0, 1, 2, 3, 3, 4, 4, 4]),
]


def test_doc_ids_from_eod_position_by_position():
    tokens = torch.tensor([t for t, _ in DOC_ID_ROWS])
    before = tokens.clone()
    ids = doc_ids_from_eod(tokens, EOD)
    assert ids.shape == tokens.shape and ids.dtype == torch.int64
    for row, (_, expected) in enumerate(DOC_ID_ROWS):
        assert ids[row].tolist() == expected, row
    assert torch.equal(tokens, before)
    # another EOD id: the same tokens hold no end-of-document token at all
    assert doc_ids_from_eod(tokens, 99).eq(0).all()


# ---------------------------------------------------------------------------------------------
# three documents packed into one sequence of 32: lengths 8 and 12 (each ending in EOD) and 12
# (cut by the end of the sequence); every document starts at a multiple of the block size 4
L, B = 32, 4
SEGMENTS = [(0, 8), (8, 20), (20, 32)]
DOC_IDS = [0] * 8 + [1] * 12 + [2] * 12


def packed_tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, MASK, (1, L), generator=g)
    x[0, 7] = EOD
    x[0, 19] = EOD
    return x


def noisy_copy(x, seed=1):
    """Mask half the positions, never a block's first one (as training does)."""
    g = torch.Generator().manual_seed(seed)
    n = x.clone()
    masked = torch.rand(x.shape, generator=g) < 0.5
    masked[:, ::B] = False
    n[masked] = MASK
    return n


def others_replaced(x, keep, seed):
    """``x`` with every position outside segment ``keep`` replaced by a random non-EOD token."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, MASK, x.shape, generator=g)
    a, b = keep
    y[:, a:b] = x[:, a:b]
    return y


@pytest.fixture(scope="module")
def model():
    from megatron_nbdiff.models import NBDiffModel
    from megatron_nbdiff.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        mc = tiny(num_layers=2)
        m = NBDiffModel(mc, mc.transformer_config())
        m.eval()
        yield m
    finally:
        destroy_parallel()


def test_packed_sequence_has_the_written_document_ids():
    assert doc_ids_from_eod(packed_tokens(), EOD)[0].tolist() == DOC_IDS


def test_causal_packed_equals_documents_alone(model):
    x = packed_tokens()
    docs = doc_ids_from_eod(x, EOD)
    with torch.no_grad():
        packed = model(x, layout="causal", doc_ids=docs).clean
        total_packed = total_alone = 0.0
        for a, b in SEGMENTS:
            alone = model(x[:, a:b], layout="causal").clean
            # RoPE is relative: the packed offset changes nothing beyond rounding
            torch.testing.assert_close(packed[:, a:b], alone, atol=1e-4, rtol=1e-4)
            # per-token AR losses of the targets inside the document
            total_packed += F.cross_entropy(packed[0, a:b - 1], x[0, a + 1:b], reduction="sum")
            total_alone += F.cross_entropy(alone[0, :-1], x[0, a + 1:b], reduction="sum")
        torch.testing.assert_close(total_packed, total_alone, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 5])
def test_causal_document_logits_ignore_the_other_documents(model, seed):
    x = packed_tokens(seed)
    docs = doc_ids_from_eod(x, EOD)  # from the original tokens, kept for the replaced ones
    with torch.no_grad():
        packed = model(x, layout="causal", doc_ids=docs).clean
        for d, seg in enumerate(SEGMENTS):
            y = others_replaced(x, seg, seed=10 + d)
            other = model(y, layout="causal", doc_ids=docs).clean
            a, b = seg
            torch.testing.assert_close(other[:, a:b], packed[:, a:b], atol=1e-5, rtol=1e-5)
        # the check has teeth: without document ids the later documents do change
        y = others_replaced(x, SEGMENTS[1], seed=20)
        plain = model(x, layout="causal").clean
        plain_y = model(y, layout="causal").clean
        assert (plain[:, 8:20] - plain_y[:, 8:20]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["dual_context_causal", "dual_block_causal"])
def test_dual_stream_packed_equals_documents_alone(model, layout):
    x = packed_tokens()
    n = noisy_copy(x)
    docs = doc_ids_from_eod(x, EOD)
    with torch.no_grad():
        out = model(x, n, layout=layout, block_size=B, doc_ids=docs)
        for d, (a, b) in enumerate(SEGMENTS):
            alone = model(x[:, a:b], n[:, a:b], layout=layout, block_size=B)
            torch.testing.assert_close(out.noisy[:, a:b], alone.noisy, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.clean[:, a:b], alone.clean, atol=1e-4, rtol=1e-4)
            # both streams of the other documents replaced: this document's logits stay
            y = others_replaced(x, (a, b), seed=30 + d)
            m = others_replaced(n, (a, b), seed=40 + d)
            other = model(y, m, layout=layout, block_size=B, doc_ids=docs)
            torch.testing.assert_close(other.noisy[:, a:b], out.noisy[:, a:b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other.clean[:, a:b], out.clean[:, a:b], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the training step's wiring: tokens -> document ids from the run's EOD id -> the recipe's
# forward and loss. Expected: the losses' formulas over logits stitched from documents alone.
# The tolerance is tight on purpose: packed and alone agree to the last bit on CPU here, while
# a document boundary one position off moves the loss of this random-weight model by ~2e-4

def _step_loss(model, recipe, tokens, step, block_size):
    from megatron_nbdiff.training.recipes import StepContext
    from megatron_nbdiff.training.step import StepSettings, forward_step_func

    kw = dict(tp_group=None, vocab_size=VOCAB)
    settings = StepSettings(recipe=recipe, seed=3, mask_token_id=MASK, eod_id=EOD, seq_len=L,
                            micro_batch_size=1, loss_kwargs=kw, device=torch.device("cpu"),
                            validate_noise=True)
    sample_index = torch.tensor([7])
    with torch.no_grad():
        packed, _ = forward_step_func(settings, step, block_size)(iter([(tokens, sample_index)]), model)
    # the same noise the recipe drew (keyed by seed, step, sample and position)
    ctx = StepContext(step=step, block_size=block_size, seed=3, mask_token_id=MASK, doc_ids=None,
                      loss_kwargs=kw)
    noise = None
    if recipe.layout != "causal":
        noise = recipe.noise(tokens, sample_index, torch.ones_like(tokens), ctx,
                             block_size=block_size if recipe.dual else None)
    return packed, noise


def _stitched(model, tokens, noisy, layout, **kw):
    """Logits of every document run alone, concatenated in packed order."""
    clean, noisy_out = [], []
    with torch.no_grad():
        for a, b in SEGMENTS:
            if layout == "causal":
                clean.append(model(tokens[:, a:b], layout="causal").clean)
            elif layout.startswith("dual"):
                o = model(tokens[:, a:b], noisy[:, a:b], layout=layout, **kw)
                clean.append(o.clean)
                noisy_out.append(o.noisy)
            else:
                noisy_out.append(model(noisy_ids=noisy[:, a:b], layout=layout, **kw).noisy)
    cat = lambda xs: torch.cat(xs, 1)[0, :, :VOCAB] if xs else None  # noqa: E731
    return cat(clean), cat(noisy_out)


def _ce(logits, tokens):
    """Cross-entropy of token j under logit j - 1, j = 1..L-1."""
    return F.cross_entropy(logits[:-1].float(), tokens[0, 1:], reduction="none")


def test_training_step_ar_loss_of_a_packed_batch(model):
    from megatron_nbdiff.config import RecipeConfig
    from megatron_nbdiff.training.recipes import resolve_recipe

    x = packed_tokens()
    packed, _ = _step_loss(model, resolve_recipe(RecipeConfig(name="ar")), x, step=0, block_size=1)
    clean, _ = _stitched(model, x, None, "causal")
    expected = _ce(clean, x).sum() / (L - 1)
    torch.testing.assert_close(packed[0], expected, atol=1e-5, rtol=1e-6)


def test_training_step_nbdiff_loss_of_a_packed_batch(model):
    from megatron_nbdiff.config import RecipeConfig
    from megatron_nbdiff.training.recipes import resolve_recipe

    x = packed_tokens()
    recipe = resolve_recipe(RecipeConfig(name="nbdiff", block_size=B))
    packed, noise = _step_loss(model, recipe, x, step=2, block_size=B)
    assert int(noise.is_masked.sum()) > 4
    clean, noisy = _stitched(model, x, noise.noisy_ids, "dual_context_causal", block_size=B)
    w = noise.weight[0, 1:].float()
    diff = (_ce(noisy, x) * w).sum() / (L - 1)
    ar = _ce(clean, x).sum() / (L - 1)
    # L = L_diff + lambda L_AR with lambda 0.5, one normaliser
    torch.testing.assert_close(packed[1], diff, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(packed[2], ar, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(packed[0], diff + 0.5 * ar, atol=1e-5, rtol=1e-6)


def test_training_step_diffullama_loss_of_a_packed_batch(model):
    """Bidirectional inside each document (annealing done: ``anneal_steps`` 0)."""
    from megatron_nbdiff.config import RecipeConfig
    from megatron_nbdiff.training.recipes import resolve_recipe

    x = packed_tokens()
    recipe = resolve_recipe(RecipeConfig(name="diffullama", anneal_steps=0))
    packed, noise = _step_loss(model, recipe, x, step=2, block_size=1)
    assert int(noise.is_masked.sum()) > 4
    _, noisy = _stitched(model, x, noise.noisy_ids, "bidirectional")
    expected = (_ce(noisy, x) * noise.weight[0, 1:].float()).sum() / (L - 1)
    torch.testing.assert_close(packed[0], expected, atol=1e-5, rtol=1e-6)
