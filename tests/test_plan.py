"""The capacity planner (megatron_nbdiff/planning/, tools/plan.py).

* Its per-rank parameter list (names and shapes) equals ``NBDiffModel.named_parameters()`` for
  three tiny dense configurations and a tiny mixture-of-experts one (4 experts, top-2, one dense
  layer on the second stage) at TP=1 (one process) and at TP=2, PP=2 and (MoE) EP=2 (two gloo
  processes: each rank's own shapes and experts, the tied output-layer copy on the last stage
  included); its weight and gradient bytes equal the bf16 model's and its DDP buffers' (megatron
  DDP with the distributed optimizer's padding, fp32 main gradients, the experts in a buffer of
  their own padded for the expert-data-parallel group); its optimizer bytes equal the fp32 master
  copy plus the Adam moments the real megatron optimizer creates (the CPU trainer's fp32
  optimizer holds the moments; the fp32 parameters are what the bf16 path's master copy is).
* The bytes a bf16 MoE layer's router, dispatcher and experts save for the backward pass equal
  the memory model's MoE block, with both routing orders and both token dispatchers (``allgather``,
  ``alltoall``) at EP=1 in one process and at EP=2 and TP=2 on two (counted with the rows each
  rank's experts really receive); a bf16 dense SwiGLU MLP saves the memory model's ``10f``.
* EP is enumerated for MoE models only, and every (TP, PP, CP, EP) the planner enumerates is one
  the trainer's layout check accepts, no more and no fewer EP sizes; a MoE plan's run config
  (``train.ep``, ``train.moe_dispatcher``, ``recompute_modules`` with ``moe``) passes the
  trainer's validation and the launcher's, and lowers to megatron's TransformerConfig with that
  dispatcher; EP > 1 layouts are planned with the faster of the two dispatchers; the MoE named
  shapes equal what the converter reads from their ``config.json``; a Mixtral HF directory is
  planned.
* Every ``tools/plan.py`` command in docs/plans.md prints what the document shows.
* The interleaved schedule's in-flight layers match Korthikanti et al.'s figure; CP chunks are
  whole blocks for dual-stream recipes.
* The best plan's run config loads and passes the Slurm launcher's validation (dry run), with
  the fields the trainer lacks in its comment only; JSON and PNG are written.
* Bad input (unknown shape, nothing fits, bad sizes) is one ``error:`` line and exit 2.
"""
import json

import pytest
import torch

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.config import ModelConfig, RunConfig, TrainConfig
from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.planning.cli import main as plan_main
from megatron_nbdiff.planning.layouts import Cluster, Layout, Workload, cp_allowed, enumerate_layouts
from megatron_nbdiff.planning.memory import (
    layers_in_flight,
    mlp_bytes_per_token,
    moe_block_bytes,
    moe_block_bytes_per_token,
)
from megatron_nbdiff.planning.parameters import (
    grad_buffer_numel,
    grad_buffers,
    rank_parameter_count,
    rank_parameter_counts,
    rank_parameters,
)

CONFIGS = {
    "gqa": dict(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96),
    "tied_qknorm_bias": dict(vocab_size=301, hidden_size=48, num_layers=4, num_attention_heads=6,
                             num_query_groups=2, ffn_hidden_size=80, qk_layernorm=True, add_qkv_bias=True,
                             tie_embeddings=True),
    "mha_kv_channels": dict(vocab_size=130, hidden_size=40, num_layers=2, num_attention_heads=2,
                            kv_channels=24, ffn_hidden_size=72, make_vocab_size_divisible_by=8),
    # layer 2 (the first of stage 1 at PP=2) stays dense
    "moe": dict(vocab_size=97, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96, qk_layernorm=True, num_experts=4, moe_topk=2, moe_ffn_hidden_size=48,
                moe_dense_layers=[2]),
}


def tiny(name):
    return ModelConfig(max_seq_len=64, **CONFIGS[name])


