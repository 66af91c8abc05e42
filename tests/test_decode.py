"""Decoding: block size 1 == transformers greedy generate, KV cache == recompute, threshold
statistics, batches == one by one, infilling keeps prefix and suffix, HF runner == Megatron
runner, bad inputs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _convert_workers import make_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(ROOT, "tools", "generate.py")
VOCAB = 150


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny random HF Llama with a tokenizer, its Megatron conversion (mask token appended),
    and the export of that back to HF (with nbdiff.json), marked as trained for block 4."""
    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf

    d = tmp_path_factory.mktemp("decode")
    hf = str(d / "hf")
    model = make_hf_checkpoint(hf, "llama", vocab=VOCAB, tokenizer_tokens=VOCAB)
    meg = str(d / "meg")
    convert_hf_to_megatron(hf, meg, mask_token="append", progress=False)
    meta_path = os.path.join(meg, "nbdiff.json")
    meta = json.load(open(meta_path))
    meta.update(block_size=4, attention_layout="dual_context_causal", recipe="nbdiff")
    json.dump(meta, open(meta_path, "w"))
    exp = str(d / "exp")
    convert_megatron_to_hf(meg, exp, progress=False)
    return dict(hf=hf, meg=meg, exp=exp, model=model, mask_id=meta["mask_token"]["id"])


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def hf_runner(ckpts):
    from megatron_nbdiff.inference import load_runner

    return load_runner(ckpts["exp"])


def test_block_size_one_equals_transformers_greedy_generate(ckpts, hf_runner):
    from megatron_nbdiff.inference import generate

    model = ckpts["model"]
    for p in prompts(3, seed=1):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(p):].tolist()
        for mode in ("ar", "block"):
            kw = dict(block_size=1) if mode == "block" else {}
            out = generate(hf_runner, [p], mode=mode, max_new_tokens=12, stop_at_eos=False, **kw)[0]
            assert out["token_ids"] == ref, mode
            assert out["stats"]["forward_passes"] == 12 and out["stats"]["tokens_per_forward"] == 1.0


def test_kv_cache_equals_recompute(ckpts, hf_runner):
    from megatron_nbdiff.inference import generate, load_runner

    nocache = load_runner(ckpts["exp"], use_cache=False)
    p = prompts(2, seed=2)
    # the same logits for prefill, a denoise pass and a commit pass
    block = torch.tensor([[5, ckpts["mask_id"], ckpts["mask_id"], 7]] * 2)
    for r in (hf_runner, nocache):
        r.prefill(p)
    torch.testing.assert_close(hf_runner.denoise(block), nocache.denoise(block), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_runner.commit(block), nocache.commit(block), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_runner.denoise(block), nocache.denoise(block), atol=1e-4, rtol=1e-4)
    a = generate(hf_runner, p, threshold=0.3, max_new_tokens=14, stop_at_eos=False)
    b = generate(nocache, p, threshold=0.3, max_new_tokens=14, stop_at_eos=False)
    assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b]


def test_denoise_sees_the_whole_block_and_commit_is_causal(ckpts, hf_runner):
    """Changing a later token of the block changes earlier logits when denoising, never when
    committing; denoising leaves the cache as it was."""
    m = ckpts["mask_id"]
    hf_runner.prefill([[3, 4, 5]])
    a = torch.tensor([[9, m, m, 10]])
    b = torch.tensor([[9, m, m, 11]])
    da, db = hf_runner.denoise(a), hf_runner.denoise(b)
    assert not torch.allclose(da[:, 0], db[:, 0])
    assert hf_runner.cache.get_seq_length() == 3
    ca = hf_runner.commit(a)
    hf_runner.prefill([[3, 4, 5]])
    cb = hf_runner.commit(b)
    torch.testing.assert_close(ca[:, :3], cb[:, :3])


def test_threshold_one_commits_one_token_per_pass_and_lower_commits_more(hf_runner):
    from megatron_nbdiff.inference import generate

    p = prompts(1, seed=3)
    strict = generate(hf_runner, p, block_size=4, threshold=1.0, max_new_tokens=12, stop_at_eos=False)[0]["stats"]
    # 3 blocks of 4: the first token of each comes from a causal pass, the other 3 need 3 passes
    assert strict["denoise_passes"] == 9 and strict["commit_passes"] == 2
    assert strict["forward_passes"] == 1 + 9 + 2 == 12
    assert strict["tokens_per_forward"] == 1.0
    loose = generate(hf_runner, p, block_size=4, threshold=0.05, max_new_tokens=12, stop_at_eos=False)[0]["stats"]
    assert loose["denoise_passes"] < strict["denoise_passes"]
    assert loose["tokens_per_forward"] > 1.0
    assert loose["forward_passes"] == 1 + loose["denoise_passes"] + loose["commit_passes"]


