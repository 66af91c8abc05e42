"""Evaluation: the lm-eval adapter (AR log-likelihood == the HF model's own logits, rolling
log-likelihood, generate_until and its stop strings, the Monte-Carlo diffusion bound), the shipped
toy tasks through lm-eval, held-out losses (AR == the HF loss, block diffusion == the training
loss of the dual-stream model, single stream == its training loss), the evaluation report
(megatron_nbdiff.evaluation.report, tools/eval.py) end to end and its bad inputs."""
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from _convert_workers import convert_as_adapted, make_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(ROOT, "tools", "eval.py")
VOCAB = 150
BLOCK = 4

try:
    import lm_eval  # noqa: F401

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (requirements-eval.txt)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls gain nothing from threads, and on a busy machine intra-op threads
    make them many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny random HF Llama with a word-level tokenizer (w0..w148), its Megatron conversion
    (mask token appended) marked as trained for block 4, and the HF export of that."""
    d = tmp_path_factory.mktemp("eval")
    hf = str(d / "hf")
    make_hf_checkpoint(hf, "llama", vocab=VOCAB, tokenizer_tokens=VOCAB)
    meg, exp, meta = convert_as_adapted(hf, d, BLOCK)
    return dict(hf=hf, meg=meg, exp=exp, dir=d, mask_id=meta["mask_token"]["id"])


@pytest.fixture(scope="module")
def runner(ckpts):
    from megatron_nbdiff.inference import load_runner

    return load_runner(ckpts["exp"])


# word ids whose text the tiny tokenizer encodes back to one token: "w1" is its EOS, an added
# token matched before pre-tokenisation, so "w13" would come back as "w1" + "[UNK]"
WORD_IDS = torch.tensor([i for i in range(2, VOCAB - 1) if not str(i).startswith("1")])


def rand_words(n, g):
    return WORD_IDS[torch.randint(0, len(WORD_IDS), (n,), generator=g)].tolist()


def req(*args):
    return types.SimpleNamespace(args=args)


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def direct_logprobs(runner, ids):
    """log-softmax of the HF model's own logits on ``ids`` (no runner code involved)."""
    with torch.no_grad():
        return torch.log_softmax(runner.model(torch.tensor([ids])).logits[0].float(), -1)


def direct_ll(runner, ctx, cont):
    lp = direct_logprobs(runner, ctx + cont)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


# -- the adapter ------------------------------------------------------------------------------------
@needs_lm_eval
def test_loglikelihood_equals_the_hf_models_own_logits(runner, ckpts):
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM

    lm = NBDiffLM(model=runner, batch_size=3)
    assert lm.runner.model.config.vocab_size == runner.info.vocab_size == VOCAB + 1
    g = torch.Generator().manual_seed(0)
    cases = []
    for n_ctx, n_cont in [(3, 2), (5, 2), (7, 2), (4, 1), (2, 5), (6, 3)]:
        cases.append((rand_words(n_ctx, g), rand_words(n_cont, g)))
    requests = [req(words(c), " " + words(t)) for c, t in cases]
    out = lm.loglikelihood(requests, disable_tqdm=True)
    for (c, t), (ll, _) in zip(cases, out):
        assert ll == pytest.approx(direct_ll(runner, c, t), abs=1e-4)
    assert [g for _, g in out] == [False] * len(cases)
    # a continuation that greedy decoding produces (argmax without the mask token), as token ids
    ctx, cont = [5, 9, 22], []
    for _ in range(3):
        lp = direct_logprobs(runner, ctx + cont)[-1]
        lp[ckpts["mask_id"]] = float("-inf")
        cont.append(int(lp.argmax()))
    other = cont[:2] + [(cont[2] + 1) % VOCAB]
    got = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, other), (None, ctx, cont[:1])], disable_tqdm=True)
    assert [g for _, g in got] == [True, False, True]
    assert got[0][0] == pytest.approx(direct_ll(runner, ctx, cont), abs=1e-4)
    # an empty context is conditioned on the EOS prefix token
    (ll, _), = lm.loglikelihood([req("", "w7 w8")], disable_tqdm=True)
    assert ll == pytest.approx(direct_ll(runner, [lm.eot_token_id], [7, 8]), abs=1e-4)
    # a context longer than max_length is cut from the left
    short = NBDiffLM(model=runner, max_length=6)
    (ll, _), = short.loglikelihood([req(words(range(40, 50)), " w30 w31")], disable_tqdm=True)
    assert ll == pytest.approx(direct_ll(runner, list(range(45, 50)), [30, 31]), abs=1e-4)


