"""Context parallelism (docs/method.md, "Context parallelism"): the split, and CP=2 attention
equal to one process's attention over all positions, outputs and gradients, for every layout."""
import pytest

from megatron_nbdiff.attention.context_parallel import check_split, local_positions

from _gloo import run_world


def test_load_balanced_split():
    assert local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    together = sorted(p for r in range(4) for p in local_positions(32, 4, r).tolist())
    assert together == list(range(32))
    check_split(64, 4, 8)
    with pytest.raises(ValueError, match="multiple of 2 x cp = 8"):
        check_split(60, 4, 1)
    with pytest.raises(ValueError, match="not a multiple of the block size 8: a block would straddle two ranks"):
        check_split(32, 4, 8)


def test_cp2_attention_equals_one_process(tmp_path):
    results = run_world("_cp_workers", "attention_vs_reference", str(tmp_path))
    for rank, per_layout in enumerate(results):
        assert len(per_layout) == 12
        for name, r in per_layout.items():
            assert r["out"] < 1e-5, (rank, name, r)
            for g in "qkv":
                assert r[f"grad_{g}"] < 1e-5 * max(1.0, r["grad_scale"]), (rank, name, g, r)
            if "flex_out" in r:
                assert r["flex_out"] < 1e-5, (rank, name, r)


def test_cp2_model_equals_cp1(tmp_path):
    """NBDiffModel at CP=2: each rank's logits are the CP=1 logits at its positions, and the
    weight gradients summed over the CP ranks are the CP=1 gradients, in dual, complementary,
    causal and annealed layouts, with document masks."""
    results = run_world("_cp_workers", "model_vs_reference", str(tmp_path), init=False)
    assert [r["causal"]["positions"] for r in results] == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    for rank, per_layout in enumerate(results):
        assert len(per_layout) == 5
        for layout, r in per_layout.items():
            assert r["logits"] < 1e-5, (rank, layout, r)
            assert r["grads"] < 1e-5 * max(1.0, r["grad_scale"]), (rank, layout, r)


@pytest.mark.parametrize("recipe", [
    dict(name="nbdiff", block_interval=1, block_max=8),  # block sizes 1, 2, 4, 8 at steps 0..3
    dict(name="diffullama", anneal_steps=4),  # during annealing
    dict(name="ar"),
], ids=["nbdiff-curriculum", "diffullama", "ar"])
def test_cp2_training_equals_cp1_and_checkpoints_cross_cp(corpus, tmp_path, recipe):
    """train.cp = 2 on two processes from one step-0 checkpoint gives the CP=1 losses and gradient
    norms step for step (packed documents, the step normaliser, DDP over data x context ranks);
    its step-2 checkpoint resumed at CP=1 continues exactly as the CP=1 run does."""
    from _fixtures import check_steps_then_resume, losses, make_config, run, same_start

    def config(name, **ckpt):
        return make_config(corpus, tmp_path / name, recipe=recipe, train=dict(steps=4, warmup_steps=1),
                           checkpoint=dict(save_dir=str(tmp_path / name), **ckpt))

    one, two = config("one"), config("two", save_interval=2)
    same_start(one, two)
    assert run(one)[0] == 0
    ref = losses(tmp_path / "one")
    if recipe["name"] == "nbdiff":
        assert [ref[s]["block_size"] for s in range(4)] == [1, 2, 4, 8]
    got = run_world("_dist_workers", "train_records", str(tmp_path / "out"), data=two, cp=2, steps=2)[0]
    check_steps_then_resume(ref, got, two)  # then the CP=2 checkpoint at CP=1


def test_cp_layout_errors_before_any_work(corpus, tmp_path):
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.errors import ConfigError
    from megatron_nbdiff.training.validation import validate_run

    from _fixtures import make_config

    def check(world_size, **train):
        validate_run(RunConfig.from_dict(make_config(corpus, tmp_path / "r", train=train)), world_size=world_size,
                     check_data=False)

    check(2, cp=2)  # L = 32 = 2 x 2 chunks of 8 = the curriculum's largest block
    with pytest.raises(ConfigError, match="train.cp 4: with cp = 4 a chunk holds 4 positions .* block size 8"):
        check(4, cp=4)
    with pytest.raises(ConfigError, match="not divisible by tensor 1 x pipeline 1 x context 2"):
        check(3, cp=2)
    with pytest.raises(ConfigError, match="train.cp must be >= 1"):
        check(1, cp=0)
    assert not (tmp_path / "r").exists()


def test_cp2_tp2_step_equals_tp2(corpus, tmp_path):
    """One nbdiff step at CP=2 x TP=2 (four processes) equals TP=2 (two processes) from the same
    step-0 checkpoint: loss and gradient norm."""
    from _fixtures import make_config, same_start

    def config(name):
        return make_config(corpus, tmp_path / name, recipe=dict(name="nbdiff", block_size=4),
                           train=dict(steps=2, warmup_steps=1), checkpoint=dict(save_dir=str(tmp_path / name)))

    tp2, both = config("tp2"), config("both")
    same_start(tp2, both)
    ref = run_world("_dist_workers", "train_records", str(tmp_path / "o2"), data=tp2, steps=1, tp=2)[0]
    got = run_world("_dist_workers", "train_records", str(tmp_path / "o4"), world=4, data=both, steps=1, tp=2, cp=2)[0]
    assert len(ref) == len(got) == 1
    assert got[0][1] == pytest.approx(ref[0][1], rel=1e-5) and got[0][2] == pytest.approx(ref[0][2], rel=1e-4)


def test_cp_traffic_benchmark_counts_half_of_a_generic_gather(tmp_path):
    """benchmarks/cp_traffic.py: the dual layout's CP moves the clean stream only, half of what a
    gather of both streams moves; the counted collectives equal the bytes from the shapes (the
    script asserts it)."""
    import os
    import subprocess
    import sys

    from _gloo import free_port

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "cp_traffic.py")
    r = subprocess.run([sys.executable, script, "--cp", "2", "--seq-len", "128", "--block", "8", "--head-dim", "16",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dual / generic: 0.50" in r.stdout
