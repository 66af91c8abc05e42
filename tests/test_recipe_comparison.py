"""The recipe-comparison script end to end at its tiny CPU size (the real run needs a GPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipe_comparison_tiny(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "recipe_comparison", "run.py"),
                        "--size", "tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert list(rep["results"]) == ["AR base", "diffullama", "transplant", "nbdiff (no curriculum)", "nbdiff"]
    assert rep["adapt_tokens_per_recipe"] == 12 * 8 * 64
    for label, row in rep["results"].items():
        assert 0 < row["ar_loss"] < 20 and 0 < row["nll_bound"] < 20, label
        for how, d in row["decoding"].items():
            assert 0.0 <= d["accuracy"] <= 1.0 and d["tokens_per_forward"] >= 1.0, (label, how)
    assert rep["results"]["AR base"]["decoding"]["ar"]["tokens_per_forward"] == 1.0
    # diffullama is evaluated with its own single-stream loss too; 8 positions in 4 steps = 2 per pass
    assert rep["results"]["diffullama"]["single_stream_loss"] is not None
    assert rep["results"]["diffullama"]["decoding"]["full, 4 steps"]["tokens_per_forward"] == 2.0
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert "| nbdiff |" in (tmp_path / "comparison.md").read_text()
