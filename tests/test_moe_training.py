"""Mixture-of-experts training and decoding on CPU: a tiny Qwen3-MoE-shaped model (4 experts,
top-2 renormalised, QK-norm, hidden 32, 2 layers, sequence 16) trained with the nbdiff recipe.

EP=2 (two gloo processes) with the alltoall token dispatcher gives the EP=1 losses, gradient
norms, router losses and expert loads step for step, and exactly the steps of the allgather
dispatcher; checkpoints cross EP in both directions and cross dispatchers; so does CP=2; the
router losses reach the gradient with megatron's per-micro-batch scale (checked against a hand
computation from the routers' inputs) and are reported with the expert load of each stream;
nbdiff lowers the loss; resume is exact; the Megatron runner's block-size-1 decoding of a
converted Qwen3-MoE / Mixtral checkpoint (also at EP=2, where the default dispatcher is alltoall)
and the HF runner's of its export equal transformers' greedy generate; bad layouts and a bad
dispatcher are one error before any work."""
import os

import pytest
import torch

from megatron_nbdiff.config import RunConfig
from megatron_nbdiff.errors import ConfigError

from _fixtures import losses, make_config, run
from _gloo import run_world
from _moe_workers import VOCAB, make_moe_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = dict(hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=16, ffn_hidden_size=64,
           qk_layernorm=True, num_experts=4, moe_topk=2, moe_ffn_hidden_size=32)


def moe_config(corpus, save_dir, model=None, recipe=None, train=None, checkpoint=None) -> dict:
    """A run config of the tiny MoE model on the corpus: nbdiff with the curriculum 1, 2, 4."""
    return make_config(corpus, save_dir, model=dict(MOE, **(model or {})),
                       recipe=dict(dict(block_interval=1, block_max=4), **(recipe or {})),
                       train=dict(dict(steps=6, seq_len=16, warmup_steps=1), **(train or {})),
                       checkpoint=dict(save_dir=str(save_dir), **(checkpoint or {})))


def moe_entries(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith(("moe_", "expert_"))}


def assert_close_entries(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=1e-9), k


# --- expert parallelism in training ------------------------------------------------------------


def test_ep2_training_equals_ep1_and_checkpoints_cross_ep_and_dispatcher(corpus, tmp_path):
    """One run that changes EP twice and the token dispatcher: steps 0-1 at EP=1 with the
    ``allgather`` dispatcher (checkpoint at 2), 2-3 at EP=2 on two processes with ``alltoall``
    (resumed from the EP=1 checkpoint, with Adam state; checkpoint at 4), 4-5 at EP=1 again
    (resumed from the EP=2 checkpoint). Every step equals an uninterrupted EP=1 run: loss,
    gradient norm, router losses and expert load per stream. In the same two processes a copy of
    the step-2 checkpoint resumed at EP=2 with ``allgather`` gives the ``alltoall`` steps exactly:
    the dispatcher moves the same tokens to the same experts."""
    import shutil

    router = dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    ref_data = moe_config(corpus, tmp_path / "ref", model=router)
    code, ref_trainer = run(ref_data)
    assert code == 0
    ref = losses(tmp_path / "ref")
    data = moe_config(corpus, tmp_path / "mixed", model=router, train=dict(moe_dispatcher="allgather"),
                      checkpoint=dict(save_interval=2))
    assert run(data, stop_after=2)[0] == 0
    shutil.copytree(tmp_path / "mixed" / "checkpoints", tmp_path / "gathered" / "checkpoints")
    alltoall = dict(data, train=dict(data["train"], ep=2, moe_dispatcher="alltoall"))
    gathered = moe_config(corpus, tmp_path / "gathered", model=router, train=dict(ep=2, moe_dispatcher="allgather"),
                          checkpoint=dict(save_interval=2))
    got = run_world("_moe_workers", "train_records", str(tmp_path / "out"), runs=[alltoall, gathered], steps=2)
    for rank in got:
        assert [r["dispatchers"] for r in rank] == [["MoEAlltoAllTokenDispatcher"], ["MoEAllGatherTokenDispatcher"]]
        assert [r["local_experts"] for r in rank] == [[2, 2], [2, 2]]  # 4 experts, 2 per rank in each layer
        assert [r["num_params"] for r in rank] == [ref_trainer.num_params] * 2  # every expert counted once
    a2a, ag = got[0]
    assert [r["step"] for r in a2a["records"]] == [0, 1, 2, 3] and [r["step"] for r in ag["records"]] == [2, 3]
    for x, y in zip(a2a["records"][2:], ag["records"]):
        assert (x["loss"], x["grad_norm"], moe_entries(x)) == (y["loss"], y["grad_norm"], moe_entries(y))
    code, trainer = run(data)
    assert code == 0 and trainer.start_step == 4
    mixed = losses(tmp_path / "mixed")
    assert sorted(mixed) == sorted(ref) == list(range(6))
    for step in range(6):
        a, b = mixed[step], ref[step]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), step
        assert_close_entries(moe_entries(a), moe_entries(b), rel=1e-5)
    assert {"moe_load_balancing_loss", "moe_z_loss", "expert_load_noisy", "expert_load_clean"} <= set(mixed[3])
    assert "expert_load_noisy" not in mixed[0]  # block size 1: the clean stream alone


