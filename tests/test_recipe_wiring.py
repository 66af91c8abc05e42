"""Wiring of every recipe through the real trainer: what a training step hands to the noise, to
the model and to the loss, checked against values written out here from docs/method.md (not
computed by the code under test). Also: a recipe defined in this file trains through the normal
trainer without touching the package."""
import json

import pytest
import torch

from megatron_nbdiff.training import recipes as recipes_module

from _fixtures import losses, make_config, run

INTERVAL = 4  # curriculum: B = 1 at steps 0-3, 2 at 4-7, 4 at 8-11, 8 from 12 (block_max 8)
SEQ = 32


class Capture:
    """Records the noise calls (arguments and outputs), the model calls and the loss arguments
    of every micro-batch, tagged with the training step the model was called at."""

    def __init__(self, monkeypatch):
        self.noise, self.model, self.dual_loss = [], [], []
        real_noise = recipes_module.mask_tokens
        real_dual = recipes_module.dual_stream_loss

        def noise(tokens, **kw):
            out = real_noise(tokens, **kw)
            self.noise.append(dict(kw, tokens=tokens.clone(), out=out))
            return out

        def dual(*args, **kw):
            self.dual_loss.append(dict(ar_weight=args[6], masked=args[4]))
            return real_dual(*args, **kw)

        from megatron_nbdiff.models.model import NBDiffModel

        real_forward = NBDiffModel.forward

        def forward(model_self, *args, **kw):
            self.model.append(dict(kw))
            return real_forward(model_self, *args, **kw)

        monkeypatch.setattr(recipes_module, "mask_tokens", noise)
        monkeypatch.setattr(recipes_module, "dual_stream_loss", dual)
        monkeypatch.setattr(NBDiffModel, "forward", forward)


def train(corpus, tmp_path, monkeypatch, recipe, steps, **train):
    cap = Capture(monkeypatch)
    data = make_config(corpus, tmp_path, recipe=dict(block_interval=INTERVAL, **recipe),
                       train=dict(steps=steps, seq_len=SEQ, **train))
    code, trainer = run(data)
    assert code == 0
    return cap, trainer


