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