@needs_lm_eval
def test_loglikelihood_rolling(runner):
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM

    ids = list(range(20, 34))
    lm = NBDiffLM(model=runner)
    (whole,) = lm.loglikelihood_rolling([req(words(ids))], disable_tqdm=True)
    assert whole == pytest.approx(direct_ll(runner, [lm.prefix_token_id], ids), abs=1e-4)
    # windows of 5 tokens: each window conditions on the tokens before it, inside the window
    # (lm-eval's disjoint windows: inputs of at most 5 tokens, every token predicted once)
    small = NBDiffLM(model=runner, max_length=5)
    (windowed,) = small.loglikelihood_rolling([req(words(ids))], disable_tqdm=True)
    ref = (direct_ll(runner, [lm.prefix_token_id], ids[:5]) + direct_ll(runner, ids[4:5], ids[5:10])
           + direct_ll(runner, ids[8:10], ids[10:14]))
    assert windowed == pytest.approx(ref, abs=1e-4)
    assert windowed != pytest.approx(whole, abs=1e-3)


@needs_lm_eval
def test_generate_until_honours_until_and_max_gen_toks(runner):
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM
    from megatron_nbdiff.inference import generate

    prompt = "w7 w8 w9"
    free = NBDiffLM(model=runner, threshold=0.5, stop_check_every=0)
    (text,) = free.generate_until([req(prompt, {"until": [], "max_gen_toks": 12})], disable_tqdm=True)
    ref = generate(runner, prompt, threshold=0.5, max_new_tokens=12)[0]
    assert text == ref["text"] and len(ref["token_ids"]) == 12
    toks = text.split()
    # generation stops at EOS, which the text leaves out
    (ended,) = free.generate_until([req("w3 w4 w5 w6", {"until": [], "max_gen_toks": 12})], disable_tqdm=True)
    ref = generate(runner, "w3 w4 w5 w6", threshold=0.5, max_new_tokens=12)[0]["token_ids"]
    assert ref[-1] in runner.info.eos_token_ids and len(ref) < 12
    assert ended == runner.tokenizer.decode(ref[:-1])
    # chunked generation (stop checks every block) gives the same text
    chunked = NBDiffLM(model=runner, threshold=0.5, stop_check_every=BLOCK)
    assert chunked.generate_until([req(prompt, {"until": [], "max_gen_toks": 12})], disable_tqdm=True) == [text]
    # a stop word that first appears (as a string) at word 2 or later cuts the text before it
    starts = [sum(len(w) + 1 for w in toks[:i]) for i in range(len(toks))]
    k = next(i for i in range(2, 12) if text.find(toks[i]) == starts[i])
    stop = toks[k]
    expected = text[:starts[k]]
    chunked.decode_stats.update(tokens=0, forward_passes=0)
    (cut,) = chunked.generate_until([req(prompt, {"until": [stop], "max_gen_toks": 12})], disable_tqdm=True)
    assert cut == expected and len(cut) < len(text)
    if k < 8:  # the row stopped generating at the first block boundary after the stop word
        assert chunked.decode_stats["tokens"] < 12
    # max_gen_toks (a whole number of blocks: the same blocks as the longer run)
    (short,) = free.generate_until([req(prompt, {"until": ["\n"], "max_gen_toks": 8})], disable_tqdm=True)
    assert short == " ".join(toks[:8])
    # unknown generation options are ignored with a warning, bad ones refused
    from megatron_nbdiff.evaluation import EvaluationError

    free.generate_until([req(prompt, {"until": [], "max_gen_toks": 2, "top_k": 5})], disable_tqdm=True)
    with pytest.raises(EvaluationError, match="'until' must be"):
        free.generate_until([req(prompt, {"until": 5})], disable_tqdm=True)