@pytest.mark.parametrize("name,layout,lam", [
    ("nbdiff", "dual_context_causal", 0.5),
    ("block_causal", "dual_block_causal", 0.5),
])
def test_curriculum_recipes_wiring(corpus, tmp_path, monkeypatch, name, layout, lam):
    steps = 10
    cap, trainer = train(corpus, tmp_path, monkeypatch, dict(name=name), steps)
    # two micro-batches per step (global 4, micro 2): the model is called twice a step
    per_step = [cap.model[2 * s] for s in range(steps)]
    # block size at the steps where the curriculum changes: 1 until step 3, 2 from 4, 4 from 8
    expected_b = {0: 1, 3: 1, 4: 2, 7: 2, 8: 4, 9: 4}
    for s, b in expected_b.items():
        kw = per_step[s]
        if b == 1:  # no masked positions at B = 1: the clean stream alone, causally
            assert kw["layout"] == "causal" and "block_size" not in kw, (s, kw)
        else:
            assert kw["layout"] == layout and kw["block_size"] == b, (s, kw)
    assert [r["block_size"] for r in sorted(losses(tmp_path).values(), key=lambda r: r["step"])] == \
        [1, 1, 1, 1, 2, 2, 2, 2, 4, 4]
    # the noise is called only for B > 1, once per micro-batch, with the step's block size
    assert [c["step"] for c in cap.noise] == [4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    for c in cap.noise:
        b = expected_b.get(c["step"], 2 if c["step"] < 8 else 4)
        assert c["block_size"] == b
        assert c["weight_mode"] == "one" and c["t_mode"] == "per_block"
        assert c["mask_token_id"] == 3 and c["seed"] == 1234
        out = c["out"]
        # the first token of every block is never masked; the others may be
        assert not out.is_masked[:, ::b].any(), c["step"]
        assert out.is_masked.any()
        assert torch.equal(out.noisy_ids[out.is_masked], torch.full_like(out.noisy_ids[out.is_masked], 3))
        assert torch.equal(out.noisy_ids[~out.is_masked], c["tokens"][~out.is_masked])
        # one t per block, weight 1 on masked positions, 0 elsewhere
        t = out.t.reshape(out.t.shape[0], SEQ // b, b)
        assert torch.equal(t, t[..., :1].expand_as(t))
        assert torch.equal(out.weight[out.is_masked], torch.ones_like(out.weight[out.is_masked]))
        assert not out.weight[~out.is_masked].any()
    # the sample indices of step s are s * 4 + (0, 1) and s * 4 + (2, 3)
    assert [c["sample_index"].tolist() for c in cap.noise[:2]] == [[16, 17], [18, 19]]
    assert all(c["ar_weight"] == lam for c in cap.dual_loss)
    # trainer_state.json records the block size of the step after the checkpoint (4 at step 10)
    state = json.loads((tmp_path / "checkpoints" / "step_0000010" / "trainer_state.json").read_text())
    assert state["block_size"] == 4 and state["step"] == 10
    # what a checkpoint tells decoding: the block size of its last trained step
    assert [trainer.recipe.metadata_block_size(s, SEQ) for s in (4, 5, 8, 9, 12, 13)] == [1, 2, 2, 4, 4, 8]


def test_transplant_wiring(corpus, tmp_path, monkeypatch):
    cap, trainer = train(corpus, tmp_path, monkeypatch, dict(name="transplant"), 2)
    # no curriculum: block_max (8 here) from step 0, lambda 0
    assert {kw["block_size"] for kw in cap.model} == {8}
    assert {kw["layout"] for kw in cap.model} == {"dual_context_causal"}
    assert all(c["block_size"] == 8 for c in cap.noise) and len(cap.noise) == 4
    assert all(c["ar_weight"] == 0.0 for c in cap.dual_loss)
    assert trainer.recipe.metadata_block_size(2, SEQ) == 8


def test_diffullama_wiring(corpus, tmp_path, monkeypatch):
    steps = 3
    cap, trainer = train(corpus, tmp_path, monkeypatch, dict(name="diffullama", anneal_steps=10), steps)
    # single stream, annealing step == training step, K from the config, seed of the run
    assert [kw["anneal_step"] for kw in cap.model] == [0, 0, 1, 1, 2, 2]
    assert {kw["anneal_steps"] for kw in cap.model} == {10}
    assert {kw["anneal_seed"] for kw in cap.model} == {1234}
    assert {kw["layout"] for kw in cap.model} == {"single_annealed"}
    assert all("noisy_ids" in kw for kw in cap.model)
    for c in cap.noise:
        assert c["block_size"] is None and c["t_mode"] == "per_sequence" and c["weight_mode"] == "inv_t"
        out = c["out"]
        # one t per sequence; weight 1/t on masked positions; every position may be masked
        assert torch.equal(out.t, out.t[:, :1].expand_as(out.t))
        m = out.is_masked
        assert torch.allclose(out.weight[m], 1.0 / out.t[m])
        assert not out.weight[~m].any()
        # position 0 has no logit that predicts it; every later position may be masked
        assert not m[:, 0].any() and m[:, 1:].any()
    assert trainer.recipe.metadata_block_size(steps, SEQ) == SEQ


def test_ar_wiring(corpus, tmp_path, monkeypatch):
    cap, trainer = train(corpus, tmp_path, monkeypatch, dict(name="ar"), 2)
    assert cap.noise == [] and {kw["layout"] for kw in cap.model} == {"causal"}
    assert trainer.recipe.metadata_block_size(2, SEQ) == 1


def test_a_recipe_defined_in_a_test_trains_through_the_trainer(corpus, tmp_path):
    """One class, registered from here: AR on the clean stream with the loss doubled."""
    from megatron_nbdiff.training import Recipe, register_recipe
    from megatron_nbdiff.training.losses import ar_loss

    @register_recipe
    class DoubledAR(Recipe):
        name = "doubled_ar_test"
        layout = "causal"
        needs_mask_token = False
        calls = []

        def forward_and_loss(self, tokens, sample_index, model, ctx):
            DoubledAR.calls.append(ctx.step)
            out = model(tokens, layout="causal", doc_ids=ctx.doc_ids)

            def loss(o):
                parts = ar_loss(o.clean, tokens, torch.ones_like(tokens), **ctx.loss_kwargs)
                parts.loss = 2 * parts.loss
                return parts

            return out, loss

    data = make_config(corpus, tmp_path / "toy", recipe=dict(name="doubled_ar_test", mask_token_id=None),
                       train=dict(steps=2), checkpoint=dict(save_dir=str(tmp_path / "toy")))
    code, trainer = run(data)
    assert code == 0 and DoubledAR.calls == [0, 0, 1, 1]
    ref = make_config(corpus, tmp_path / "ar", recipe=dict(name="ar", mask_token_id=None), train=dict(steps=1),
                      checkpoint=dict(save_dir=str(tmp_path / "ar")))
    run(ref)
    toy, ar = losses(tmp_path / "toy"), losses(tmp_path / "ar")
    assert abs(toy[0]["loss"] - 2 * ar[0]["loss"]) < 1e-6 and toy[0]["ar"] == ar[0]["ar"]
    assert (tmp_path / "toy" / "checkpoints" / "step_0000002" / "COMPLETE").is_file()
