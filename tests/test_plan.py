"""The capacity planner (megatron_nbdiff/planning/, tools/plan.py).

* Its per-rank parameter list (names and shapes) equals ``NBDiffModel.named_parameters()`` for
  three tiny configurations at TP=1 (one process) and at TP=2 and PP=2 (two gloo processes:
  each rank's own shapes, the tied output-layer copy on the last stage included); its weight and
  gradient bytes equal the bf16 model's and its DDP buffer's (megatron DDP with the distributed
  optimizer's padding, fp32 main gradients); its optimizer bytes equal the fp32 master copy plus
  the Adam moments the real megatron optimizer creates (the CPU trainer's fp32 optimizer holds
  the moments; the fp32 parameters are what the bf16 path's master copy is).
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
from megatron_nbdiff.planning.cli import main as plan_main
from megatron_nbdiff.planning.layouts import Layout, Workload, cp_allowed
from megatron_nbdiff.planning.memory import layers_in_flight
from megatron_nbdiff.planning.parameters import grad_buffer_numel, rank_parameter_count, rank_parameters

CONFIGS = {
    "gqa": dict(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96),
    "tied_qknorm_bias": dict(vocab_size=301, hidden_size=48, num_layers=4, num_attention_heads=6,
                             num_query_groups=2, ffn_hidden_size=80, qk_layernorm=True, add_qkv_bias=True,
                             tie_embeddings=True),
    "mha_kv_channels": dict(vocab_size=130, hidden_size=40, num_layers=2, num_attention_heads=2,
                            kv_channels=24, ffn_hidden_size=72, make_vocab_size_divisible_by=8),
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
    from megatron_nbdiff.training.model_and_optimizer import build_model_and_optimizer

    mc = tiny(name)
    planned = rank_parameters(mc)
    count = rank_parameter_count(mc)
    # the bf16 model megatron DDP wraps on a GPU: weights 2 bytes, main gradients 4 bytes per element
    tc = mc.transformer_config(dtype="bf16")
    model = NBDiffModel(mc, tc)
    assert _shapes(model) == planned
    half = Float16Module(tc, model)
    assert sum(p.numel() * p.element_size() for p in half.parameters()) == 2 * count
    ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), half)
    assert [b.grad_data.dtype for b in ddp.buffers] == [torch.float32]
    assert ddp.buffers[0].grad_data.numel() == grad_buffer_numel(mc, dp=1)
    assert ddp.buffers[0].param_data.numel() * 2 == 2 * grad_buffer_numel(mc, dp=1)
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
    """Worker: each rank's parameter shapes at TP=2 (PP=1) and at PP=2 (TP=1), and its DDP
    buffer size with the distributed optimizer at PP=2."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_nbdiff.models import NBDiffModel
    from megatron_nbdiff.parallel import initialize_parallel

    out = {}
    for name in configs:
        mc = ModelConfig(max_seq_len=64, **CONFIGS[name])
        initialize_parallel(2, 1)
        out[f"{name}/tp2"] = _shapes(NBDiffModel(mc, mc.transformer_config(tp=2)))
        initialize_parallel(1, 2)
        tc = mc.transformer_config(pp=2)
        model = NBDiffModel(mc, tc, pre_process=rank == 0, post_process=rank == 1)
        out[f"{name}/pp2"] = _shapes(model)
        ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
        out[f"{name}/pp2_buffer"] = sum(b.grad_data.numel() for b in ddp.buffers)
    return out


def test_per_rank_shapes_at_tp2_and_pp2_equal_the_model(tmp_path):
    from _gloo import run_world

    names = sorted(CONFIGS)
    results = run_world("test_plan", "_per_rank_shapes", str(tmp_path), world=2, configs=names)
    for rank, got in enumerate(results):
        for name in names:
            mc = tiny(name)
            assert [tuple(x) for x in got[f"{name}/tp2"]] == [tuple(x) for x in rank_parameters(mc, tp=2)]
            planned = rank_parameters(mc, pp=2, stage=rank)
            assert [tuple(x) for x in got[f"{name}/pp2"]] == [tuple(x) for x in planned]
            assert got[f"{name}/pp2_buffer"] == grad_buffer_numel(mc, pp=2, stage=rank, dp=1)
    # the tied model's last stage holds a copy of the embedding as its output layer
    assert rank_parameters(tiny("tied_qknorm_bias"), pp=2, stage=1)[-1][0] == "gpt.output_layer.weight"


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


def test_moe_model_is_refused_not_misplanned(tmp_path, capsys):
    """The formulas count one dense MLP per layer: a MoE config is one error line, not a plan."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                        max_position_embeddings=4096)
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.save_pretrained(tmp_path / "mixtral")
    code, out, err = _run([str(tmp_path / "mixtral"), "--seq-len", "4096", "--global-batch", "8"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "mixture-of-experts model (6 experts)" in lines[0], err