@needs_lm_eval
def test_diffusion_loglikelihood_is_a_seeded_finite_estimate(runner, ckpts):
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM

    requests = [req("w3 w4 w5", " w6 w7 w8 w9 w20 w21"), req("w8 w9", " w22 w23 w24"),
                req("w20 w21 w22 w23", " w24 w25 w26 w27 w28 w29")]
    kw = dict(loglikelihood="diffusion", mc_samples=4, greedy_check=False)
    a = NBDiffLM(model=runner, mc_seed=1, batch_size=8, **kw)
    b = NBDiffLM(model=runner, mc_seed=1, batch_size=1, **kw)
    c = NBDiffLM(model=runner, mc_seed=2, **kw)
    ra, rb = a.loglikelihood(requests, disable_tqdm=True), b.loglikelihood(requests[::-1], disable_tqdm=True)[::-1]
    assert all(torch.isfinite(torch.tensor(ll)) and ll < 0 for ll, _ in ra)
    # the same under the seed whatever the batching and the order; another seed, another estimate
    assert [x[0] for x in ra] == pytest.approx([x[0] for x in rb], abs=1e-5)
    assert c.loglikelihood(requests[:1], disable_tqdm=True)[0][0] != pytest.approx(ra[0][0], abs=1e-3)
    # at block size 1 every token is a block's first token: the exact AR log-likelihood
    with pytest.warns(UserWarning, match="block size 1 differs from the 4"):
        one = NBDiffLM(model=runner, loglikelihood="diffusion", block_size=1, mc_samples=3, greedy_check=False)
    ar = NBDiffLM(model=runner).loglikelihood(requests, disable_tqdm=True)
    assert [x[0] for x in one.loglikelihood(requests, disable_tqdm=True)] == pytest.approx([x[0] for x in ar], abs=1e-4)

    # the estimate, recomputed with the HF model and a hand-built mask for a one-block continuation
    ctx, cont = [3, 4, 5], [6, 7, 8, 9]
    tokens, noise = a._noise(ctx, cont)
    m = ckpts["mask_id"]
    est = float(direct_logprobs(runner, ctx)[-1, cont[0]])
    P = len(ctx)
    allowed = torch.ones(P + BLOCK, P + BLOCK).tril().bool()
    allowed[P:, P:] = True  # the block sees itself bidirectionally and the context causally
    mask = torch.where(allowed, 0.0, float("-inf"))[None, None]
    diff = []
    for r in range(a.mc_samples):
        ids = torch.tensor([ctx + noise.noisy_ids[r].tolist()])
        assert noise.noisy_ids[r, 0] == cont[0] and (noise.noisy_ids[r, 1:] == m).sum() == noise.is_masked[r].sum()
        with torch.no_grad():
            lp = torch.log_softmax(runner.model(ids, attention_mask=mask).logits[0].float(), -1)
        diff.append(sum(float(noise.weight[r, j] * lp[P + j - 1, cont[j]]) for j in range(1, BLOCK)))
    est += sum(diff) / len(diff)
    (got, greedy), = a.loglikelihood([req(words(ctx), " " + words(cont))], disable_tqdm=True)
    assert got == pytest.approx(est, abs=1e-4) and greedy is False
    assert noise.is_masked.any() and len(set(noise.t[:, 1].tolist())) == a.mc_samples  # stratified t
    # full-sequence (single-stream) bound: finite and seeded
    kw.update(mode="full")
    with pytest.warns(UserWarning, match="not a single-stream one"):
        f1 = NBDiffLM(model=runner, **kw)
        f2 = NBDiffLM(model=runner, batch_size=1, **kw)
    r1, r2 = f1.loglikelihood(requests[:2], disable_tqdm=True), f2.loglikelihood(requests[:2], disable_tqdm=True)
    assert [x[0] for x in r1] == pytest.approx([x[0] for x in r2], abs=1e-5)
    assert all(torch.isfinite(torch.tensor(x[0])) for x in r1)


@needs_lm_eval
def test_is_greedy_of_the_diffusion_path_is_what_the_decoder_produces(runner):
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM
    from megatron_nbdiff.inference import generate

    lm = NBDiffLM(model=runner, loglikelihood="diffusion", mc_samples=2, threshold=0.3)
    ctx = [7, 8, 9]
    produced = generate(runner, [ctx], threshold=0.3, max_new_tokens=5, stop_at_eos=False)[0]["token_ids"]
    other = produced[:4] + [(produced[4] + 1) % VOCAB]
    out = lm._loglikelihood_tokens([(None, ctx, produced), (None, ctx, other)], disable_tqdm=True)
    assert [g for _, g in out] == [True, False]


