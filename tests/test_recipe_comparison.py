"""The recipe-comparison script end to end at its tiny CPU size (the real run needs a GPU)."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "recipe_comparison", "run.py")
LABELS = ["AR base", "diffullama", "transplant", "nbdiff (no curriculum)", "nbdiff"]


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--size", "tiny", *args], capture_output=True, text=True,
                          timeout=900)


def training_rows(path):
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "loss" in r and "block_size" in r]


def test_recipe_comparison_tiny(tmp_path):
    r = run("--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["complete"] is True
    assert list(rep["results"]) == LABELS
    # tiny: 250 pretraining and 30 adaptation steps of 8 x 64 tokens
    assert rep["pretrain_tokens"] == 250 * 8 * 64 and rep["adapt_tokens_per_recipe"] == 30 * 8 * 64
    for label, by_seed in rep["results"].items():
        assert list(by_seed) == ["0"], label
        for how, tasks in by_seed["0"]["decoding"].items():
            assert list(tasks) == ["addition", "addition (trained pairs)", "copy"], (label, how)
    res = {label: by_seed["0"] for label, by_seed in rep["results"].items()}
    base = res["AR base"]

    # pretraining learnt something: well below the uniform loss ln(512) = 6.24 (measured 3.81)
    assert base["ar_loss"] < math.log(512) - 1.5, base
    # every adaptation makes a better block-diffusion model than the AR base (block NLL bound at
    # B = 8, measured 4.89 -> diffullama 4.82, dual-stream recipes 4.70-4.73)
    for label in LABELS[1:]:
        assert res[label]["nll_bound"] < base["nll_bound"] - 0.03, (label, res[label], base)
    for label in ("transplant", "nbdiff (no curriculum)", "nbdiff"):
        assert res[label]["nll_bound"] < base["nll_bound"] - 0.1, (label, res[label], base)
    # the AR loss term (lambda 0.5) keeps more of the AR model than transplant's lambda 0
    # (measured 3.81 / 3.80 against 3.84)
    for label in ("nbdiff (no curriculum)", "nbdiff"):
        assert res[label]["ar_loss"] < res["transplant"]["ar_loss"], (label, res[label], res["transplant"])

    # decoding statistics that are pure arithmetic: AR decoding is one token per pass; full
    # decoding in S steps fills 8 addition positions at 8 / S and 16 copy positions at 16 / S per pass
    assert all(d["tokens_per_forward"] == 1.0 for d in base["decoding"]["ar"].values())
    dl = res["diffullama"]
    assert dl["single_stream_loss"] is not None and base["single_stream_loss"] is None
    for steps in (8, 4):
        tasks = dl["decoding"][f"full, {steps} steps"]
        assert [tasks[t]["tokens_per_forward"] for t in tasks] == [8 / steps, 8 / steps, 16 / steps]
    for label in ("transplant", "nbdiff (no curriculum)", "nbdiff"):
        assert list(res[label]["decoding"]) == ["block, threshold 0.9", "block, threshold 0.5"], label

    # each label ran the recipe it names: its training metrics and its checkpoint's metadata
    # (block size 8, lambda 0.5 unless transplant, the curriculum 1 -> 8 only for nbdiff)
    runs = {"diffullama": ("run_diffullama_s0", "diffullama", "single_annealed", 64),
            "transplant": ("run_transplant_s0", "transplant", "dual_context_causal", 8),
            "nbdiff (no curriculum)": ("run_nbdiff_no_curriculum_s0", "nbdiff", "dual_context_causal", 8),
            "nbdiff": ("run_nbdiff_s0", "nbdiff", "dual_context_causal", 8)}
    for label, (folder, recipe, layout, block) in runs.items():
        meta = json.loads((tmp_path / folder / "checkpoints" / "step_0000030" / "nbdiff.json").read_text())
        assert (meta["recipe"], meta["attention_layout"], meta["block_size"], meta["step"]) == \
            (recipe, layout, block, 30), label
        rows = training_rows(tmp_path / folder / "metrics.jsonl")
        assert rows[0]["step"] == 0 and rows[-1]["step"] == 29, label
        for row in rows:
            lam = {"diffullama": 0.0, "transplant": 0.0}.get(label, 0.5)
            assert row["loss"] == pytest.approx(row["diffusion"] + lam * row["ar"], rel=1e-5), (label, row)
            if label == "diffullama":
                assert row["ar"] == 0.0
    for label in ("transplant", "nbdiff (no curriculum)"):
        assert all(r["block_size"] == 8 for r in training_rows(tmp_path / runs[label][0] / "metrics.jsonl"))
    # curriculum 1 -> 8 with D = 30 // 8 = 3: block 1 at step 0, 8 from step 9 on
    nb = training_rows(tmp_path / "run_nbdiff_s0" / "metrics.jsonl")
    assert nb[0]["block_size"] == 1 and nb[0]["diffusion"] == 0.0
    assert all(r["block_size"] == 8 for r in nb if r["step"] >= 9)
    ar_rows = training_rows(tmp_path / "run_ar" / "metrics.jsonl")
    assert all(r["block_size"] == 1 and r["diffusion"] == 0.0 for r in ar_rows)
    assert ar_rows[-1]["loss"] < ar_rows[0]["loss"] - 1.5

    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert "| nbdiff |" in (tmp_path / "comparison.md").read_text()

    # a second call finds every stage done and trains nothing
    stages = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert len(stages) == 2 + 4 + 5
    r = run("--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps in" not in r.stdout
    assert json.loads((tmp_path / "report.json").read_text())["results"] == rep["results"]

    # other settings in the same folder are refused, naming the folder
    r = run("--out", str(tmp_path), "--adapt-steps", "5")
    assert r.returncode != 0 and "stages.json" in r.stderr and "--fresh" in r.stderr


def test_recipe_comparison_problems_are_held_out():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_comparison_run", SCRIPT)
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)

    train = "\n".join(cmp.corpus(8000, 0))
    probs = cmp.eval_problems(100, 0)
    assert [len(v) for v in probs.values()] == [100, 100, 100]
    for task, held in (("addition", True), ("addition (trained pairs)", False)):
        for q, ans in probs[task]:
            a, b = map(int, q[3:].split("=")[0].split("+"))
            assert int(ans) == a + b and cmp.held_out_pair(a, b) == held
            if held:
                assert q not in train  # operand pairs never seen in training
    # the split is unrelated to the digits: held-out answers end in every digit, and held-out
    # pairs are about 10% of all
    assert len({ans[-1] for _, ans in probs["addition"]}) == 10
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    assert 0.08 < sum(cmp.held_out_pair(a, b) for a, b in pairs) / len(pairs) < 0.12


def test_recipe_comparison_bad_inputs(tmp_path):
    (tmp_path / "stages.json").write_text('{"config": ')
    r = run("--out", str(tmp_path))
    assert r.returncode != 0 and "stages.json: not valid JSON" in r.stderr and "--fresh" in r.stderr
    for seeds in ("1,1", "a,b", ","):
        r = run("--out", str(tmp_path / "x"), "--adapt-seeds", seeds)
        assert r.returncode == 2 and "--adapt-seeds" in r.stderr, seeds
