"""The quickstart pipeline end to end with a few steps per stage (``--fast``)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_fast(tmp_path):
    w = tmp_path / "qs"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart", "quickstart.py"),
                        "--fast", "--workdir", str(w)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((w / "summary.json").read_text())
    for model in ("AR base", "NBDiff adapted"):
        ev = summary["evaluation"][model]
        assert 0 < ev["ar_loss"] < 20 and 0 < ev["diffusion_loss"] < 20
    for label, row in summary["decoding"].items():
        for group, d in row.items():
            assert d["tokens_per_forward"] >= 1.0, (label, group)
    assert all(d["tokens_per_forward"] == 1.0 for d in summary["decoding"]["ar"].values())
    assert "tokens/forward" in summary["export_decode"]
    for name in ("loss_curves.png", "block_size_schedule.png"):
        assert (w / name).stat().st_size > 1000
    # the exported adapted model loads with transformers and carries its block size
    meta = json.loads((w / "hf_nbdiff" / "nbdiff.json").read_text())
    assert meta["kind"] == "hf" and meta["block_size"] == 8 and meta["recipe"] == "nbdiff"
    assert "held-out AR loss" in r.stdout and "tokens/forward" in r.stdout