@needs_lm_eval
def test_adapter_bad_arguments(runner, ckpts):
    from megatron_nbdiff.evaluation import EvaluationError
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM
    from megatron_nbdiff.inference import DecodingError

    for kwargs, message in [
        (dict(mode="bogus"), "mode must be one of"),
        (dict(threshold=0.0), r"threshold must lie in \(0, 1\]"),
        (dict(loglikelihood="elbo"), "loglikelihood must be one of"),
        (dict(loglikelihood="diffusion", mode="ar"), "needs mode=block"),
        (dict(mc_samples=0), "mc_samples must be >= 1"),
        (dict(treshold=0.5), "unknown nbdiff model argument"),
        (dict(max_length=10_000), "exceeds the model's 64 positions"),
        (dict(mode="ar", block_size=4), "mode=ar decodes one token per pass"),
        (dict(sub_blocks=8), "sub_blocks 8 exceeds the block size 4"),
    ]:
        with pytest.raises(DecodingError, match=message):  # EvaluationError is a DecodingError
            NBDiffLM(model=runner, **kwargs)
    with pytest.raises(EvaluationError, match="no model given"):
        NBDiffLM()
    with pytest.raises(EvaluationError, match="has no nbdiff.json"):
        NBDiffLM(model=ckpts["hf"], mode="block")
    assert NBDiffLM(model=ckpts["hf"], mode="ar").block_size == 1
    with pytest.raises(EvaluationError, match="does not fit max_length"):
        NBDiffLM(model=runner, max_length=4).loglikelihood([req("w3", " " + words(range(30, 36)))], disable_tqdm=True)
    with pytest.raises(EvaluationError, match="leaves no room for the prompt"):
        NBDiffLM(model=runner).generate_until([req("w3", {"until": [], "max_gen_toks": 64})], disable_tqdm=True)


@needs_lm_eval
def test_shipped_tasks_through_lm_eval(runner):
    """The toy tasks load from the package folder and run through lm-eval: the multiple-choice
    log-likelihoods equal a direct computation with the HF model, the copy task's generations are
    the decoder's (stopped at EOS, at most max_gen_toks tokens)."""
    from lm_eval.tasks import TaskManager

    from megatron_nbdiff.evaluation import TASKS_DIR
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM
    from megatron_nbdiff.inference import generate

    tm = TaskManager(include_defaults=False, include_path=TASKS_DIR)
    assert {"nbdiff_toy", "nbdiff_toy_copy", "nbdiff_toy_arith", "nbdiff_toy_text"} <= set(tm.all_tasks)
    import lm_eval

    lm = NBDiffLM(model=runner, threshold=0.5, batch_size=4)
    res = lm_eval.simple_evaluate(model=lm, tasks=["nbdiff_toy"], task_manager=tm, limit=3, log_samples=True,
                                  bootstrap_iters=0)
    r = res["results"]
    assert {"nbdiff_toy_copy", "nbdiff_toy_arith", "nbdiff_toy_text"} <= set(r)
    assert 0.0 <= r["nbdiff_toy_copy"]["exact_match,none"] <= 1.0
    assert 0.0 <= r["nbdiff_toy_arith"]["acc,none"] <= 1.0
    assert r["nbdiff_toy_text"]["word_perplexity,none"] > 1.0
    assert lm.decode_stats["tokens"] > 0 and lm.tokens_per_forward() >= 1.0
    samples = res["samples"]
    assert len(samples["nbdiff_toy_arith"]) == 3
    for sample in samples["nbdiff_toy_arith"]:
        assert len(sample["arguments"]) == 4
        for (ctx, cont), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
            whole, c = lm.tok_encode(ctx + cont), lm.tok_encode(ctx)
            assert ll == pytest.approx(direct_ll(runner, c, whole[len(c):]), abs=1e-4)
    for sample in samples["nbdiff_toy_copy"]:
        (ctx, gen_kwargs), = sample["arguments"]
        assert gen_kwargs["until"] == ["\n"] and gen_kwargs["max_gen_toks"] == 16
        ids = generate(runner, ctx, threshold=0.5, max_new_tokens=16)[0]["token_ids"]
        if ids and ids[-1] in runner.info.eos_token_ids:
            ids = ids[:-1]
        assert sample["filtered_resps"][0] == runner.tokenizer.decode(ids)


