"""Decoding against a scripted model whose logits the test designs, so that every commit is known
in advance (see ``docs/method.md``, "Decoding").

The runner below implements the :class:`~megatron_nbdiff.inference.runner.ModelRunner` hooks with
a *script*: for every query it looks at the keys the attention mask lets it see, and returns the
distribution the test wrote for the position the logit predicts (query position + 1, the shift
convention). Expected results are written out by hand from the algorithm: block decoding starts
every block as ``[first, m, ..., m]``, each denoising pass commits the most confident masked
token plus every masked token whose confidence is at least the threshold, the full block then
runs once causally (its KV joins the cache) and its last logit gives the next block's first
token. Nothing expected here is computed by the code under test.
"""
import math

import pytest
import torch

from megatron_nbdiff.inference import ModelRunner, RunnerInfo, generate

V = 32  # vocabulary of the scripted model
M = 31  # its mask token
EOS = 30
PROMPT = [1, 2, 3]  # positions 0, 1, 2: the prefill's last logit predicts position 3


def certain(tok):
    return {tok: 1.0}


class ScriptedRunner(ModelRunner):
    """A model runner whose logits come from ``script[target](seen)`` (or ``script[target]`` when it
    is a dict): ``target`` is the position the logit predicts, ``seen`` maps the position of every
    key the query may attend to (by the mask it was given) to its token. A target the script does
    not name gets token 0 with probability 1. The distribution is turned into logits ``log p``
    (``-inf`` where ``p`` is 0), so the decoder's softmax gives back exactly the scripted ``p``.

    ``calls`` records every public call: its kind, its input ids (row 0) and, with the cache, the
    positions whose keys were appended and how the new queries saw the new keys (``"full"``:
    bidirectionally, ``"causal"``)."""

    def __init__(self, script, block_size=4, use_cache=True, eos=(EOS,)):
        info = RunnerInfo(vocab_size=V, mask_token_id=M, eos_token_ids=tuple(eos), block_size=block_size,
                          layout="dual_context_causal", has_metadata=True, source="scripted model")
        super().__init__(info, torch.device("cpu"), use_cache=use_cache)
        self.script = script
        self.calls = []

    # what the decoder calls
    def prefill(self, prompts):
        self.calls.append(dict(kind="prefill", input=list(prompts[0])))
        return super().prefill(prompts)

    def denoise(self, block):
        self.calls.append(dict(kind="denoise", input=block[0].tolist()))
        return super().denoise(block)

    def commit(self, block):
        self.calls.append(dict(kind="commit", input=block[0].tolist()))
        return super().commit(block)

    def full(self, ids, valid):
        self.calls.append(dict(kind="full", input=ids[0].tolist()))
        return super().full(ids, valid)

    # the model
    def _reset_cache(self):
        self.kv_ids = None
        self.kv_pos = None

    def _forward(self, ids, position_ids, mask, past, cached, append):
        b, n = ids.shape
        if cached:
            have = 0 if self.kv_ids is None else self.kv_ids.shape[1]
            assert have == past, f"the runner says {past} cached positions, the model holds {have}"
            keys = ids if past == 0 else torch.cat([self.kv_ids, ids], 1)
            kpos = position_ids if past == 0 else torch.cat([self.kv_pos, position_ids], 1)
        else:
            assert past == 0 and not append
            keys, kpos = ids, position_ids
        K = keys.shape[1]
        assert tuple(mask.shape) == (b, 1, n, K)
        logits = torch.full((b, n, V), float("-inf"))
        for r in range(b):
            for q in range(n):
                seen = {int(kpos[r, k]): int(keys[r, k]) for k in range(K) if bool(mask[r, 0, q, k])}
                target = int(position_ids[r, q]) + 1
                rule = self.script.get(target, certain(0))
                dist = rule(seen) if callable(rule) else rule
                assert abs(sum(dist.values()) - 1.0) < 1e-6, (target, dist)
                for tok, p in dist.items():
                    if p > 0:
                        logits[r, q, tok] = math.log(p)
        if cached and self.calls:
            new = mask[0, 0, :, past:]
            how = "full" if bool(new.all()) else ("causal" if torch.equal(new, torch.ones(n, n).tril().bool())
                                                  else "other")
            self.calls[-1].update(appended=position_ids[0].tolist() if append else [], block_attention=how,
                                  sees_whole_cache=bool(mask[0, 0, :, :past].all()))
            if append:
                self.kv_ids, self.kv_pos = keys, kpos
        return logits


