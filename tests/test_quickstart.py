"""The quickstart pipeline end to end (``--fast``: 150 AR + 150 NBDiff steps, about 3 minutes on
two cores), checked for what the run is for: the adapted model is a better block-diffusion model
than its AR base on held-out text, and on text it learnt by heart it commits several tokens per
forward pass; decoding statistics add up exactly."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZEN = "Zen of Python (learnt by heart)"


def test_quickstart_fast(tmp_path):
    w = tmp_path / "qs"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart", "quickstart.py"),
                        "--fast", "--workdir", str(w)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((w / "summary.json").read_text())
    base, adapted = summary["evaluation"]["AR base"], summary["evaluation"]["NBDiff adapted"]
    # adaptation lowers the held-out diffusion loss (2026-11 run: 5.57 -> 5.05) and keeps the AR
    # loss (4.81 -> 4.13: adaptation is also more training on the same text)
    assert adapted["diffusion_loss"] < base["diffusion_loss"] - 0.1, summary["evaluation"]
    assert adapted["ar_loss"] < base["ar_loss"] + 0.05, summary["evaluation"]

    dec = summary["decoding"]
    # the Zen prompts: several tokens per pass at threshold 0.7 (measured 1.54), and the text
    # that comes out is the Zen of Python
    assert dec["block, threshold 0.7"][ZEN]["tokens_per_forward"] > 1.2, dec
    sample = dec["block, threshold 0.9"][ZEN]["sample"]
    assert sample.startswith(" Tim Peters\n\nBeautiful is better than ugly."), sample
    # AR decoding: one token per pass, exactly
    assert all(d["tokens_per_forward"] == 1.0 for d in dec["ar"].values())

    # the export decoded by tools/generate.py: 48 tokens in blocks of 8 are 6 blocks, 5 commit
    # passes (the last block is not committed), and prefill + denoise + commit passes in all
    m = re.fullmatch(r"# forward passes (\d+) \(denoise (\d+), commit (\d+)\), tokens (\d+), "
                     r"tokens/forward ([\d.]+), tokens/s [\d.]+", summary["export_decode"])
    assert m, summary["export_decode"]
    fwd, den, com, toks, tpf = int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5])
    assert (toks, com) == (48, 5) and fwd == 1 + den + com
    assert tpf == round(48 / fwd, 2)

    for name in ("loss_curves.png", "block_size_schedule.png"):
        assert (w / name).stat().st_size > 1000
    # the exported adapted model carries its block size
    meta = json.loads((w / "hf_nbdiff" / "nbdiff.json").read_text())
    assert meta["kind"] == "hf" and meta["block_size"] == 8 and meta["recipe"] == "nbdiff"
    assert "held-out AR loss" in r.stdout and "tokens/forward" in r.stdout