def test_cp2_moe_training_equals_cp1_with_the_same_load_per_stream(corpus, tmp_path):
    """Context parallelism on a MoE model: each of the two ranks holds L/2 positions of each
    stream, and the router losses (megatron's partial sums over the context ranks) and the
    expert load per stream are the one-process ones."""
    router = dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    one = moe_config(corpus, tmp_path / "one", model=router, recipe=dict(block_size=4), train=dict(steps=2))
    assert run(one)[0] == 0
    two = moe_config(corpus, tmp_path / "two", model=router, recipe=dict(block_size=4), train=dict(steps=2))
    run_world("_dist_workers", "train_records", str(tmp_path / "out"), data=two, cp=2, steps=2)
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    for step in range(2):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
        assert_close_entries(moe_entries(got[step]), moe_entries(ref[step]), rel=1e-5)
    assert got[1]["expert_load_noisy"] != got[1]["expert_load_clean"]  # the streams are told apart


def test_router_losses_and_expert_load_match_a_hand_computation(corpus, tmp_path):
    """Two micro-batches on one process, the same model with and without router losses: the
    difference of the last MoE layer's router-weight gradients is the gradient of
    mean_micro-batches(c_aux * switch_loss + c_z * z_loss) computed by hand from the router's
    inputs (megatron's schedule scales each micro-batch's router losses by 1 / micro-batches); the
    reported router losses are their means over micro-batches and MoE layers, the recipe's loss is
    unchanged, and the expert loads count the first L positions as the noisy stream."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_nbdiff.training.trainer import Trainer

    c_aux, c_z, topk, experts, seq = 0.1, 0.05, MOE["moe_topk"], MOE["num_experts"], 16

    def one_step(name, aux, z):
        data = moe_config(corpus, tmp_path / name, model=dict(moe_aux_loss_coeff=aux, moe_z_loss_coeff=z),
                          recipe=dict(block_size=4), train=dict(clip_grad=0.0))
        trainer = Trainer(RunConfig.from_dict(data), quiet=True)
        trainer.setup()
        assert trainer.num_micro == 2
        # the MFU's active parameters leave out num_experts - topk experts of this size per MoE layer
        one_expert = next(m for m in trainer.inner.modules() if type(m).__name__ == "SequentialMLP").local_experts[0]
        assert sum(p.numel() for p in one_expert.parameters()) == 3 * MOE["hidden_size"] * MOE["moe_ffn_hidden_size"]
        routers = [m for m in trainer.inner.modules() if isinstance(m, TopKRouter)]
        weights = {r.layer_number: r.weight.detach().clone() for r in routers}
        calls = []
        for r in routers:
            r.register_forward_hook(lambda mod, args, out: calls.append(
                (mod.layer_number, args[0].detach().clone(), out[1].detach().clone())))
        m = trainer.train_step(0)  # no clipping: the main gradients stay as the backward left them
        return m, calls, weights, {r.layer_number: r.weight.main_grad.clone() for r in routers}

    with_losses, calls, weights, grads = one_step("with", c_aux, c_z)
    without, _, _, grads0 = one_step("without", 0.0, 0.0)
    assert with_losses.loss == without.loss and with_losses.diffusion == without.diffusion
    last = max(weights)
    assert len(calls) == 2 * len(weights)  # two micro-batches through every MoE layer

    switch, zs, expected = [], [], torch.zeros_like(weights[last])
    counts = torch.zeros(2, experts)  # noisy, clean
    for layer, x, routing_map in calls:
        w = weights[layer].clone().requires_grad_(True)
        logits = x.reshape(-1, x.shape[-1]).float() @ w.t()
        probs = torch.softmax(logits, -1)
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(topk, -1).indices, 1.0)
        assert torch.equal(chosen.bool(), routing_map)
        fraction = chosen.sum(0) / (chosen.shape[0] * topk)  # of the routed assignments, per expert
        sw = experts * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        switch.append(float(sw))
        zs.append(float(z))
        if layer == last:
            (grad,) = torch.autograd.grad((c_aux * sw + c_z * z) / 2, w)
            expected += grad
        stream = (torch.arange(x.shape[0]) >= seq).long()  # positions [s, b]: the first L are noisy
        counts.index_add_(0, stream, chosen.reshape(x.shape[0], x.shape[1], experts).sum(1))
    delta = grads[last] - grads0[last]
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert float(expected.abs().max()) > 1e-3  # the router losses move the router visibly
    assert all(not torch.equal(grads[layer], grads0[layer]) for layer in weights)  # every router's losses count
    moe = with_losses.moe
    assert moe["moe_load_balancing_loss"] == pytest.approx(sum(switch) / len(switch), rel=1e-6)
    assert moe["moe_z_loss"] == pytest.approx(sum(zs) / len(zs), rel=1e-6)
    assert "moe_load_balancing_loss" not in without.moe and "moe_z_loss" not in without.moe
    for i, name in enumerate(("noisy", "clean")):
        assert moe[f"expert_load_{name}"] == pytest.approx((counts[i] / counts[i].sum()).tolist(), abs=1e-12)
        assert sum(moe[f"expert_load_{name}"]) == pytest.approx(1.0)
        assert 1.0 <= moe[f"expert_max_mean_{name}"] <= experts / topk
    assert 0.0 <= moe["expert_load_tv_noisy_clean"] <= 1.0
    assert with_losses.record()["expert_load_noisy"] == moe["expert_load_noisy"]  # flat in metrics.jsonl


def test_nbdiff_lowers_the_loss_on_a_tiny_moe_and_logs_the_load_per_stream(corpus, tmp_path):
    data = moe_config(corpus, tmp_path, recipe=dict(block_size=4), train=dict(steps=20, lr=5e-3))
    assert run(data)[0] == 0
    rec = losses(tmp_path)
    first = sum(rec[s]["loss"] for s in range(3)) / 3
    last = sum(rec[s]["loss"] for s in range(17, 20)) / 3
    assert last < 0.8 * first, (first, last)
    for r in rec.values():
        for name in ("noisy", "clean"):
            assert len(r[f"expert_load_{name}"]) == MOE["num_experts"]
            assert sum(r[f"expert_load_{name}"]) == pytest.approx(1.0)
            assert len(r[f"expert_max_mean_{name}_layers"]) == 2
        assert "moe_load_balancing_loss" not in r  # coefficient 0: not reported


def test_resume_is_exact_on_a_tiny_moe(corpus, tmp_path):
    full = moe_config(corpus, tmp_path / "full", model=dict(moe_aux_loss_coeff=0.01), train=dict(steps=8))
    assert run(full)[0] == 0
    part = moe_config(corpus, tmp_path / "part", model=dict(moe_aux_loss_coeff=0.01), train=dict(steps=8),
                      checkpoint=dict(save_interval=4))
    assert run(part, stop_after=6)[0] == 0  # "killed" after step 5: its last checkpoint is step 4
    code, trainer = run(part)
    assert code == 0 and trainer.start_step == 4
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(8))
    for step in range(8):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"], step
        assert moe_entries(a[step]) == moe_entries(b[step]), step


# --- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_block_size_one_decoding_equals_transformers_greedy(family, tmp_path):
    """The Megatron runner on the converted checkpoint (one process, and EP=2 on two for
    Qwen3-MoE) and the HF runner on its export decode exactly what transformers' greedy generate
    does on the original HF model."""
    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_nbdiff.inference import generate, load_runner

    hf, meg, exp = str(tmp_path / "hf"), str(tmp_path / "meg"), str(tmp_path / "exp")
    model = make_moe_checkpoint(hf, family)
    convert_hf_to_megatron(hf, meg, mask_token="append", progress=False)
    convert_megatron_to_hf(meg, exp, progress=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 9)]
    ref = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    for path in (meg, exp):
        runner = load_runner(path)
        assert type(runner).__name__ == ("MegatronRunner" if path == meg else "HFRunner")
        got = [generate(runner, [p], block_size=1, max_new_tokens=10, stop_at_eos=False)[0]["token_ids"]
               for p in prompts]
        assert got == ref, path
    if family == "qwen3_moe":
        ranks = run_world("_moe_workers", "decode", str(tmp_path / "out"), init=False, ckpt=meg, prompts=prompts,
                          ep=2, max_new_tokens=10)
        assert [r["local_experts"] for r in ranks] == [[3], [3]]  # layer 0 dense, 6 experts over 2 ranks
        assert [r["dispatchers"] for r in ranks] == [["MoEAlltoAllTokenDispatcher"]] * 2  # 'auto' at EP=2
        assert ranks[0]["tokens"] == ranks[1]["tokens"] == ref


# --- bad input ---------------------------------------------------------------------------------


def test_bad_expert_layouts_fail_before_any_work(corpus, tmp_path):
    from megatron_nbdiff.training.validation import validate_run

    cases = [
        (dict(model=MOE, train=dict(ep=3)), r"train.tp/pp/cp/ep = 1/1/1/3: expert parallel size 3 does not divide "
                                            r"num_experts=4"),
        (dict(train=dict(ep=2)), "expert parallel size 2 needs a mixture-of-experts model; this one is dense"),
        (dict(model=MOE, train=dict(ep=2)), r"expert parallel size 2 does not divide world size 1 / \(tensor"),
        (dict(model=MOE, train=dict(ep=0)), "train.ep must be >= 1"),
        (dict(model=MOE, train=dict(moe_dispatcher="all2all")),
         "train.moe_dispatcher: expected one of 'auto' | 'allgather' | 'alltoall', found 'all2all'"),
    ]
    for sections, needle in cases:
        save = tmp_path / "run"
        with pytest.raises(ConfigError, match=needle) as info:
            run(make_config(corpus, save, **sections))  # in the trainer, before the process groups
        assert "\n" not in str(info.value)
        assert not save.exists()
    # the launcher's view of a job: EP=2 on two data-parallel ranks is fine, four are too many
    two = RunConfig.from_dict(make_config(corpus, tmp_path / "v", model=MOE, train=dict(ep=2)))
    validate_run(two, world_size=2, check_data=False)
    with pytest.raises(ConfigError, match="expert parallel size 4 does not divide the data-parallel size 2"):
        validate_run(RunConfig.from_dict(make_config(corpus, tmp_path / "v", model=MOE, train=dict(ep=4))),
                     world_size=2, check_data=False)
    with pytest.raises(ConfigError, match="train.tp 2 with a mixture-of-experts model needs train.sequence_parallel"):
        validate_run(RunConfig.from_dict(make_config(corpus, tmp_path / "v", model=MOE, train=dict(tp=2))),
                     world_size=2, check_data=False)
    assert not (tmp_path / "v").exists()


def test_bad_expert_parallel_sizes_for_decoding_and_conversion(tmp_path):
    from megatron_nbdiff.checkpoint import ConversionError, convert_hf_to_megatron
    from megatron_nbdiff.checkpoint.cli import hf_to_megatron_main
    from megatron_nbdiff.inference.megatron_runner import MegatronRunner
    from megatron_nbdiff.inference.runner import DecodingError

    hf, meg, out = str(tmp_path / "hf"), str(tmp_path / "meg"), str(tmp_path / "out")
    make_moe_checkpoint(hf, "mixtral")  # 6 experts
    with pytest.raises(ConversionError, match="--ep 4 does not divide the 6 experts") as info:
        hf_to_megatron_main(["--hf-dir", hf, "--out-dir", out, "--ep", "4", "--mask-token", "none", "--no-progress"])
    assert "\n" not in str(info.value) and not os.path.exists(out)
    with pytest.raises(ConversionError, match="--ep must be a positive integer"):
        hf_to_megatron_main(["--hf-dir", hf, "--out-dir", out, "--ep", "0"])
    convert_hf_to_megatron(hf, meg, ep=2, mask_token="none", progress=False)
    with pytest.raises(DecodingError, match="EP=4 does not divide the 6 experts of"):
        MegatronRunner.from_checkpoint(meg, ep=4)


def test_router_losses_and_attention_backend_may_differ_from_the_init_checkpoint(tmp_path):
    """A converted checkpoint records the router-loss coefficients as 0: a run's model section may
    set them (and the attention kernel), nothing that changes the weights; a dense section
    against a MoE checkpoint is refused although a dense dict has no MoE fields."""
    import dataclasses

    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, read_metadata
    from megatron_nbdiff.training.validation import resolve_model

    hf, meg = str(tmp_path / "hf"), str(tmp_path / "meg")
    make_moe_checkpoint(hf, "qwen3_moe")
    convert_hf_to_megatron(hf, meg, mask_token="none", progress=False)
    meta = read_metadata(meg)
    stored = meta.get_model_config()

    def section(**changes):
        model = dataclasses.replace(stored, **changes).to_dict()
        return RunConfig.from_dict(dict(model=model, checkpoint=dict(init_from=meg, save_dir=str(tmp_path / "r"))))

    tuned = section(moe_aux_loss_coeff=0.001, moe_z_loss_coeff=0.001, attention_backend="flex")
    assert resolve_model(tuned, meta).moe_aux_loss_coeff == 0.001
    with pytest.raises(ConfigError, match="moe_topk: 3 here, 2 in the checkpoint"):
        resolve_model(section(moe_topk=3), meta)
    dense = section(num_experts=None, moe_topk=None, moe_ffn_hidden_size=None, moe_dense_layers=None)
    with pytest.raises(ConfigError, match="num_experts: None here, 6 in the checkpoint"):
        resolve_model(dense, meta)


# --- the Slurm config --------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [4, 8])
def test_qwen3_30b_a3b_config_fits_4_to_8_nodes(nodes):
    from megatron_nbdiff.slurm import validate_launch
    from megatron_nbdiff.training.validation import check_layout

    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", "nbdiff_qwen3_30b_a3b.yaml"))
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_experts, m.moe_topk, m.moe_ffn_hidden_size) == (48, 2048, 128, 8, 768)
    assert t.tp * t.pp * t.cp == 32  # a replica on four nodes
    check_layout(cfg, m, world_size=nodes * 8)
    assert validate_launch(cfg, nodes, 8, 8, check_paths=False) == []
    with pytest.raises(ConfigError, match="world size 8 is not divisible by tensor 1 x pipeline 8 x context 4"):
        check_layout(cfg, m, world_size=8)  # one node cannot hold a replica


@pytest.mark.parametrize("recompute", [dict(recompute="full"), dict(recompute="selective", recompute_modules=["moe"])])
def test_recomputed_moe_layers_train_and_count_as_without(corpus, tmp_path, recompute):
    """Replayed MoE layers (whole layers, or megatron's 'moe' module) give the same steps, router
    losses and expert loads: a replay's routing is counted once, as its first pass is not."""
    router = dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    plain = moe_config(corpus, tmp_path / "plain", model=router, train=dict(steps=3))
    again = moe_config(corpus, tmp_path / "again", model=router, train=dict(steps=3, **recompute))
    assert run(plain)[0] == 0 and run(again)[0] == 0
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "again")
    for step in range(3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6), step
        assert_close_entries(moe_entries(b[step]), moe_entries(a[step]), rel=1e-6)