def denoise_inputs(runner):
    return [c["input"] for c in runner.calls if c["kind"] == "denoise"]


def commit_sets(runner, final_tokens):
    """Block indices committed by each denoising pass: the masked positions of its input that are
    filled in the next call's input (the next pass, or the commit pass), or, after the last pass
    of a run, in the decoded tokens. Plain list comparison, not the decoder."""
    sets = []
    for i, c in enumerate(runner.calls):
        if c["kind"] != "denoise":
            continue
        before = c["input"]
        after = runner.calls[i + 1]["input"] if i + 1 < len(runner.calls) else final_tokens[-len(before):]
        sets.append({j for j, (x, y) in enumerate(zip(before, after)) if x == M and y != M})
    return sets


# ---------------------------------------------------------------------------------------------
# thresholds: block 1 has masked confidences .95 / .60 / .92; block 2 is a left-to-right chain
# (a position becomes certain once the one before it is filled; while that one is masked its
# confidences are .40 and .44, with other argmax tokens)

def first_of_block_two(seen):
    # the commit pass sees the whole block 1 filled; any denoising logit would still see a mask
    filled = all(seen.get(p, M) != M for p in range(3, 7))
    return certain(20) if filled else certain(21)


THRESHOLD_SCRIPT = {
    3: lambda seen: certain(10) if [seen.get(p) for p in range(3)] == PROMPT else certain(9),
    4: {11: 0.95, 12: 0.05},
    5: {13: 0.60, 14: 0.40},
    6: {15: 0.92, 16: 0.08},
    7: first_of_block_two,
    8: {22: 0.97, 23: 0.03},
    9: lambda seen: {24: 0.97, 25: 0.03} if seen[8] != M else {26: 0.40, 27: 0.35, 28: 0.25},
    10: lambda seen: {18: 0.97, 17: 0.03} if seen[9] != M else {19: 0.44, 18: 0.31, 17: 0.25},
}
STRICT_TOKENS = [10, 11, 13, 15, 20, 22, 24, 18]

# threshold -> (denoise inputs written out, decoded tokens)
THRESHOLD_CASES = {
    1.0: ([[10, M, M, M], [10, 11, M, M], [10, 11, M, 15],
           [20, M, M, M], [20, 22, M, M], [20, 22, 24, M]], STRICT_TOKENS),
    # .60 lies between threshold/2 and the threshold: it waits for the second pass
    0.9: ([[10, M, M, M], [10, 11, M, 15],
           [20, M, M, M], [20, 22, M, M], [20, 22, 24, M]], STRICT_TOKENS),
    # block 1 in one pass; block 2's masked-context .40 / .44 stay below 0.5
    0.5: ([[10, M, M, M],
           [20, M, M, M], [20, 22, M, M], [20, 22, 24, M]], STRICT_TOKENS),
    # .40 and .44 reach 0.3: committed in the first pass with their masked-context tokens
    0.3: ([[10, M, M, M], [20, M, M, M]], [10, 11, 13, 15, 20, 22, 26, 19]),
}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("threshold", sorted(THRESHOLD_CASES, reverse=True))
def test_threshold_commits_exactly_the_scripted_tokens(threshold, use_cache):
    runner = ScriptedRunner(THRESHOLD_SCRIPT, use_cache=use_cache)
    out = generate(runner, [PROMPT], threshold=threshold, max_new_tokens=8, stop_at_eos=False)[0]
    inputs, tokens = THRESHOLD_CASES[threshold]
    assert denoise_inputs(runner) == inputs
    assert out["token_ids"] == tokens
    kinds = [c["kind"] for c in runner.calls]
    n_den = len(inputs)
    # prefill, block 1's passes, one commit pass, block 2's passes; the last block is not committed
    assert kinds == ["prefill"] + ["denoise"] * sum(1 for x in inputs if x[0] == 10) + ["commit"] + \
        ["denoise"] * sum(1 for x in inputs if x[0] == 20)
    s = out["stats"]
    assert (s["denoise_passes"], s["commit_passes"], s["forward_passes"]) == (n_den, 1, 1 + n_den + 1)
    assert s["tokens_per_forward"] == pytest.approx(8 / (2 + n_den))