def _shapes(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@pytest.mark.usefixtures("one_process_group")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_gradients_optimizer_bytes_equal_the_model(name):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_nbdiff.models import NBDiffModel
    from megatron_nbdiff.training.model_and_optimizer import build_model_and_optimizer, mark_expert_params

    mc = tiny(name)
    planned = rank_parameters(mc)
    count = rank_parameter_count(mc)
    assert count == sum(torch.Size(s).numel() for _, s in planned)
    # the bf16 model megatron DDP wraps on a GPU: weights 2 bytes, main gradients 4 bytes per element
    tc = mc.transformer_config(dtype="bf16")
    model = NBDiffModel(mc, tc)
    assert _shapes(model) == planned
    assert (mark_expert_params(model) > 0) == mc.is_moe  # as the trainer does, at every EP
    half = Float16Module(tc, model)
    assert sum(p.numel() * p.element_size() for p in half.parameters()) == 2 * count
    ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), half)
    dense, expert = grad_buffers(mc, dp=1)
    assert [(b.grad_data.dtype, b.grad_data.numel(), b.param_data.numel()) for b in ddp.buffers] == [
        (torch.float32, dense, dense)]
    assert [(b.grad_data.dtype, b.grad_data.numel(), b.param_data.numel()) for b in ddp.expert_parallel_buffers] == (
        [(torch.float32, expert, expert)] if mc.is_moe else [])
    assert grad_buffer_numel(mc, dp=1) == dense + expert
    assert grad_buffer_numel(mc, dp=1, distributed_optimizer=False) == count
    # the optimizer as the trainer builds it (fp32 on CPU): Adam's m and v, and the fp32 weights a
    # bf16 run keeps as master copy -> the planner's 12 bytes per parameter at DP=1
    mo = build_model_and_optimizer(mc, TrainConfig(), "fp32", True, True, ps.get_model_parallel_group(),
                                   torch.device("cpu"))
    state_bytes = 0
    for opt in mo.optimizer.chained_optimizers:
        for g in opt.optimizer.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.optimizer.step()
        for st in opt.optimizer.state.values():
            state_bytes += sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    master = sum(p.numel() * p.element_size() for p in mo.inner.parameters())
    assert state_bytes + master == 12 * count


def _per_rank_shapes(rank, configs):
    """Worker: each rank's parameter shapes at TP=2 (PP=1), at PP=2 (TP=1) and, for a MoE model,
    at EP=2 (DP=2), and its DDP buffer sizes (dense, expert) with the distributed optimizer at
    PP=2 and EP=2, the expert parameters marked as the trainer marks them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_nbdiff.models import NBDiffModel
    from megatron_nbdiff.parallel import initialize_parallel
    from megatron_nbdiff.training.model_and_optimizer import mark_expert_params

    def buffers(tc, model):
        mark_expert_params(model)
        ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
        return [sum(b.grad_data.numel() for b in ddp.buffers),
                sum(b.grad_data.numel() for b in ddp.expert_parallel_buffers)]

    out = {}
    for name in configs:
        mc = ModelConfig(max_seq_len=64, **CONFIGS[name])
        initialize_parallel(2, 1)
        out[f"{name}/tp2"] = _shapes(NBDiffModel(mc, mc.transformer_config(tp=2)))
        initialize_parallel(1, 2)
        tc = mc.transformer_config(pp=2)
        model = NBDiffModel(mc, tc, pre_process=rank == 0, post_process=rank == 1)
        out[f"{name}/pp2"] = _shapes(model)
        out[f"{name}/pp2_buffers"] = buffers(tc, model)
        if mc.is_moe:
            initialize_parallel(1, 1, ep=2)
            tc = mc.transformer_config(ep=2)
            model = NBDiffModel(mc, tc)
            out[f"{name}/ep2"] = _shapes(model)
            out[f"{name}/ep2_buffers"] = buffers(tc, model)
            for dispatcher in ("allgather", "alltoall"):
                for tp, ep in ((2, 1), (1, 2)):
                    initialize_parallel(tp, 1, ep=ep)
                    tc = mc.transformer_config(tp=tp, ep=ep, moe_dispatcher=dispatcher, sequence_parallel=tp > 1,
                                               dtype="bf16")
                    out[f"{name}/saved_tp{tp}_ep{ep}_{dispatcher}"] = _moe_saved_bytes(mc, tc, tp, seed=rank)
    return out


def _moe_saved_bytes(mc, tc, tp=1, seed=0):
    """(bytes, tokens, rows): what the bf16 MoE layer 0 of a model built with ``tc`` saves for its
    backward pass (tensor storages other than the weights and the layer's input, each counted
    once), for the 40 x 3 tokens of a micro-batch (``40 / tp`` x 3 on this TP rank), and the
    (token, expert) rows its experts received (checked against its dispatcher's class)."""
    from megatron_nbdiff.models import NBDiffModel

    model = NBDiffModel(mc, tc).to(torch.bfloat16)
    moe = model.gpt.decoder.layers[0].mlp
    assert type(moe).__name__ == "MoELayer"
    assert type(moe.token_dispatcher).__name__ == {"allgather": "MoEAllGatherTokenDispatcher",
                                                   "alltoall": "MoEAlltoAllTokenDispatcher"}[
        tc.moe_token_dispatcher_type]
    seq, batch = 40 // tp, 3
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, batch, mc.hidden_size, generator=g).to(torch.bfloat16).requires_grad_(True)
    rows = []
    moe.experts.register_forward_hook(lambda module, args, out: rows.append(int(args[1].sum())))
    return _saved_bytes(model, moe, x), seq * batch, rows[0]