# -- held-out losses --------------------------------------------------------------------------------
def sequences(n=6, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB - 1, (L,), generator=g).tolist() for _ in range(n)]


def test_ar_loss_equals_the_hf_cross_entropy(runner):
    from megatron_nbdiff.evaluation import heldout_losses

    seqs = sequences(5, 16)
    rep = heldout_losses(runner, seqs, [1], batch_size=2)
    with torch.no_grad():
        ids = torch.tensor(seqs)
        ref = float(runner.model(ids, labels=ids).loss)
    assert rep["ar"]["loss"] == pytest.approx(ref, abs=1e-4)
    assert rep["num_target_tokens"] == 5 * 15
    # B = 1: no masked token, diffusion loss 0 as in training, the bound is the AR loss
    b1 = rep["block"]["1"]
    assert b1["masked_tokens"] == 0 and b1["diffusion_loss"] == 0.0 and b1["masked_ce"] is None
    assert b1["nll_bound"] == pytest.approx(rep["ar"]["loss"], abs=1e-9)
    # mixed lengths: a token-weighted mean
    mixed = seqs[:2] + [seqs[2][:7]]
    rep = heldout_losses(runner, mixed, [1])
    with torch.no_grad():
        tot = sum(float(runner.model(torch.tensor([s]), labels=torch.tensor([s])).loss) * (len(s) - 1) for s in mixed)
    assert rep["ar"]["loss"] == pytest.approx(tot / (15 + 15 + 6), abs=1e-4)


def test_diffusion_losses_are_the_training_losses_of_the_dual_and_single_stream_model(runner, ckpts):
    """On windows of whole blocks, held-out losses through the decoding runners equal the training
    losses of the project's model run on the dual-stream [x_t; x_0] (and single-stream) input with
    the same noise; the HF and Megatron runners agree."""
    from megatron_nbdiff.evaluation import heldout_losses
    from megatron_nbdiff.inference import load_runner
    from megatron_nbdiff.noise import mask_tokens
    from megatron_nbdiff.parallel import destroy_parallel
    from megatron_nbdiff.training.losses import ar_token_losses, dual_stream_loss, single_stream_loss

    seqs = sequences(6, 16, seed=1)
    rep = heldout_losses(runner, seqs, [1, 4, 8], seed=5, step=3, batch_size=4, single_stream=True)
    again = heldout_losses(runner, seqs, [4, 8], seed=5, step=3, batch_size=1)
    other = heldout_losses(runner, seqs, [4], seed=6, step=3)
    for key in ("diffusion_loss", "diffusion_loss_inv_t", "nll_bound", "masked_tokens"):  # batching-independent
        assert again["block"]["4"][key] == pytest.approx(rep["block"]["4"][key], abs=1e-6)
    assert other["block"]["4"]["masked_tokens"] != rep["block"]["4"]["masked_tokens"] or \
        other["block"]["4"]["diffusion_loss"] != pytest.approx(rep["block"]["4"]["diffusion_loss"], abs=1e-6)
    meg = load_runner(ckpts["meg"])
    try:
        rep_meg = heldout_losses(meg, seqs, [1, 4, 8], seed=5, step=3, batch_size=4, single_stream=True)
        model = meg.model
        tokens = torch.tensor(seqs)
        ones = torch.ones_like(tokens)
        index = torch.arange(len(seqs))
        for B in (4, 8):
            noise = mask_tokens(tokens, block_size=B, mask_token_id=ckpts["mask_id"], seed=5, step=3,
                                sample_index=index, loss_mask=ones, t_mode="per_block", weight_mode="one")
            with torch.no_grad():
                out = model(tokens, noise.noisy_ids, layout="dual_context_causal", block_size=B)
            parts = dual_stream_loss(out.noisy[..., :VOCAB + 1], out.clean[..., :VOCAB + 1], tokens, noise.weight,
                                     noise.is_masked, ones, ar_weight=0.5)
            e = rep["block"][str(B)]
            assert e["masked_tokens"] == int(noise.is_masked.sum()) > 0
            assert e["diffusion_loss"] == pytest.approx(float(parts.diffusion), abs=1e-4)
            assert rep["ar"]["loss"] == pytest.approx(float(parts.ar), abs=1e-4)
            # the 1/t-weighted loss, and the bound: block-first tokens by the clean stream
            inv_t = mask_tokens(tokens, block_size=B, mask_token_id=ckpts["mask_id"], seed=5, step=3,
                                sample_index=index, loss_mask=ones, t_mode="per_block", weight_mode="inv_t")
            assert torch.equal(inv_t.is_masked, noise.is_masked)
            parts = dual_stream_loss(out.noisy[..., :VOCAB + 1], out.clean[..., :VOCAB + 1], tokens, inv_t.weight,
                                     inv_t.is_masked, ones, ar_weight=0.5)
            n = tokens.numel() - len(seqs)
            first = float(ar_token_losses(out.clean[..., :VOCAB + 1], tokens, ones)[:, B - 1::B].sum()) / n
            assert e["diffusion_loss_inv_t"] == pytest.approx(float(parts.diffusion), abs=1e-4)
            assert e["nll_bound"] == pytest.approx(first + float(parts.diffusion), abs=1e-4)
            for key in ("diffusion_loss", "diffusion_loss_inv_t", "nll_bound", "masked_ce"):
                assert rep_meg["block"][str(B)][key] == pytest.approx(e[key], abs=1e-4), (B, key)
            assert torch.isfinite(torch.tensor(e["nll_bound"]))
        noise = mask_tokens(tokens, block_size=None, mask_token_id=ckpts["mask_id"], seed=5, step=3,
                            sample_index=index, loss_mask=ones, t_mode="per_sequence", weight_mode="inv_t")
        with torch.no_grad():
            out = model(noisy_ids=noise.noisy_ids, layout="bidirectional")
        parts = single_stream_loss(out.noisy[..., :VOCAB + 1], tokens, noise.weight, noise.is_masked, ones)
        s = rep["single_stream"]
        assert s["masked_tokens"] == int(noise.is_masked.sum())
        assert s["diffusion_loss"] == pytest.approx(float(parts.diffusion), abs=1e-4)
        assert rep_meg["single_stream"]["diffusion_loss"] == pytest.approx(s["diffusion_loss"], abs=1e-4)
        assert rep_meg["ar"]["loss"] == pytest.approx(rep["ar"]["loss"], abs=1e-4)
    finally:
        destroy_parallel()