def test_confidence_between_half_threshold_and_threshold_is_not_committed():
    """Threshold 0.9: the first pass commits .95 (the best) and .92; .60 (>= 0.45) must wait."""
    runner = ScriptedRunner(THRESHOLD_SCRIPT)
    generate(runner, [PROMPT], threshold=0.9, max_new_tokens=4, stop_at_eos=False)
    assert denoise_inputs(runner)[:2] == [[10, M, M, M], [10, 11, M, 15]]
    runner = ScriptedRunner(THRESHOLD_SCRIPT)
    generate(runner, [PROMPT], threshold=1.0, max_new_tokens=4, stop_at_eos=False)
    # at 1.0 only the most confident masked token goes in each pass: .95, then .92, then .60
    assert denoise_inputs(runner) == [[10, M, M, M], [10, 11, M, M], [10, 11, M, 15]]


def test_kv_cache_calls_and_masks():
    """Which positions join the cache when, and how each pass attends."""
    runner = ScriptedRunner(THRESHOLD_SCRIPT)
    generate(runner, [PROMPT], threshold=0.9, max_new_tokens=10, stop_at_eos=False)
    got = [(c["kind"], c["appended"], c["block_attention"]) for c in runner.calls]
    assert got == [
        ("prefill", [0, 1, 2], "causal"),
        ("denoise", [], "full"), ("denoise", [], "full"),
        ("commit", [3, 4, 5, 6], "causal"),
        ("denoise", [], "full"), ("denoise", [], "full"), ("denoise", [], "full"),
        ("commit", [7, 8, 9, 10], "causal"),
        # 10 tokens: the third block is [first, m]; it is not committed (nothing follows)
        ("denoise", [], "full"),
    ]
    assert all(c["sees_whole_cache"] for c in runner.calls)
    assert [c["input"] for c in runner.calls if c["kind"] == "commit"] == [[10, 11, 13, 15], [20, 22, 24, 18]]
    assert runner.calls[-1]["input"] == [0, M]  # unscripted targets: token 0 for sure


def test_block_size_one_is_ar_through_the_cache():
    """Mode ``ar``: each token comes from a causal pass that appends the previous one."""
    script = {3: certain(10),
              4: lambda seen: certain(11) if seen.get(3) == 10 else certain(0),
              5: lambda seen: certain(12) if seen.get(4) == 11 else certain(0),
              6: lambda seen: certain(13) if seen.get(5) == 12 else certain(0)}
    runner = ScriptedRunner(script, block_size=1)
    out = generate(runner, [PROMPT], mode="ar", max_new_tokens=4, stop_at_eos=False)[0]
    assert out["token_ids"] == [10, 11, 12, 13]
    assert [(c["kind"], c["appended"]) for c in runner.calls] == [
        ("prefill", [0, 1, 2]), ("commit", [3]), ("commit", [4]), ("commit", [5])]
    assert out["stats"]["forward_passes"] == 4 and out["stats"]["denoise_passes"] == 0


# ---------------------------------------------------------------------------------------------
# confidences: three masked positions whose ranking differs by confidence measure
P_DIST = {11: 0.50, 12: 0.45, 13: 0.05}
Q_DIST = {14: 0.45, **{t: 0.05 for t in range(15, 26)}}
R_DIST = {26: 0.40, 27: 0.30, 28: 0.30}
# written out by hand: prob = top-1, margin = top-1 - top-2, entropy = exp(-H)
CONF = {"prob": (0.50, 0.45, 0.40), "margin": (0.05, 0.40, 0.10), "entropy": (0.42499, 0.13440, 0.33656)}
CONF_SCRIPT = {3: certain(10), 4: P_DIST, 5: Q_DIST, 6: R_DIST}