def _saved_bytes(model, module, x) -> int:
    """Bytes ``module`` (of ``model``) saves for its backward pass on input ``x``: the storages of
    the tensors autograd saves, each counted once, other than the weights and ``x`` itself."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    out.float().sum().backward()  # the saved tensors are what the backward pass uses
    return sum(saved.values())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """:func:`_per_rank_shapes` of every configuration on two gloo processes (one spawn for the
    module)."""
    from _gloo import run_world

    return run_world("test_plan", "_per_rank_shapes", str(tmp_path_factory.mktemp("ranks")), world=2,
                     configs=sorted(CONFIGS))


def test_per_rank_shapes_at_tp2_pp2_and_ep2_equal_the_model(two_ranks):
    names = sorted(CONFIGS)
    for rank, got in enumerate(two_ranks):
        for name in names:
            mc = tiny(name)
            assert [tuple(x) for x in got[f"{name}/tp2"]] == [tuple(x) for x in rank_parameters(mc, tp=2)]
            planned = rank_parameters(mc, pp=2, stage=rank)
            assert [tuple(x) for x in got[f"{name}/pp2"]] == [tuple(x) for x in planned]
            assert got[f"{name}/pp2_buffers"] == list(grad_buffers(mc, pp=2, stage=rank, dp=1))
            if mc.is_moe:  # each EP rank holds 2 of the 4 experts; the dense buffer spans DP=2
                planned = rank_parameters(mc, ep=2)
                assert [tuple(x) for x in got[f"{name}/ep2"]] == [tuple(x) for x in planned]
                assert got[f"{name}/ep2_buffers"] == list(grad_buffers(mc, dp=2, ep=2))
    # the tied model's last stage holds a copy of the embedding as its output layer
    assert rank_parameters(tiny("tied_qknorm_bias"), pp=2, stage=1)[-1][0] == "gpt.output_layer.weight"
    # the MoE model's dense layer 2 is the first layer of stage 1: local name 0, a dense MLP
    stage1 = dict(rank_parameters(tiny("moe"), pp=2, stage=1))
    assert "gpt.decoder.layers.0.mlp.linear_fc1.weight" in stage1
    assert "gpt.decoder.layers.1.mlp.router.weight" in stage1
    assert rank_parameter_counts(tiny("moe"), ep=2)[1] * 2 == rank_parameter_counts(tiny("moe"))[1]


def test_moe_saved_bytes_at_tp2_and_ep2_equal_the_planned_bytes(two_ranks):
    """On each of two ranks, with either dispatcher, at TP=2 (sequence parallel) and at EP=2, the
    bytes a bf16 MoE layer saves are the memory model's for the tokens the rank routes and the
    rows its experts receive (routing is not balanced here, so the rows are counted); balanced,
    the rows are ``k t`` per token, the per-token block."""
    mc = tiny("moe")
    seen = set()
    for got in two_ranks:
        for dispatcher in ("allgather", "alltoall"):
            for tp, ep in ((2, 1), (1, 2)):
                nbytes, tokens, rows = got[f"moe/saved_tp{tp}_ep{ep}_{dispatcher}"]
                assert nbytes == moe_block_bytes(mc, tokens, rows, tp=tp, ep=ep, dispatcher=dispatcher)
                assert moe_block_bytes(mc, tokens, mc.moe_topk * tp * tokens, tp=tp, ep=ep, dispatcher=dispatcher) == (
                    moe_block_bytes_per_token(mc, tp=tp, ep=ep, dispatcher=dispatcher) * tokens)
                seen.add((tp, ep, dispatcher, nbytes))
    # the dispatchers keep different tensors at TP=2: the all-gather's mask and probabilities of
    # every gathered token against the all-to-all's of the rank's own tokens
    assert moe_block_bytes_per_token(mc, tp=2, dispatcher="allgather") > moe_block_bytes_per_token(
        mc, tp=2, dispatcher="alltoall")
    assert {n for tp, ep, d, n in seen if tp == 2 and d == "allgather"}.isdisjoint(
        {n for tp, ep, d, n in seen if tp == 2 and d == "alltoall"})


@pytest.mark.usefixtures("one_process_group")
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("renormalised", [True, False])
def test_moe_block_saved_tensors_equal_the_planned_bytes(renormalised, dispatcher):
    """What a bf16 MoE layer's router, dispatcher and experts save for the backward pass (tensor
    storages other than the weights and the layer's input, each counted once) is the memory
    model's MoE block for its tokens, with either dispatcher; at EP=1 every assignment is local,
    so no balance is assumed."""
    mc = ModelConfig(max_seq_len=64, **dict(CONFIGS["moe"], moe_norm_topk_prob=renormalised))
    nbytes, tokens, rows = _moe_saved_bytes(mc, mc.transformer_config(dtype="bf16", moe_dispatcher=dispatcher))
    assert rows == mc.moe_topk * tokens
    assert nbytes == moe_block_bytes_per_token(mc, tp=1, dispatcher=dispatcher) * tokens


@pytest.mark.usefixtures("one_process_group")
@pytest.mark.parametrize("name", ["gqa", "moe"])
def test_dense_mlp_saved_tensors_equal_the_planned_bytes(name):
    """What a bf16 dense SwiGLU MLP (a dense model's, and the dense layer of the MoE model) saves
    for the backward pass besides its input and weights is the memory model's ``10f`` per token:
    ``fc1``'s output, the ``silu`` output, megatron's copy of the linear half
    (``x_linear + glu_linear_offset``), their product."""
    from megatron_nbdiff.models import NBDiffModel

    mc = tiny(name)
    model = NBDiffModel(mc, mc.transformer_config(dtype="bf16")).to(torch.bfloat16)
    layer = 2 if mc.is_moe else 0  # the MoE model's dense layer
    mlp = model.gpt.decoder.layers[layer].mlp
    assert type(mlp).__name__ == "MLP"
    seq, batch = 40, 3
    x = torch.randn(seq, batch, mc.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    saved = _saved_bytes(model, mlp, x)
    assert saved == mlp_bytes_per_token(mc) * seq * batch == 10 * mc.ffn_hidden_size * seq * batch


def test_interleaved_in_flight_layers_match_korthikanti():
    mc = ModelConfig(vocab_size=100, hidden_size=64, num_layers=32, num_attention_heads=4)
    for p, v in ((2, 2), (4, 2), (4, 4), (8, 2)):
        lay = Layout(tp=1, pp=p, vpp=v, cp=1, dp=1, mbs=1, recompute="none")
        assert layers_in_flight(mc, lay, 0, microbatches=64) == pytest.approx(32 * (1 + (p - 1) / (p * v)))
    one_f_one_b = Layout(tp=1, pp=4, vpp=1, cp=1, dp=1, mbs=1, recompute="none")
    assert [layers_in_flight(mc, one_f_one_b, k, 64) for k in range(4)] == [32, 24, 16, 8]
    assert layers_in_flight(mc, one_f_one_b, 0, microbatches=2) == 16


def test_cp_chunks_are_whole_blocks_for_dual_stream_recipes():
    dual, ar = Workload("nbdiff", 4096, 8), Workload("ar", 4096, 8)
    assert cp_allowed(dual, 64) and not cp_allowed(dual, 128)  # chunk 32 vs 16 tokens
    assert cp_allowed(ar, 128) and not cp_allowed(ar, 4096)


def _run(argv, capsys):
    code = run_main(plan_main, argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_best_plan_writes_a_config_the_launcher_accepts(tmp_path, capsys):
    from megatron_nbdiff.slurm.launch import main as launch_main

    yaml_path, json_path, png = tmp_path / "run.yaml", tmp_path / "plans.json", tmp_path / "mem.png"
    code, out, err = _run(["llama3-8b", "--seq-len", "32768", "--global-batch", "16", "--out-yaml",
                           str(yaml_path), "--out-json", str(json_path), "--plot", str(png), "--top", "5",
                           "--save-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "chosen:" in out and "layouts fit" in out
    doc = json.loads(json_path.read_text())
    best = doc["plans"][0]
    assert best["fits"] and best["memory_gib"]["total"] <= 80
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = yaml_path.read_text()
    cfg = RunConfig.load(str(yaml_path))
    lay = best["layout"]
    assert (cfg.train.tp, cfg.train.pp, cfg.train.micro_batch_size) == (lay["tp"], lay["pp"], lay["mbs"])
    for field in best["unsupported"]:  # named in the comment, not in a section
        assert f"train.{field}:" in text.split("\n", 1)[0] + "".join(
            line for line in text.splitlines() if line.startswith("#"))
        assert not hasattr(cfg.train, field)
    code = run_main(launch_main, ["--config", str(yaml_path), "--nodes", "1", "--gpus-per-node", "8",
                                  "--dry-run", "--skip-path-check", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err


def test_supported_only_plans_need_no_missing_field(tmp_path, capsys):
    path = tmp_path / "p.json"
    code, out, err = _run(["qwen2.5-32b", "--seq-len", "4096", "--global-batch", "64", "--nodes", "4",
                           "--supported-only", "--out-json", str(path)], capsys)
    assert code == 0, err
    plans = json.loads(path.read_text())["plans"]
    assert plans and all(p["supported_today"] and not p["unsupported"] for p in plans)
    # train.recompute, train.cp and train.vpp exist: such layouts are supported
    assert {p["layout"]["recompute"] for p in plans} >= {"selective"}
    assert max(p["layout"]["cp"] for p in plans) > 1 and max(p["layout"]["vpp"] for p in plans) > 1


@pytest.mark.parametrize("argv, needle", [
    (["llama9-1t", "--seq-len", "4096", "--global-batch", "8"], "unknown model 'llama9-1t'"),
    (["llama3-70b", "--seq-len", "32768", "--global-batch", "8", "--gpus-per-node", "1"],
     "nothing fits in 80 GiB per GPU: the closest layout"),
    (["llama3-8b", "--seq-len", "4100", "--global-batch", "8"], "not a multiple of the block size 32"),
    (["llama3-8b", "--seq-len", "4096", "--global-batch", "8", "--gpus-per-node", "0"],
     "--gpus-per-node must be >= 1"),
    (["llama3-8b", "--seq-len", "4096", "--global-batch", "8", "--recipe", "nope"], "invalid choice"),
    (["llama3-8b", "--seq-len", "4096", "--global-batch", "8", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
])
def test_bad_input_is_one_error_line(argv, needle, capsys, tmp_path):
    code, out, err = _run(argv + ["--out-yaml", str(tmp_path / "x.yaml")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "x.yaml").exists()


def test_model_from_hf_config_and_checkpoint_dirs(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4, "rope_theta": 10000.0, "max_position_embeddings": 4096}))
    code, out, err = _run([str(hf), "--seq-len", "1024", "--global-batch", "8"], capsys)
    assert code == 0, err
    assert "LlamaForCausalLM config.json, vocabulary 1000 + 1 mask token" in out
    code, out, err = _run([str(tmp_path), "--seq-len", "1024", "--global-batch", "8"], capsys)
    assert code == 2 and "neither nbdiff.json" in err


def test_moe_hf_config_is_planned_with_expert_parallelism(tmp_path, capsys):
    """A Mixtral config.json is planned: its table has the EP column and its layouts include EP > 1."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                        max_position_embeddings=4096)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.save_pretrained(tmp_path / "mixtral")
    path = tmp_path / "plans.json"
    code, out, err = _run([str(tmp_path / "mixtral"), "--seq-len", "4096", "--global-batch", "8",
                           "--out-json", str(path)], capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if "recompute" in line and "MFU" in line)
    assert "active per token (2 of 6 experts)" in out and " ep " in header and "EP comm" in header
    plans = json.loads(path.read_text())["plans"]
    assert {p["layout"]["ep"] for p in plans} == {1, 2}  # 6 experts: EP 2 (DP 2, 4, 8), not 3 or 6


def test_expert_parallel_sizes_are_those_the_trainer_accepts():
    from megatron_nbdiff.parallel import check_parallel_sizes
    from megatron_nbdiff.planning.shapes import named_shape

    work, cluster = Workload("nbdiff", 4096, 256), Cluster(nodes=4)
    mc = named_shape("qwen3-30b-a3b", 4096).model
    by_rest: dict = {}
    for lay in enumerate_layouts(mc, work, cluster):
        by_rest.setdefault((lay.tp, lay.pp, lay.cp, lay.dp), set()).add(lay.ep)
    assert max(max(eps) for eps in by_rest.values()) == 32
    for (tp, pp, cp, dp), eps in by_rest.items():
        accepted = set()
        for ep in range(1, mc.num_experts + 1):
            try:
                check_parallel_sizes(mc, tp=tp, pp=pp, cp=cp, ep=ep, world_size=cluster.world)
                accepted.add(ep)
            except ConfigError:
                pass
        assert eps == accepted, (tp, pp, cp, dp)
    dense = named_shape("llama3-8b", 4096).model
    assert {lay.ep for lay in enumerate_layouts(dense, work, cluster)} == {1}


def test_moe_plan_run_config_passes_the_trainer_validation(tmp_path, capsys):
    """The best qwen3-30b-a3b plan on 4 nodes launches (dry run) and names its dispatcher; plans
    with EP > 1 (selective, full and no recomputation; each dispatcher) write train.ep,
    train.moe_dispatcher and recompute_modules with moe, pass the trainer's layout check at their
    world size, launch (dry run) and lower to megatron's TransformerConfig with that dispatcher.
    Every EP > 1 layout is planned with the faster dispatcher, and a layout at EP 1 with
    ``allgather``."""
    import dataclasses

    from megatron_nbdiff.planning import plan
    from megatron_nbdiff.planning.planner import evaluate
    from megatron_nbdiff.planning.report import run_config
    from megatron_nbdiff.planning.shapes import named_shape
    from megatron_nbdiff.slurm.launch import main as launch_main
    from megatron_nbdiff.training.validation import check_layout

    def launches(path):
        return run_main(launch_main, ["--config", str(path), "--nodes", "4", "--gpus-per-node", "8", "--dry-run",
                                      "--skip-path-check", "--output-dir", str(tmp_path / "run")])

    yaml_path = tmp_path / "run.yaml"
    code, out, err = _run(["qwen3-30b-a3b", "--seq-len", "4096", "--global-batch", "256", "--nodes", "4",
                           "--out-yaml", str(yaml_path), "--save-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    cfg = RunConfig.load(str(yaml_path))
    assert cfg.model.num_experts == 128 and cfg.train.moe_dispatcher in ("allgather", "alltoall")
    assert launches(yaml_path) == 0, capsys.readouterr().err
    source, work, cluster = named_shape("qwen3-30b-a3b", 4096), Workload("nbdiff", 4096, 256), Cluster(nodes=4)
    plans = plan(source.model, work, cluster)
    assert {p.layout.dispatcher for p in plans if p.layout.ep == 1} == {"allgather"}
    assert {p.layout.dispatcher for p in plans if p.layout.ep > 1} == {"allgather", "alltoall"}
    for p in plans[:200]:
        if p.layout.ep > 1:
            other = "allgather" if p.layout.dispatcher == "alltoall" else "alltoall"
            alternative = evaluate(source.model, work, dataclasses.replace(p.layout, dispatcher=other), cluster)
            assert not alternative.fits or alternative.time.seconds >= p.time.seconds, p.layout.label()
    picked = [next(p for p in plans if p.layout.ep > 1 and p.layout.recompute == rc and p.layout.tp > 1)
              for rc in ("selective", "full", "none")]
    picked += [next(p for p in plans if p.layout.ep > 1 and p.layout.dispatcher == d)
               for d in ("allgather", "alltoall")]
    for i, p in enumerate(picked):
        cfg = RunConfig.from_dict(run_config(p, source, work))
        t = cfg.train
        assert (t.tp, t.pp, t.vpp, t.cp, t.ep, t.recompute, t.moe_dispatcher) == (
            p.layout.tp, p.layout.pp, p.layout.vpp, p.layout.cp, p.layout.ep, p.layout.recompute, p.layout.dispatcher)
        assert t.recompute_modules == (["core_attn", "mlp", "moe"] if t.recompute == "selective" else None)
        check_layout(cfg, world_size=cluster.world)
        tc = cfg.model.transformer_config(tp=t.tp, pp=t.pp, ep=t.ep, moe_dispatcher=t.moe_dispatcher,
                                          sequence_parallel=t.sequence_parallel, context_parallel_size=t.cp,
                                          **t.recompute_overrides(48 // t.pp))
        assert (tc.expert_model_parallel_size, tc.moe_token_dispatcher_type) == (p.layout.ep, p.layout.dispatcher)
        path = tmp_path / f"picked{i}.yaml"
        cfg.save(str(path))
        assert launches(path) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name, config", [
    ("qwen3-30b-a3b", {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
                       "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                       "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                       "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                       "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1000000.0,
                       "rms_norm_eps": 1e-06, "max_position_embeddings": 40960, "tie_word_embeddings": False,
                       "use_sliding_window": False, "sliding_window": None, "router_aux_loss_coef": 0.001}),
    ("mixtral-8x7b", {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 32000,
                      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                      "num_experts_per_tok": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
                      "max_position_embeddings": 32768, "tie_word_embeddings": False, "sliding_window": None,
                      "router_aux_loss_coef": 0.02}),
])
def test_moe_named_shapes_equal_their_hf_config(name, config, tmp_path):
    """The published config.json (its values typed here) read as the converter reads it."""
    from megatron_nbdiff.planning.shapes import load_model, named_shape

    (tmp_path / "config.json").write_text(json.dumps(config))
    from_hf = load_model(str(tmp_path), 4096)
    named = named_shape(name, 4096)
    assert from_hf.model == named.model and from_hf.mask_token_id == named.mask_token_id == config["vocab_size"]


def _doc_commands() -> list:
    """(argv, printed lines) of every ``$ python tools/plan.py`` block of docs/plans.md."""
    import os
    import re
    import shlex

    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "plans.md")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    out = []
    for block in re.findall(r"```\n\$ python tools/plan.py (.*?)```", text, re.S):
        command, *lines = block.rstrip("\n").split("\n")
        argv = shlex.split(command)
        for flag in ("--plot", "--out-yaml", "--out-json"):  # the files are not written again
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        out.append((argv, [line for line in lines if not line.startswith("wrote ")]))
    return out


def test_every_plan_in_docs_is_what_the_tool_prints(capsys):
    commands = _doc_commands()
    assert len(commands) >= 9 and any("qwen3-30b-a3b" in argv for argv, _ in commands)
    for argv, lines in commands:
        code, out, err = _run(argv, capsys)
        assert code == 0, (argv, err)
        assert out.rstrip("\n").split("\n") == lines, argv