def test_partial_last_block_and_short_windows(runner, ckpts):
    """Windows whose length is not a multiple of B: the last block is shorter; a window of one
    block only needs no cached context."""
    from megatron_nbdiff.evaluation import heldout_losses
    from megatron_nbdiff.noise import mask_tokens

    seqs = [s[:L] for s, L in zip(sequences(3, 16, seed=2), (10, 3, 13))]
    rep = heldout_losses(runner, seqs, [4], seed=0)
    # reference: each block of each window with the HF model and a hand-built mask
    tot_masked, tot_ce = 0, 0.0
    for i, s in enumerate(seqs):
        L = len(s)
        padded = torch.zeros(1, -(-L // 4) * 4, dtype=torch.long)
        padded[0, :L] = torch.tensor(s)
        lm = torch.zeros_like(padded, dtype=torch.bool)
        lm[0, :L] = True
        noise = mask_tokens(padded, block_size=4, mask_token_id=ckpts["mask_id"], seed=0, step=0,
                            sample_index=torch.tensor([i]), loss_mask=lm, t_mode="per_block")
        for st in range(0, L, 4):
            e = min(L, st + 4)
            ids = torch.tensor([s[:st] + noise.noisy_ids[0, st:e].tolist()])
            allowed = torch.ones(e, e).tril().bool()
            allowed[st:, st:] = True
            mask = torch.where(allowed, 0.0, float("-inf"))[None, None]
            with torch.no_grad():
                lp = torch.log_softmax(runner.model(ids, attention_mask=mask).logits[0].float(), -1)
            for j in range(st + 1, e):
                if noise.is_masked[0, j]:
                    tot_masked += 1
                    tot_ce -= float(lp[j - 1, s[j]])
    e4 = rep["block"]["4"]
    assert e4["masked_tokens"] == tot_masked > 0
    assert e4["diffusion_loss"] == pytest.approx(tot_ce / (9 + 2 + 12), abs=1e-4)


def test_load_sequences_jsonl_and_indexed(runner, tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_nbdiff.evaluation import EvaluationError, load_sequences

    tok = runner.tokenizer
    src = tmp_path / "held.jsonl"
    src.write_text(json.dumps({"text": words(range(3, 12))}) + "\n\n" + json.dumps({"text": "w5"}) + "\n")
    seqs = load_sequences(str(src), tokenizer=tok, seq_length=4)
    eod = tok.eod_id
    assert seqs == [[3, 4, 5, 6], [7, 8, 9, 1], [149, 1, 149, eod], [5, eod]]  # "w10" -> "w1" "[UNK]"
    assert load_sequences(str(src), tokenizer=tok, seq_length=4, max_sequences=2) == seqs[:2]
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in ([3, 4, 5, 6, 7], [9], [10, 11, 12]):
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    assert load_sequences(prefix, seq_length=3) == [[3, 4, 5], [6, 7], [10, 11, 12]]
    assert load_sequences(prefix + ".bin", seq_length=3) == [[3, 4, 5], [6, 7], [10, 11, 12]]
    with pytest.raises(EvaluationError, match="data not found"):
        load_sequences(str(tmp_path / "nope"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    with pytest.raises(EvaluationError, match="bad.jsonl line 1: not JSON"):
        load_sequences(str(bad), tokenizer=tok)
    bad.write_text(json.dumps({"body": "w3"}) + "\n")
    with pytest.raises(EvaluationError, match="string 'text'"):
        load_sequences(str(bad), tokenizer=tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvaluationError, match="no window of at least 2 tokens"):
        load_sequences(str(empty), tokenizer=tok)


def test_heldout_bad_inputs(runner, ckpts):
    from megatron_nbdiff.evaluation import EvaluationError, heldout_losses
    from megatron_nbdiff.inference import load_runner

    with pytest.raises(EvaluationError, match="no sequences"):
        heldout_losses(runner, [], [1])
    with pytest.raises(EvaluationError, match="at least 2 are needed"):
        heldout_losses(runner, [[3, 4], [5]], [1])
    with pytest.raises(EvaluationError, match="block sizes must be >= 1"):
        heldout_losses(runner, [[3, 4]], [0])
    with pytest.raises(EvaluationError, match="token ids must lie in"):
        heldout_losses(runner, [[3, 400]], [1])
    plain = load_runner(ckpts["hf"])  # no nbdiff.json: no mask token
    with pytest.raises(EvaluationError, match="no mask token: only block size 1"):
        heldout_losses(plain, [[3, 4, 5]], [1, 4])
    assert heldout_losses(plain, [[3, 4, 5]], [1])["block"]["1"]["masked_tokens"] == 0


# -- the evaluation report (tools/eval.py) ----------------------------------------------------------
def _eval_main(*args):
    """The tool's main() in this process, under the command-line wrapper (bad input: exit 2)."""
    from megatron_nbdiff.cli import run_main
    from megatron_nbdiff.evaluation.report import main

    return run_main(main, list(args))


def test_cli_end_to_end(ckpts, tmp_path):
    import matplotlib.image

    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"text": words(range(3 + i, 40 + i))}) + "\n" for i in range(3)))
    out, png = tmp_path / "report.json", tmp_path / "plot.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, EVAL, "--model", ckpts["exp"], "--data", str(data), "--seq-length", "16",
                        "--block-sizes", "1,4", "--tasks", "nbdiff_toy", "--limit", "3",
                        "--thresholds", "0.05,1.0", "--max-new-tokens", "8", "--out", str(out), "--plot", str(png)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    h = rep["heldout"]
    assert h["num_sequences"] == 9 and set(h["block"]) == {"1", "4"}
    assert h["block"]["1"]["nll_bound"] == pytest.approx(h["ar"]["loss"])
    recs = {(x["mode"], x["threshold"]): x for x in rep["decoding"]["records"]}
    assert recs[("ar", None)]["tokens_per_forward"] == 1.0
    assert recs[("block", 1.0)]["tokens_per_forward"] == 1.0  # one commit per pass
    assert recs[("block", 0.05)]["tokens_per_forward"] > 1.0
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100
    assert "AR loss" in r.stdout and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    t = rep["tasks"]
    if not HAVE_LM_EVAL:
        assert t is None and any("lm-eval is not installed" in n for n in rep["notes"])
        return
    assert t["generative"] == ["nbdiff_toy_copy"]
    assert [run["threshold"] for run in t["runs"]] == [0.05, 1.0]
    assert set(t["runs"][0]["results"]) == {"nbdiff_toy_copy", "nbdiff_toy_arith", "nbdiff_toy_text"}
    assert set(t["runs"][1]["results"]) == {"nbdiff_toy_copy"}
    # at tau = 1 one token per pass (fewer when a row stops at EOS inside a block)
    assert t["runs"][0]["generation"]["tokens_per_forward"] > 1.0 >= t["runs"][1]["generation"]["tokens_per_forward"]


def test_cli_without_lm_eval_and_bad_inputs(ckpts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w3 w4"}) + "\n" + json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    base = ["--model", ckpts["exp"], "--out", str(out)]
    # lm-eval absent: the tasks are skipped with a note, the rest runs
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "lm_eval", None)
        assert _eval_main(*base, "--tasks", "nbdiff_toy", "--prompts", str(prompts), "--thresholds", "0.5",
                          "--max-new-tokens", "4", "--quiet") == 0
    rep = json.loads(out.read_text())
    assert rep["tasks"] is None and any("lm-eval is not installed" in n for n in rep["notes"])
    assert rep["decoding"]["num_prompts"] == 2 and rep["heldout"] is None
    # no validation data: said on stderr as it happens, and in the report
    err = capsys.readouterr().err
    assert "note: held-out losses skipped: no validation data (give --data" in err
    assert any(n.startswith("held-out losses skipped: no validation data") for n in rep["notes"])
    # the default window length is cut to the model's 64 positions
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": words(range(3, 90))}) + "\n")
    assert _eval_main(*base, "--data", str(held), "--block-sizes", "1", "--no-speed", "--quiet") == 0
    assert json.loads(out.read_text())["heldout"]["seq_length"] == 64
    capsys.readouterr()
    missing = str(tmp_path / "nope")
    for args, message in [
        (["--thresholds", "0,0.5"], r"--thresholds must lie in \(0, 1\]"),
        (["--thresholds", "a"], "--thresholds must be comma-separated numbers"),
        (["--block-sizes", "0,4"], "--block-sizes must be >= 1"),
        (["--data", missing], "--data not found"),
        (["--prompts", missing], "prompt file not found"),
        (["--plot", str(tmp_path / "p.jpg")], "--plot must name a .png file"),
        (["--limit", "0"], "--limit must be >= 1"),
    ] + ([
        (["--tasks", "nbdiff_toy", "--model-args", "mc_samples=0", "--no-speed"], "mc_samples must be >= 1"),
        (["--tasks", str(tmp_path / "t.yaml")], "task file not found"),
    ] if HAVE_LM_EVAL else []):
        assert _eval_main(*base, *args) == 2, args
        err = capsys.readouterr().err
        assert re.search(message, err), (args, err)
    assert _eval_main("--model", missing, "--out", str(out)) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert _eval_main("--model", ckpts["exp"], "--out", str(tmp_path / "no" / "r.json")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _eval_main("--model", ckpts["hf"], "--out", str(out)) == 2
    assert "no nbdiff.json: only --mode ar" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    assert _eval_main(*base, "--prompts", str(bad)) == 2
    assert "bad.jsonl line 1: not JSON" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"w3 w4\ncaf\xe9\n")
    assert _eval_main(*base, "--prompts", str(latin)) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {latin} line 2: not valid UTF-8")


def test_bad_inputs_on_the_command_line(ckpts, tmp_path):
    """tools/eval.py as a user runs it: exit 2, exactly one error line naming the problem, no
    traceback, no report written."""
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": words(range(3, 40))}) + "\n")
    out = tmp_path / "r.json"
    base = ["--model", ckpts["exp"], "--out", str(out)]
    missing = str(tmp_path / "nope")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for args, message in [
        (base + ["--batch-size", "0"], "--batch-size must be >= 1, found 0"),
        (base + ["--data", str(held), "--seq-length", "65"], "--seq-length 65 exceeds the model's max_seq_len 64"),
        (["--model", missing, "--out", str(out)], f"model directory not found: {missing}"),
    ]:
        r = subprocess.run([sys.executable, EVAL, *args, "--quiet"], capture_output=True, text=True,
                           timeout=300, env=env)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert len(errors) == 1 and message in errors[0], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and not out.exists()