CONF_CASES = [
    # (confidence, threshold, block indices committed by each pass)
    ("prob", 1.0, [{1}, {2}, {3}]),
    ("margin", 1.0, [{2}, {3}, {1}]),
    ("entropy", 1.0, [{1}, {3}, {2}]),
    ("prob", 0.42, [{1, 2}, {3}]),
    ("margin", 0.08, [{2, 3}, {1}]),
    ("entropy", 0.3, [{1, 3}, {2}]),
    ("prob", 0.3, [{1, 2, 3}]),
]


def test_hand_written_confidences_are_right():
    """Guards the numbers above (plain arithmetic, not the decoder)."""
    for i, d in enumerate((P_DIST, Q_DIST, R_DIST)):
        assert sum(d.values()) == pytest.approx(1.0)
        top = sorted(d.values(), reverse=True)
        assert top[0] == pytest.approx(CONF["prob"][i])
        assert top[0] - top[1] == pytest.approx(CONF["margin"][i])
        assert math.exp(sum(p * math.log(p) for p in d.values())) == pytest.approx(CONF["entropy"][i], abs=1e-4)


@pytest.mark.parametrize("confidence,threshold,expected", CONF_CASES)
def test_confidence_measures(confidence, threshold, expected):
    runner = ScriptedRunner(CONF_SCRIPT)
    out = generate(runner, [PROMPT], threshold=threshold, confidence=confidence, max_new_tokens=4,
                   stop_at_eos=False)[0]
    assert out["token_ids"] == [10, 11, 14, 26]
    assert denoise_inputs(runner)[0] == [10, M, M, M]
    assert commit_sets(runner, out["token_ids"]) == expected
    assert out["stats"]["denoise_passes"] == len(expected)


# ---------------------------------------------------------------------------------------------
# sub-blocks: block 8, masked confidences (indices 1..7) .50 .62 .56 .52 .64 .99 .58
SUB_CONF = {1: 0.50, 2: 0.62, 3: 0.56, 4: 0.52, 5: 0.64, 6: 0.99, 7: 0.58}
SUB_SCRIPT = {3: certain(10), **{3 + i: {10 + i: c, 20: (1 - c) / 2, 21: (1 - c) / 2} for i, c in SUB_CONF.items()}}

SUB_CASES = [
    # (sub-blocks, threshold, commits per pass); sub-blocks of 8 positions: 2 -> [0..3][4..7],
    # 4 -> [0,1][2,3][4,5][6,7]
    (1, 0.9, [{6}, {5}, {2}, {7}, {3}, {4}, {1}]),
    (2, 0.9, [{2}, {3}, {1}, {6}, {5}, {7}, {4}]),
    (4, 0.9, [{1}, {2}, {3}, {5}, {4}, {6}, {7}]),
    (1, 0.6, [{2, 5, 6}, {7}, {3}, {4}, {1}]),
    (2, 0.6, [{2}, {3}, {1}, {5, 6}, {7}, {4}]),
    (1, 0.45, [{1, 2, 3, 4, 5, 6, 7}]),
    (2, 0.45, [{1, 2, 3}, {4, 5, 6, 7}]),
]


@pytest.mark.parametrize("sub_blocks,threshold,expected", SUB_CASES)
def test_sub_blocks_fill_left_to_right(sub_blocks, threshold, expected):
    runner = ScriptedRunner(SUB_SCRIPT, block_size=8)
    out = generate(runner, [PROMPT], threshold=threshold, sub_blocks=sub_blocks, max_new_tokens=8,
                   stop_at_eos=False)[0]
    assert out["token_ids"] == [10, 11, 12, 13, 14, 15, 16, 17]
    assert denoise_inputs(runner)[0] == [10] + [M] * 7
    assert commit_sets(runner, out["token_ids"]) == expected
    s = out["stats"]
    assert (s["denoise_passes"], s["commit_passes"], s["forward_passes"]) == (len(expected), 0, 1 + len(expected))


