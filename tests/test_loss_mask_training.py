"""Training with loss masks (``data.loss_mask``; docs/method.md, "Instruction tuning"): the sibling
``<prefix>.loss_mask`` dataset read over exactly the packed token spans, its checks, the mask
reaching the noise and every loss (against a brute-force per-token computation), and the step's
global normaliser (micro-batch split and data-parallel size change nothing).

The loss-mask datasets are written here with megatron-core's ``IndexedDatasetBuilder``, as
``tools/preprocess_data.py --format chat`` writes them (uint8, one value per token)."""
import math
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_nbdiff.config import RecipeConfig, RunConfig
from megatron_nbdiff.errors import DataError
from megatron_nbdiff.models.model import StreamLogits
from megatron_nbdiff.training.recipes import StepContext, complementary_noise, resolve_recipe

from _fixtures import losses, make_config, run

V, MASK = 23, 22


def write_dataset(prefix, docs, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(prefix + ".idx")


def read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, multimodal=False, mmap=True)
    return [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]


def masked_copy(corpus, prefix, seed=0):
    """The corpus tokens at ``prefix`` with a loss mask of random 'responses': in each document
    the tokens from a random start to the one before the end-of-document token carry loss."""
    for suffix in (".bin", ".idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        shutil.copy(corpus / "data" / f"c{suffix}", prefix + suffix)
    rng = np.random.default_rng(seed)
    masks = []
    for doc in read_documents(prefix):
        m = np.zeros(len(doc), dtype=np.int64)
        m[rng.integers(0, len(doc)):len(doc) - 1] = 1
        masks.append(m)
    write_dataset(prefix + ".loss_mask", masks, np.uint8)
    return prefix


# ---------------------------------------------------------------------------------------------
# the data: mask spans equal token spans

def test_loss_mask_follows_the_packed_token_spans(corpus, tmp_path):
    """Every sample's mask is the mask of exactly its tokens: documents of random lengths (packed
    across sample boundaries, several epochs, two blended prefixes) whose mask is a function of
    the token (odd ids), so any span off by one position shows."""
    from megatron_nbdiff.data.datasets import build_datasets, micro_batches
    from megatron_nbdiff.parallel import initialize_parallel

    initialize_parallel(1, 1)  # megatron's dataset builder asks for the rank
    rng = np.random.default_rng(1)
    prefixes = []
    for name in ("a", "b"):
        docs = [np.append(rng.integers(10, 200, rng.integers(3, 50)), 1) for _ in range(40)]
        write_dataset(str(tmp_path / name), docs, np.uint16)
        write_dataset(str(tmp_path / f"{name}.loss_mask"), [d % 2 * (d != 1) for d in docs], np.uint8)
        prefixes.append(str(tmp_path / name))
    data = make_config(corpus, tmp_path / "run", data=dict(train=["0.4", prefixes[0], "0.6", prefixes[1]],
                                                             loss_mask=True),
                       model=dict(vocab_size=260), train=dict(steps=30, global_batch_size=8))
    cfg = RunConfig.from_dict(data)
    train, valid = build_datasets(cfg, eod=1, vocab_size=260, cache_dir=str(tmp_path / "cache"))
    for ds in (train, valid):
        for i in range(len(ds)):
            item = ds[i]
            tokens, mask = item["tokens"], item["token_loss_mask"]
            assert mask.shape == tokens.shape == (32,) and mask.dtype == torch.int64
            assert torch.equal(mask, tokens % 2 * (tokens != 1)), i
    tokens, idx, lm = micro_batches(train, base=8, num_micro=2, micro_batch_size=2, dp=2, dp_rank=1)[1]
    assert idx.tolist() == [14, 15] and torch.equal(lm, tokens % 2 * (tokens != 1))


def test_without_loss_mask_micro_batches_carry_none(corpus, tmp_path):
    from megatron_nbdiff.data.datasets import build_datasets, micro_batches
    from megatron_nbdiff.parallel import initialize_parallel

    initialize_parallel(1, 1)
    cfg = RunConfig.from_dict(make_config(corpus, tmp_path / "run"))
    train, _ = build_datasets(cfg, eod=1, vocab_size=cfg.model.vocab_size, cache_dir=str(tmp_path / "cache"))
    (tokens, idx, lm), = micro_batches(train, 0, 1, 2, 1, 0)
    assert lm is None and tokens.shape == (2, 32)


@pytest.mark.parametrize("fault,message", [
    ("missing", r"no loss mask \(.*c\.loss_mask\.bin is missing\)"),
    ("short", r"c\.loss_mask\.idx: sequence 3 has 4 mask values but 5 tokens"),
    ("count", r"c\.loss_mask\.idx: 5 sequences, but .*c\.idx has 6"),
    ("value", r"c\.loss_mask\.bin: value 2 at token 8; a loss mask holds only 0 and 1"),
    ("dtype", r"c\.loss_mask\.idx: loss mask of dtype uint16, expected uint8"),
])
def test_bad_loss_mask_datasets_fail_before_the_run_folder(corpus, tmp_path, fault, message):
    """A missing or misaligned sibling is a DataError naming the file; the run leaves nothing."""
    docs = [[5, 6, 7, 1], [8, 9, 1], [5, 5, 5, 5, 1], [6, 7, 8, 9, 1], [7, 1], [9, 9, 1]]
    prefix = str(tmp_path / "d" / "c")
    write_dataset(prefix, docs, np.uint16)
    masks = [[0] * (len(d) - 2) + [1, 0] for d in docs]
    dtype = np.uint8
    if fault == "short":
        masks[3] = masks[3][:-1]
    elif fault == "count":
        masks = masks[:-1]
    elif fault == "value":
        masks[2][1] = 2
    elif fault == "dtype":
        dtype = np.uint16
    if fault != "missing":
        write_dataset(prefix + ".loss_mask", masks, dtype)
    save = tmp_path / "run"
    data = make_config(corpus, save, data=dict(train=[prefix], loss_mask=True), train=dict(seq_len=8))
    with pytest.raises(DataError, match=message):
        run(data)
    assert not save.exists()


# ---------------------------------------------------------------------------------------------
# the mask reaches the noise and the losses: a stub model whose logits are leaf tensors

class StubModel:
    """Returns fixed random logits per stream (leaf tensors, so the loss's gradient per logit row
    is readable) and records the ids it was given."""

    def __init__(self, b, L, seed):
        g = torch.Generator().manual_seed(seed)
        self.logits = {k: (torch.randn(b, L, V, generator=g) * 2).requires_grad_()
                       for k in ("noisy", "complement", "clean")}
        self.calls = []

    def __call__(self, clean_ids=None, noisy_ids=None, *, complement_ids=None, layout="causal", **kw):
        self.calls.append(dict(clean=clean_ids, noisy=noisy_ids, complement=complement_ids, layout=layout))
        return StreamLogits(**{k: self.logits[k] for k, ids in (("noisy", noisy_ids), ("complement", complement_ids),
                                                               ("clean", clean_ids)) if ids is not None})


def brute_force(tokens, lm, views, clean, ar_weight, n):
    """(sum over rows and targets j of: w_j * CE under each view's logit j-1 where that view masked
    j, plus ar_weight * CE under the clean logit j-1 where lm_j = 1) / n, one token at a time."""
    def nll(logits, target):
        return -float(torch.log_softmax(logits.detach().double(), -1)[target])

    total = 0.0
    b, L = tokens.shape
    for r in range(b):
        for j in range(1, L):
            target = int(tokens[r, j])
            for logits, noisy_ids, weight in views:
                if int(noisy_ids[r, j]) == MASK:
                    total += float(weight[r, j]) * nll(logits[r, j - 1], target)
            if clean is not None and lm[r, j]:
                total += ar_weight * nll(clean[r, j - 1], target)
    return total / n


CASES = [("nbdiff", False), ("nbdiff", True), ("block_causal", True), ("diffullama", False), ("ar", False)]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(CASES), st.integers(0, 10_000), st.sampled_from([2, 4]), st.sampled_from([None, 7.5]))
def test_masked_tokens_are_never_noised_nor_counted(case, seed, B, normaliser):
    name, complementary = case
    b, L = 3, 16
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK, (b, L), generator=g)
    lm = (torch.rand(b, L, generator=g) < torch.rand(b, 1, generator=g)).long()
    extra = dict(block_size=B) if name in ("nbdiff", "block_causal") else {}
    recipe = resolve_recipe(RecipeConfig(name=name, complementary=complementary, anneal_steps=0, **extra))
    ctx = StepContext(step=3, block_size=B if recipe.dual else 1, seed=5, mask_token_id=MASK, doc_ids=None,
                      loss_kwargs=dict(tp_group=None, vocab_size=V), loss_mask=lm, normaliser=normaliser)
    model = StubModel(b, L, seed)
    sample_index = torch.arange(b) + 100
    out, loss_fn = recipe.forward_and_loss(tokens, sample_index, model, ctx)
    parts = loss_fn(out)
    call, = model.calls

    # the noise: no token with loss mask 0 is replaced, in any view
    for key in ("noisy", "complement"):
        if call[key] is not None:
            assert torch.equal(call[key][lm == 0], tokens[lm == 0]), key
    # the loss: the brute-force sum over the same noise, divided by the normaliser
    views = []
    if recipe.layout != "causal":
        noise = recipe.noise(tokens, sample_index, lm, ctx, block_size=B if recipe.dual else None)
        assert torch.equal(call["noisy"], noise.noisy_ids)
        views.append((model.logits["noisy"], noise.noisy_ids, noise.weight))
        if complementary:
            other = complementary_noise(noise, tokens, lm, B, MASK, recipe.weight_mode)
            assert torch.equal(call["complement"], other.noisy_ids)
            views.append((model.logits["complement"], other.noisy_ids, other.weight))
    n = normaliser if normaliser is not None else max(int(lm[:, 1:].sum()), 1)
    lam = {"ar": 1.0, "diffullama": 0.0}.get(name, 0.5)
    clean = model.logits["clean"] if call["clean"] is not None else None
    expected = brute_force(tokens, lm, views, clean, lam, n)
    assert math.isclose(float(parts.loss), expected, rel_tol=1e-5, abs_tol=1e-6)
    # and no loss flows from a target with loss mask 0: logit rows j-1 with lm_j = 0 get no gradient
    parts.loss.backward()
    free = torch.cat([lm[:, 1:] == 0, torch.ones(b, 1, dtype=torch.bool)], 1)  # row L-1 predicts nothing
    for key, logits in model.logits.items():
        if logits.grad is not None:
            assert not logits.grad[free].any(), key