def test_sub_blocks_fill_left_to_right(hf_runner):
    from megatron_nbdiff.inference import generate

    p = prompts(1, seed=4)
    s = generate(hf_runner, p, block_size=4, sub_blocks=4, threshold=0.01, max_new_tokens=8,
                 stop_at_eos=False)[0]["stats"]
    # one position per sub-block: nothing can be committed in parallel
    assert s["denoise_passes"] == 6


@pytest.mark.parametrize("confidence", ["prob", "margin", "entropy"])
def test_batch_equals_one_by_one(hf_runner, confidence):
    from megatron_nbdiff.inference import generate

    ps = prompts(3, seed=5)
    assert len({len(p) for p in ps}) > 1
    batch = generate(hf_runner, ps, threshold=0.5, confidence=confidence, max_new_tokens=10, stop_at_eos=False)
    for p, got in zip(ps, batch):
        one = generate(hf_runner, [p], threshold=0.5, confidence=confidence, max_new_tokens=10, stop_at_eos=False)[0]
        assert got["token_ids"] == one["token_ids"]
        assert got["stats"]["forward_passes"] == one["stats"]["forward_passes"]


def test_full_sequence_infilling_keeps_prefix_and_suffix(ckpts, hf_runner):
    from megatron_nbdiff.inference import DecodeOptions, full_decode

    prefix, suffix = [4, 5, 6], [7, 8]
    seen = []
    orig_full = hf_runner.full

    def spy(ids, valid):
        seen.append(ids.clone())
        return orig_full(ids, valid)

    hf_runner.full = spy
    try:
        with pytest.warns(UserWarning, match="not a single-stream one"):
            from megatron_nbdiff.inference import generate

            out = generate(hf_runner, [prefix], mode="full", suffix=suffix, max_new_tokens=6, steps=3)[0]
    finally:
        hf_runner.full = orig_full
    assert len(seen) == 3 and out["stats"]["forward_passes"] == 3
    for ids in seen:
        assert ids[0, :3].tolist() == prefix and ids[0, -2:].tolist() == suffix
    assert len(out["token_ids"]) == 6 and ckpts["mask_id"] not in out["token_ids"]
    # masked positions fall 2 per step
    masked = [int((ids == ckpts["mask_id"]).sum()) for ids in seen]
    assert masked == [6, 4, 2]
    # a batch with different prompt lengths == one by one
    opts = DecodeOptions(mode="full", max_new_tokens=5, steps=5, stop_at_eos=False)
    ps = prompts(2, seed=6)
    batch = full_decode(hf_runner, ps, opts)
    for p, got in zip(ps, batch):
        assert got.token_ids == full_decode(hf_runner, [p], opts)[0].token_ids


def test_hf_runner_equals_megatron_runner(ckpts, hf_runner):
    from megatron_nbdiff.inference import generate, load_runner
    from megatron_nbdiff.parallel import destroy_parallel

    meg = load_runner(ckpts["meg"])
    try:
        ps = prompts(3, seed=7)
        m = ckpts["mask_id"]
        block = torch.tensor([[5, m, m, 7]] * 3)
        for r in (hf_runner, meg):
            r.prefill(ps)
        torch.testing.assert_close(meg.denoise(block), hf_runner.denoise(block), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(meg.commit(block), hf_runner.commit(block), atol=1e-4, rtol=1e-4)
        for kw in (dict(threshold=0.5), dict(mode="ar"), dict(threshold=0.2, sub_blocks=2)):
            a = generate(hf_runner, ps, max_new_tokens=10, stop_at_eos=False, **kw)
            b = generate(meg, ps, max_new_tokens=10, stop_at_eos=False, **kw)
            assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b], kw
        # the Megatron runner's cache equals its own recompute
        nocache = load_runner(ckpts["meg"], use_cache=False)
        a = generate(meg, ps, threshold=0.4, max_new_tokens=9, stop_at_eos=False)
        b = generate(nocache, ps, threshold=0.4, max_new_tokens=9, stop_at_eos=False)
        assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b]
    finally:
        destroy_parallel()


def test_temperature_sampling_is_seeded_and_never_emits_the_mask(hf_runner, ckpts):
    from megatron_nbdiff.inference import generate

    p = prompts(2, seed=8)
    a = generate(hf_runner, p, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=12, stop_at_eos=False)
    b = generate(hf_runner, p, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=12, stop_at_eos=False)
    assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b]
    for x in a:
        assert ckpts["mask_id"] not in x["token_ids"] and len(x["token_ids"]) == 12