# ---------------------------------------------------------------------------------------------
# EOS and batches: row A = [1, 2, 3], row B = [4, 5] (left-padded; its positions start at 0)

def row_a(seen):
    return seen.get(0) == 1


def by_row(a, b):
    return lambda seen: (a if row_a(seen) else b)


EOS_SCRIPT = {
    2: by_row(certain(0), certain(6)),                                  # B's first token
    3: by_row(certain(10), {7: 0.95, 0: 0.05}),
    4: by_row({11: 0.95, 0: 0.05}, {8: 0.60, 0: 0.40}),
    5: by_row({EOS: 0.95, 0: 0.05}, {9: 0.95, 0: 0.05}),
    6: by_row({12: 0.95, 0: 0.05}, certain(16)),                        # B: first of block 2
    7: by_row(certain(0), {17: 0.95, 0: 0.05}),
    8: by_row(certain(0), {18: 0.95, 0: 0.05}),
    9: by_row(certain(0), {19: 0.95, 0: 0.05}),
}


def test_eos_stops_one_row_and_the_other_goes_on():
    runner = ScriptedRunner(EOS_SCRIPT)
    a, b = generate(runner, [PROMPT, [4, 5]], threshold=0.9, max_new_tokens=8)
    # A: block [10, 11, EOS, 12] in one pass, cut after EOS; no further pass counts for A
    assert a["token_ids"] == [10, 11, EOS]
    assert (a["stats"]["forward_passes"], a["stats"]["denoise_passes"], a["stats"]["commit_passes"]) == (2, 1, 0)
    assert a["stats"]["tokens_per_forward"] == pytest.approx(3 / 2)
    # B: block [6, 7, 8, 9] in two passes (.60 waits), commit, block [16, 17, 18, 19] in one
    assert b["token_ids"] == [6, 7, 8, 9, 16, 17, 18, 19]
    assert (b["stats"]["forward_passes"], b["stats"]["denoise_passes"], b["stats"]["commit_passes"]) == (5, 3, 1)
    # the same rows one by one
    for prompt, got in (([1, 2, 3], a), ([4, 5], b)):
        alone = generate(ScriptedRunner(EOS_SCRIPT), [prompt], threshold=0.9, max_new_tokens=8)[0]
        assert alone["token_ids"] == got["token_ids"]
        assert alone["stats"]["forward_passes"] == got["stats"]["forward_passes"]


def test_eos_only_stops_when_asked():
    runner = ScriptedRunner(EOS_SCRIPT)
    out = generate(runner, [PROMPT], threshold=0.9, max_new_tokens=8, stop_at_eos=False)[0]
    assert out["token_ids"] == [10, 11, EOS, 12, 0, 0, 0, 0]
    assert [c["kind"] for c in runner.calls] == ["prefill", "denoise", "commit", "denoise"]
    runner = ScriptedRunner(EOS_SCRIPT)
    out = generate(runner, [PROMPT], threshold=0.9, max_new_tokens=8)[0]
    assert out["token_ids"] == [10, 11, EOS]
    assert [c["kind"] for c in runner.calls] == ["prefill", "denoise"]  # no pass after the EOS block


# ---------------------------------------------------------------------------------------------
# full-sequence decoding: prompt [1, 2, 3], 4 masked positions (3..6), suffix [7, 8] at 7, 8.
# Confidences: position 3 .90, 4 .50, 5 .70, 6 .80; position 6's token depends on the suffix,
# which only a bidirectional pass sees

FULL_SCRIPT = {
    3: {10: 0.90, 0: 0.10},
    4: {11: 0.50, 0: 0.30, 1: 0.20},
    5: {12: 0.70, 0: 0.30},
    6: lambda seen: {13: 0.80, 0: 0.20} if seen.get(7) == 7 else {14: 0.80, 0: 0.20},
}

