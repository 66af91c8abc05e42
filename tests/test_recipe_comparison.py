"""The recipe-comparison script end to end at its tiny CPU size (the real run needs a GPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "recipe_comparison", "run.py")
LABELS = ["AR base", "diffullama", "transplant", "nbdiff (no curriculum)", "nbdiff"]


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--size", "tiny", *args], capture_output=True, text=True,
                          timeout=900)


def test_recipe_comparison_tiny(tmp_path):
    r = run("--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["complete"] is True
    assert list(rep["results"]) == LABELS
    assert rep["adapt_tokens_per_recipe"] == 12 * 8 * 64
    for label, by_seed in rep["results"].items():
        assert list(by_seed) == ["0"], label
        row = by_seed["0"]
        assert 0 < row["ar_loss"] < 20 and 0 < row["nll_bound"] < 20, label
        for how, tasks in row["decoding"].items():
            assert list(tasks) == ["addition", "addition (trained pairs)", "copy"]
            for d in tasks.values():
                assert 0.0 <= d["accuracy"] <= 1.0 and d["tokens_per_forward"] >= 1.0, (label, how)
    assert rep["results"]["AR base"]["0"]["decoding"]["ar"]["addition"]["tokens_per_forward"] == 1.0
    # diffullama is evaluated with its own single-stream loss too; full decoding in 4 steps fills
    # 8 addition positions at 2 per pass and 16 copy positions at 4 per pass
    dl = rep["results"]["diffullama"]["0"]
    assert dl["single_stream_loss"] is not None
    assert dl["decoding"]["full, 4 steps"]["addition"]["tokens_per_forward"] == 2.0
    assert dl["decoding"]["full, 4 steps"]["copy"]["tokens_per_forward"] == 4.0
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
