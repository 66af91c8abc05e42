"""The run configs shipped in examples/slurm/configs/ parse through RunConfig (unknown or renamed
keys fail here, not on a cluster), describe the models they claim, and fit their layouts (also as
the Slurm launcher checks them on the allocation their comments name)."""
import glob
import os

import pytest

from megatron_nbdiff.config import RunConfig
from megatron_nbdiff.parallel import check_parallel_sizes
from megatron_nbdiff.slurm import validate_launch
from megatron_nbdiff.training.recipes import resolve_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "slurm", "configs", "*.yaml")))


def test_the_expected_configs_ship():
    assert {os.path.basename(p) for p in CONFIGS} >= {"nbdiff_7b.yaml", "quickstart_tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_is_consistent(path):
    cfg = RunConfig.load(path)
    t, m = cfg.train, cfg.model
    assert m is not None, "ship the architecture so the launcher can check layouts without the checkpoint"
    check_parallel_sizes(m, tp=t.tp)
    assert m.num_layers % t.pp == 0
    assert t.seq_len <= m.max_seq_len
    assert cfg.data.train, "data.train must name a dataset (a placeholder path is fine)"
    recipe = resolve_recipe(cfg.recipe)
    if recipe.dual:
        for step, block in recipe.curriculum.changes(t.steps):
            assert t.seq_len % block == 0, (step, block)
    recipe.check(t.seq_len, t.steps)
    # the YAML round trip the launcher does (RunConfig.save, then the job's RunConfig.load)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_7b_config_is_nbdiff_shaped():
    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", "nbdiff_7b.yaml"))
    m, t, r = cfg.model, cfg.train, cfg.recipe
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (34, 4096, 32, 8)
    assert 152_000 <= m.vocab_size <= 154_000
    assert m.attention_backend == "flex"
    recipe = resolve_recipe(r)
    assert r.name == recipe.name == "nbdiff" and recipe.layout == "dual_context_causal" and recipe.ar_weight == 0.5
    changes = recipe.curriculum.changes(t.steps)
    assert [b for _, b in changes] == [1, 2, 4, 8, 16, 32]
    assert (t.seq_len, t.dtype) == (4096, "bf16")
    assert t.tp in (4, 8) and 8 % (t.tp * t.pp) == 0  # a replica fits on one 8-GPU node
    assert cfg.checkpoint.save_interval > 0


def test_quickstart_config_is_tiny():
    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", "quickstart_tiny.yaml"))
    m = cfg.model
    params = m.num_layers * (4 * m.hidden_size ** 2 + 3 * m.hidden_size * m.ffn_hidden_size)
    params += 2 * m.vocab_size * m.hidden_size
    assert params < 2_000_000
    assert m.attention_backend == "dense"  # trains on CPU
    assert cfg.recipe.mask_token_id is not None  # random init: no checkpoint to name one
    assert (cfg.train.tp, cfg.train.pp) == (1, 1)


@pytest.mark.parametrize("name,nodes,gpus,procs", [
    ("nbdiff_7b.yaml", 4, 8, 8),          # examples/slurm/README.md: 4 nodes x 8 GPUs
    ("quickstart_tiny.yaml", 1, 0, 2),    # the Slurm test: one node, two CPU processes
])
def test_configs_fit_their_allocation(name, nodes, gpus, procs):
    """The launcher's checks that need no file (the data paths are placeholders here)."""
    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", name))
    warnings = validate_launch(cfg, nodes, procs, gpus, check_paths=False)
    assert not [w for w in warnings if "architecture is not known" in w]


def test_qwen3_30b_a3b_config_is_the_best_plan_for_4_nodes():
    """The MoE example's layout and token dispatcher are what tools/plan.py ranks best (and writes)
    for its model, sequence length and batch on 4 nodes of 8 H100, as its comments say."""
    from megatron_nbdiff.planning import plan
    from megatron_nbdiff.planning.layouts import Cluster, Workload
    from megatron_nbdiff.planning.shapes import named_shape

    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", "nbdiff_qwen3_30b_a3b.yaml"))
    t = cfg.train
    source = named_shape("qwen3-30b-a3b", cfg.model.max_seq_len)
    assert cfg.model.to_dict() == dict(source.model.to_dict(), attention_backend="flex")
    best = plan(source.model, Workload(cfg.recipe.name, t.seq_len, t.global_batch_size), Cluster(nodes=4))[0].layout
    assert (t.tp, t.pp, t.vpp, t.cp, t.ep, t.micro_batch_size, t.recompute, t.moe_dispatcher) == (
        best.tp, best.pp, best.vpp, best.cp, best.ep, best.mbs, best.recompute, best.dispatcher)
    assert t.sequence_parallel == (best.tp > 1)


def test_launcher_checks_context_parallel_without_the_paths():
    """--skip-path-check still refuses a CP layout the trainer would refuse: a chunk that is not a
    whole number of the curriculum's largest block, or a world TP x PP x CP does not divide."""
    from megatron_nbdiff.errors import ConfigError
    from megatron_nbdiff.slurm.errors import LaunchError

    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", "nbdiff_7b.yaml"))
    t, world = cfg.train, 8
    ok = RunConfig.from_dict(dict(cfg.to_dict(), train=dict(cfg.to_dict()["train"], cp=2, tp=1, pp=1)))
    validate_launch(ok, 1, world, world, check_paths=False)
    uneven = RunConfig.from_dict(dict(cfg.to_dict(), train=dict(cfg.to_dict()["train"], cp=3, tp=1, pp=1)))
    with pytest.raises(ConfigError, match="train.cp 3: sequence length 4096 must be a multiple of 2 x cp = 6"):
        validate_launch(uneven, 2, 6, 6, check_paths=False)  # dp = 12 / 3 = 4 divides the batch
    with pytest.raises(LaunchError, match="train.tp x train.pp x train.cp = 1 x 1 x 2 = 2 does not divide the 3"):
        validate_launch(ok, 1, 3, 3, check_paths=False)
    assert t.seq_len == 4096