FULL_CASES = [
    # steps -> the ids of each pass (positions 0..8)
    (2, [[1, 2, 3, M, M, M, M, 7, 8], [1, 2, 3, 10, M, M, 13, 7, 8]]),
    (3, [[1, 2, 3, M, M, M, M, 7, 8], [1, 2, 3, 10, M, M, 13, 7, 8], [1, 2, 3, 10, M, 12, 13, 7, 8]]),
    (4, [[1, 2, 3, M, M, M, M, 7, 8], [1, 2, 3, 10, M, M, M, 7, 8], [1, 2, 3, 10, M, M, 13, 7, 8],
         [1, 2, 3, 10, M, 12, 13, 7, 8]]),
    (1, [[1, 2, 3, M, M, M, M, 7, 8]]),
]


@pytest.mark.parametrize("steps,passes", FULL_CASES)
def test_full_sequence_unmasking_per_step(steps, passes):
    runner = ScriptedRunner(FULL_SCRIPT)
    with pytest.warns(UserWarning, match="not a single-stream one"):
        out = generate(runner, [PROMPT], mode="full", suffix=[7, 8], max_new_tokens=4, steps=steps)[0]
    assert [c["input"] for c in runner.calls] == passes
    assert all(c["kind"] == "full" for c in runner.calls)
    assert out["token_ids"] == [10, 11, 12, 13]
    assert out["stats"]["forward_passes"] == out["stats"]["denoise_passes"] == steps


# ---------------------------------------------------------------------------------------------
# sampling: a model with one fixed distribution everywhere; many rows of one batch are many
# independent draws (the prefill's token, then the denoised second token of a block of 2)

BASE = [0.5, 0.25, 0.125, 0.0625, 0.0625]  # tokens 0..4; every other token has probability 0


class ConstantRunner(ModelRunner):
    def __init__(self):
        info = RunnerInfo(vocab_size=8, mask_token_id=7, eos_token_ids=(), block_size=2,
                          layout="dual_context_causal", has_metadata=True, source="constant model")
        super().__init__(info, torch.device("cpu"))
        p = torch.zeros(8)
        p[:5] = torch.tensor(BASE)
        self.logits = p.log()

    def _reset_cache(self):
        pass

    def _forward(self, ids, position_ids, mask, past, cached, append):
        return self.logits.expand(ids.shape[0], ids.shape[1], -1).clone()


def _sqrt_base():
    s = [math.sqrt(p) for p in BASE]
    return {t: v / sum(s) for t, v in enumerate(s)}


SAMPLING_CASES = [
    # (temperature, top_p, expected distribution written out)
    (1.0, 1.0, dict(enumerate(BASE))),
    # sorted cumulative .5 .75 .875: the nucleus of 0.8 is {0, 1, 2}, renormalised by .875
    (1.0, 0.8, {0: 4 / 7, 1: 2 / 7, 2: 1 / 7}),
    # T = 0.5 squares the probabilities: .25 .0625 .0156 .0039 .0039 over .3359 = .744 .186 ...;
    # the nucleus of 0.9 is {0, 1} (.744 + .186 = .930), renormalised: .8 and .2
    (0.5, 0.9, {0: 0.8, 1: 0.2}),
    # T = 2 takes square roots
    (2.0, 1.0, _sqrt_base()),
]
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}  # chi-square quantiles at 0.999


@pytest.mark.parametrize("temperature,top_p,expected", SAMPLING_CASES)
def test_sampling_matches_the_tempered_nucleus(temperature, top_p, expected):
    n = 20000
    out = generate(ConstantRunner(), [[1]] * n, temperature=temperature, top_p=top_p, seed=11,
                   max_new_tokens=2, stop_at_eos=False)
    for col, what in ((0, "prefill"), (1, "denoised")):
        counts = torch.bincount(torch.tensor([o["token_ids"][col] for o in out]), minlength=8).tolist()
        outside = {t: c for t, c in enumerate(counts) if t not in expected and c}
        assert not outside, f"{what}: tokens outside the nucleus drawn {outside}"
        chi2 = sum((counts[t] - n * p) ** 2 / (n * p) for t, p in expected.items())
        assert chi2 < CHI2_999[len(expected) - 1], (what, counts, chi2)


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds():
    def draw(seed):
        return [o["token_ids"] for o in generate(ConstantRunner(), [[1]] * 200, temperature=1.0, seed=seed,
                                                 max_new_tokens=2, stop_at_eos=False)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