def test_text_prompts_and_eos(hf_runner):
    from megatron_nbdiff.inference import generate

    out = generate(hf_runner, "w3 w4 w5", max_new_tokens=8, threshold=0.5)[0]
    assert isinstance(out["text"], str)
    eos = hf_runner.info.eos_token_ids
    assert eos  # the tiny tokenizer's eos (w1)
    ids = out["token_ids"]
    assert all(t not in eos for t in ids[:-1])


def test_bad_inputs(ckpts, hf_runner, tmp_path):
    from megatron_nbdiff.inference import DecodingError, generate

    with pytest.raises(DecodingError, match="prompt 0 is empty"):
        generate(hf_runner, "", max_new_tokens=4)
    with pytest.raises(DecodingError, match="prompt 1 is empty"):
        generate(hf_runner, [[3, 4], []], max_new_tokens=4)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(DecodingError, match=r"threshold must lie in \(0, 1\]"):
            generate(hf_runner, [[3, 4]], threshold=bad)
    with pytest.warns(UserWarning, match="block size 8 differs from the 4"):
        generate(hf_runner, [[3, 4]], block_size=8, max_new_tokens=4)
    with pytest.raises(DecodingError, match="unknown option"):
        generate(hf_runner, [[3, 4]], treshold=0.5)
    with pytest.raises(DecodingError, match="token ids must lie in"):
        generate(hf_runner, [[3, 400]])
    # an HF directory without nbdiff.json: block mode refused with the reason, AR allowed
    with pytest.raises(DecodingError, match="has no nbdiff.json.*mode 'ar'"):
        generate(ckpts["hf"], [[3, 4]], mode="block")
    assert len(generate(ckpts["hf"], [[3, 4]], mode="ar", max_new_tokens=3, stop_at_eos=False)[0]["token_ids"]) == 3
    with pytest.raises(DecodingError, match="model directory not found"):
        generate(str(tmp_path / "nope"), [[3]])
    with pytest.raises(DecodingError, match="neither nbdiff.json nor config.json"):
        generate(str(tmp_path), [[3]])


def run_cli(*args):
    return subprocess.run([sys.executable, GENERATE, *args], capture_output=True, text=True, timeout=300)


def test_cli(ckpts, tmp_path):
    r = run_cli("--model", ckpts["exp"], "--prompt", "w3 w4 w5", "--max-new-tokens", "8", "--stats")
    assert r.returncode == 0, r.stderr
    assert "tokens/forward" in r.stdout
    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": "w3 w4"}) + "\n" + json.dumps({"prompt": "w7 w8 w9"}) + "\n")
    r = run_cli("--model", ckpts["exp"], "--prompt-file", str(pf), "--max-new-tokens", "6", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 2 and all("text" in x and "token_ids" in x and "stats" in x for x in rows)
    r = run_cli("--model", ckpts["exp"], "--prompt", "w3", "--threshold", "2")
    assert r.returncode == 2 and "threshold must lie in (0, 1]" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", ckpts["hf"], "--prompt", "w3", "--mode", "block")
    assert r.returncode == 2 and "no nbdiff.json" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = run_cli("--model", ckpts["exp"], "--prompt-file", str(bad))
    assert r.returncode == 2 and "bad.jsonl line 1" in r.stderr


def test_megatron_runner_at_tp2_equals_hf(ckpts, hf_runner, tmp_path):
    from megatron_nbdiff.inference import generate

    from _dist_workers import run_two_process

    ps = prompts(3, seed=9)
    runs = [dict(threshold=0.5, max_new_tokens=10, stop_at_eos=False),
            dict(mode="ar", max_new_tokens=6, stop_at_eos=False)]
    results = run_two_process("tp_decode", str(tmp_path), meg_dir=ckpts["meg"], prompts=ps, runs=runs)
    assert results[0] == results[1]
    for kw, got in zip(runs, results[0]):
        assert got == [x["token_ids"] for x in generate(hf_runner, ps, **kw)], kw


def test_bad_dtype_is_named(ckpts):
    from megatron_nbdiff.inference import DecodingError, load_runner

    with pytest.raises(DecodingError, match="dtype must be one of"):
        load_runner(ckpts["exp"], dtype="fp8")


def test_a_parallel_size_for_an_hf_model_is_named(ckpts):
    """tp / ep apply to Megatron checkpoints; an exported HF model asked for them is one error
    naming the size and why, not a silently unsharded run."""
    from megatron_nbdiff.inference import DecodingError, load_runner

    for name in ("tp", "ep"):
        with pytest.raises(DecodingError, match=f"^{name}=2: .* is a Hugging Face model"):
            load_runner(ckpts["exp"], **{name: 2})
    assert type(load_runner(ckpts["exp"], tp=1, ep=1)).__name__ == "HFRunner"