# ---------------------------------------------------------------------------------------------
# the global normaliser through the trainer

def _masked_run(corpus, tmp_path, name, **train):
    prefix = masked_copy(corpus, str(tmp_path / "data" / "c"))
    return make_config(corpus, tmp_path / name, recipe=dict(block_size=4, complementary=True),
                       data=dict(train=[prefix], loss_mask=True),
                       train=dict(global_batch_size=4, **train), checkpoint=dict(save_dir=str(tmp_path / name)))


def test_grad_accumulation_over_unequal_micro_batches_equals_one_big_micro_batch(corpus, tmp_path):
    """4 micro-batches of 1 sample (their loss-token counts differ) give the loss, gradient norm
    and next-step loss of 1 micro-batch of 4: one normaliser, the step's global count."""
    from megatron_nbdiff.training.trainer import Trainer

    small = _masked_run(corpus, tmp_path, "small", micro_batch_size=1)
    big = _masked_run(corpus, tmp_path, "big", micro_batch_size=4)
    init = Trainer(RunConfig.from_dict(big), quiet=True)
    init.setup()
    init.save(0)  # one initialisation for both runs
    shutil.copytree(tmp_path / "big" / "checkpoints", tmp_path / "small" / "checkpoints")
    counts = [int(c) for _, _, lm in init._batches(init.train_ds, 0) for c in lm[:, 1:].sum(1)]
    assert max(counts) > 1.3 * min(counts), counts  # a per-micro-batch mean would differ
    run(small, stop_after=2)
    run(big, stop_after=2)
    a, b = losses(tmp_path / "small"), losses(tmp_path / "big")
    for step in (0, 1):
        for key in ("loss", "diffusion", "ar", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) < 1e-5 * max(1.0, abs(b[step][key])), (step, key, a, b)


