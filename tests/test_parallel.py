"""Two-process gloo runs: TP=2 (with and without sequence parallelism) and PP=2 against one
process, for a tiny GQA RoPE model. fp32, tight tolerances."""
import pytest
import torch

from _dist_workers import run_two_process


@pytest.mark.parametrize("tie", [False, True])
def test_tp2_logits_equal_tp1(tmp_path, tie):
    results = run_two_process("tp_logits", str(tmp_path), tie=tie)
    for rank_result in results:
        ref = rank_result["tp1"]
        for name in ("tp2", "tp2_sp"):
            got = rank_result[name]
            for key in ("noisy", "clean", "ar"):
                torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5, msg=f"{name} {key}")
            torch.testing.assert_close(got["emb_grad"], ref["emb_grad"], atol=1e-5, rtol=1e-4)
    # both tensor-parallel ranks see the same gathered logits
    torch.testing.assert_close(results[0]["tp2"]["noisy"], results[1]["tp2"]["noisy"])


@pytest.mark.parametrize("layout", ["dual_context_causal", "causal"])
def test_pp2_loss_equals_pp1(tmp_path, layout):
    results = run_two_process("pp_loss", str(tmp_path), layout=layout)
    last = next(r for r in results if r["stage"] == 1)
    first = next(r for r in results if r["stage"] == 0)
    assert len(last["pp1"]) == 2 and len(last["pp2"]) == 2
    assert first["pp2"] == []  # losses live on the last stage only
    for a, b in zip(last["pp2"], last["pp1"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for r in results:
        assert r["grad_max_diff"] < 1e-5
