"""The run configs shipped in examples/slurm/configs/ parse through RunConfig (unknown or renamed
keys fail here, not on a cluster), describe the models they claim, and fit their layouts."""
import glob
import os

import pytest

from megatron_nbdiff.attention.core_attention import check_parallel_divisibility
from megatron_nbdiff.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "slurm", "configs", "*.yaml")))


def test_the_expected_configs_ship():
    assert {os.path.basename(p) for p in CONFIGS} >= {"nbdiff_7b.yaml", "quickstart_tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_is_consistent(path):
    cfg = RunConfig.load(path)
    t, m = cfg.train, cfg.model
    assert m is not None, "ship the architecture so the launcher can check layouts without the checkpoint"
    check_parallel_divisibility(m.num_attention_heads, m.num_query_groups, t.tp)
    assert m.num_layers % t.pp == 0
    assert t.seq_len <= m.max_seq_len
    assert cfg.data.train, "data.train must name a dataset (a placeholder path is fine)"
    if cfg.recipe.dual:
        for step, block in cfg.recipe.curriculum().changes(t.steps):
            assert t.seq_len % block == 0, (step, block)
    # the YAML round trip the launcher does (RunConfig.save, then the job's RunConfig.load)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_7b_config_is_nbdiff_shaped():
    cfg = RunConfig.load(os.path.join(ROOT, "examples", "slurm", "configs", "nbdiff_7b.yaml"))
    m, t, r = cfg.model, cfg.train, cfg.recipe
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (34, 4096, 32, 8)
    assert 152_000 <= m.vocab_size <= 154_000
    assert m.attention_backend == "flex"
    assert r.name == "nbdiff" and r.layout == "dual_context_causal" and r.lam == 0.5
    changes = r.curriculum().changes(t.steps)
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