def test_data_parallel_two_equals_one_with_loss_masks(corpus, tmp_path):
    """DP=2 (two gloo processes, one micro-batch of 2 samples each: their loss-token counts
    differ) logs the losses of one process running the 4 samples as one micro-batch."""
    from megatron_nbdiff.training.trainer import Trainer

    from _dist_workers import run_two_process

    one = _masked_run(corpus, tmp_path, "one", micro_batch_size=4)
    two = _masked_run(corpus, tmp_path, "two", micro_batch_size=2)
    init = Trainer(RunConfig.from_dict(one), quiet=True)
    init.setup()
    init.save(0)
    shutil.copytree(tmp_path / "one" / "checkpoints", tmp_path / "two" / "checkpoints")
    run(one, stop_after=2)
    ref = [losses(tmp_path / "one")[s]["loss"] for s in range(2)]
    got = run_two_process("train_first_losses", str(tmp_path / "out"), data=two)[0]
    assert len(got) == 2
    for x, y in zip(got, ref):
        assert abs(x - y) < 1e-5 * max(1.0, abs(y)), (got, ref)


@pytest.mark.parametrize("complementary", [False, True])
def test_training_with_loss_masks_lowers_the_loss(corpus, tmp_path, complementary):
    prefix = masked_copy(corpus, str(tmp_path / "data" / "c"))
    data = make_config(corpus, tmp_path / "run", recipe=dict(block_size=4, complementary=complementary),
                       data=dict(train=[prefix], loss_mask=True), train=dict(steps=30, lr=5e-3))
    code, trainer = run(data)
    assert code == 0 and trainer.recipe.stream_length(32, 4) == (96 if complementary else 64)
    rec = losses(tmp_path / "run")
    first = sum(rec[s]["loss"] for s in range(3)) / 3
    last = sum(rec[s]["loss"] for s in range(27, 30)) / 3
    assert last < 0.8 * first, (first, last)
