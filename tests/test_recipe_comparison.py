"""The recipe-comparison script end to end at its tiny CPU size (the real run needs hours), and its
intervals (examples/recipe_comparison/intervals.py) on data whose answer is known."""
import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "examples", "recipe_comparison")
SCRIPT = os.path.join(HERE, "run.py")
TABLE2 = ["AR base", "diffullama", "transplant", "nbdiff (no curriculum)", "nbdiff", "block_causal"]
NEW_ROWS = "nbdiff,block_causal,nbdiff_antithetic,nbdiff_stratified"
TASKS = ["addition", "addition (trained pairs)", "copy"]
T_975_DF1 = 12.706204736174698  # Student's t, 97.5% quantile, 1 degree of freedom (two seeds)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--size", "tiny", *args], capture_output=True, text=True,
                          timeout=900)


def load(name):
    spec = importlib.util.spec_from_file_location(f"recipe_comparison_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_rows(path):
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "loss" in r and "block_size" in r]


def checkpoint_meta(folder):
    return json.loads((folder / "checkpoints" / "step_0000030" / "nbdiff.json").read_text())


def check_table2_rows(tmp_path, rep):
    """The first call: the recipes of Table 2 and block_causal, one seed."""
    assert rep["complete"] is True
    assert list(rep["results"]) == TABLE2
    # tiny: 250 pretraining and 30 adaptation steps of 8 x 64 tokens
    assert rep["pretrain_tokens"] == 250 * 8 * 64 and rep["adapt_tokens_per_recipe"] == 30 * 8 * 64
    for label, by_seed in rep["results"].items():
        assert list(by_seed) == ["0"], label
        for how, tasks in by_seed["0"]["decoding"].items():
            assert list(tasks) == TASKS, (label, how)
            for task, r in tasks.items():  # the per-problem data behind the intervals
                assert len(r["correct"]) == len(r["tokens"]) == len(r["passes"]) == 12, (label, how, task)
                assert r["accuracy"] == sum(r["correct"]) / 12
                assert r["tokens_per_forward"] == sum(r["tokens"]) / sum(r["passes"])
    res = {label: by_seed["0"] for label, by_seed in rep["results"].items()}
    base = res["AR base"]

    # pretraining learnt something: well below the uniform loss ln(512) = 6.24 (measured 3.81)
    assert base["ar_loss"] < math.log(512) - 1.5, base
    # every adaptation makes a better block-diffusion model than the AR base (block NLL bound at
    # B = 8, measured 4.89 -> diffullama 4.82, dual-stream recipes 4.70-4.74)
    for label in TABLE2[1:]:
        assert res[label]["nll_bound"] < base["nll_bound"] - 0.03, (label, res[label], base)
    for label in ("transplant", "nbdiff (no curriculum)", "nbdiff", "block_causal"):
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
    for label in ("transplant", "nbdiff (no curriculum)", "nbdiff", "block_causal"):
        assert list(res[label]["decoding"]) == ["block, threshold 0.9", "block, threshold 0.5"], label

    # each label ran the recipe it names: its training metrics and its checkpoint's metadata
    # (block size 8, lambda 0.5 unless transplant, the curriculum 1 -> 8 for nbdiff and block_causal)
    runs = {"diffullama": ("run_diffullama_s0", "diffullama", "single_annealed", 64),
            "transplant": ("run_transplant_s0", "transplant", "dual_context_causal", 8),
            "nbdiff (no curriculum)": ("run_nbdiff_no_curriculum_s0", "nbdiff", "dual_context_causal", 8),
            "nbdiff": ("run_nbdiff_s0", "nbdiff", "dual_context_causal", 8),
            "block_causal": ("run_block_causal_s0", "block_causal", "dual_block_causal", 8)}
    for label, (folder, recipe, layout, block) in runs.items():
        meta = checkpoint_meta(tmp_path / folder)
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
    # curriculum 1 -> 8 with D = 30 // 8 = 3: block 1 at step 0, 8 from step 9 on; block_causal
    # follows the same curriculum
    nb = training_rows(tmp_path / "run_nbdiff_s0" / "metrics.jsonl")
    assert nb[0]["block_size"] == 1 and nb[0]["diffusion"] == 0.0
    assert all(r["block_size"] == 8 for r in nb if r["step"] >= 9)
    bc = training_rows(tmp_path / "run_block_causal_s0" / "metrics.jsonl")
    assert [(r["step"], r["block_size"]) for r in bc] == [(r["step"], r["block_size"]) for r in nb]
    ar_rows = training_rows(tmp_path / "run_ar" / "metrics.jsonl")
    assert all(r["block_size"] == 1 and r["diffusion"] == 0.0 for r in ar_rows)
    assert ar_rows[-1]["loss"] < ar_rows[0]["loss"] - 1.5

    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert "| nbdiff | 1 |" in (tmp_path / "comparison.md").read_text()


def independent_bootstrap(cells, resamples=2000, seed=1):
    """Seeds, then problems within each seed, with replacement (written apart from intervals.py)."""
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        drawn = [cells[rng.randrange(len(cells))] for _ in cells]
        total = sum(c[rng.randrange(len(c))] for c in drawn for _ in c)
        stats.append(total / sum(len(c) for c in drawn))
    stats.sort()
    return stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]


def check_intervals(rep):
    """Every interval of the two-seed rows, recomputed here from the stored per-problem data."""
    summary = rep["intervals"]
    assert list(summary["rows"]) == list(rep["results"])
    for label, by_seed in rep["results"].items():
        row = summary["rows"][label]
        assert row["seeds"] == [int(s) for s in by_seed]
        if len(by_seed) == 2:  # losses: t interval over the two seeds
            for key in ("ar_loss", "nll_bound"):
                x = [r[key] for r in by_seed.values()]
                half = T_975_DF1 * abs(x[0] - x[1]) / 2  # sd / sqrt(2) of two values is |x0 - x1| / 2
                assert (row[key]["lo"], row[key]["hi"]) == pytest.approx((sum(x) / 2 - half, sum(x) / 2 + half)), \
                    (label, key)
        for how, tasks in row["decoding"].items():
            for task, entry in tasks.items():
                cells = [r["decoding"][how][task]["correct"] for r in by_seed.values()]
                acc = entry["accuracy"]
                assert acc["mean"] == pytest.approx(sum(map(sum, cells)) / sum(map(len, cells)))
                assert acc["lo"] <= acc["mean"] <= acc["hi"], (label, how, task, acc)
                lo, hi = independent_bootstrap(cells)
                assert (acc["lo"], acc["hi"]) == pytest.approx((lo, hi), abs=0.09), (label, how, task, acc)
                toks = sum(sum(r["decoding"][how][task]["tokens"]) for r in by_seed.values())
                passes = sum(sum(r["decoding"][how][task]["passes"]) for r in by_seed.values())
                assert entry["tokens_per_forward"]["mean"] == pytest.approx(toks / passes)
    # the paired differences of the paper's claims: A - B over the shared seeds
    comparisons = {(c["a"], c["b"]) for c in summary["claims"]}
    assert comparisons == {("nbdiff", "block_causal"), ("nbdiff (antithetic t)", "nbdiff"),
                           ("nbdiff (stratified t)", "nbdiff")}
    for c in summary["claims"]:
        a, b = rep["results"][c["a"]], rep["results"][c["b"]]
        seeds = [str(s) for s in c["seeds"]]
        assert seeds == [s for s in a if s in b]
        d = c["difference"]
        if c["metric"] == "accuracy":
            right = [sum(sum(r[s]["decoding"][c["decoding"]][c["task"]]["correct"]) for s in seeds) for r in (a, b)]
            assert d["mean"] == pytest.approx((right[0] - right[1]) / (12 * len(seeds)))
            assert c["paper"] == ("A better" if c["b"] == "block_causal" else None)
        elif c["metric"] in ("ar_loss", "nll_bound"):
            assert d["mean"] == pytest.approx(sum(a[s][c["metric"]] - b[s][c["metric"]] for s in seeds) / len(seeds))
        assert d["lo"] <= d["mean"] <= d["hi"], c
        assert c["separates"] == (d["lo"] > 0 or d["hi"] < 0), c


def test_recipe_comparison_tiny(tmp_path):
    # first call: Table 2's recipes and block_causal, seed 0
    r = run("--out", str(tmp_path), "--rows", "diffullama,transplant,nbdiff_no_curriculum,nbdiff,block_causal")
    assert r.returncode == 0, r.stderr[-3000:]
    check_table2_rows(tmp_path, json.loads((tmp_path / "report.json").read_text()))

    # second call in the same folder adds rows (the t samplings) and a seed; nbdiff and
    # block_causal at seed 0 are not trained again
    r = run("--out", str(tmp_path), "--rows", NEW_ROWS, "--adapt-seeds", "0,1")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = sorted(line.split(": 30 steps")[0].split("] ")[1] for line in r.stdout.splitlines()
                     if ": 30 steps in" in line)
    assert trained == sorted(["nbdiff (antithetic t) (seed 0)", "nbdiff (stratified t) (seed 0)",
                              "nbdiff (seed 1)", "block_causal (seed 1)", "nbdiff (antithetic t) (seed 1)",
                              "nbdiff (stratified t) (seed 1)"]), r.stdout[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["complete"] is True and rep["adapt_seeds"] == [0, 1]
    assert list(rep["results"]) == ["AR base", "nbdiff", "block_causal", "nbdiff (antithetic t)",
                                    "nbdiff (stratified t)"]
    assert all(list(v) == ["0", "1"] for k, v in rep["results"].items() if k != "AR base")
    # the t-sampling rows ran nbdiff with their t sampling, on the same data order as uniform nbdiff
    # (step 0, block 1: no noise, identical losses) and different noise once blocks are > 1
    for seed in (0, 1):
        uniform = training_rows(tmp_path / f"run_nbdiff_s{seed}" / "metrics.jsonl")
        for how in ("antithetic", "stratified"):
            folder = tmp_path / f"run_nbdiff_{how}_t_s{seed}"
            assert f"t_sampling: {how}" in (folder / "config.yaml").read_text()
            assert (checkpoint_meta(folder)["recipe"], checkpoint_meta(folder)["attention_layout"]) == \
                ("nbdiff", "dual_context_causal")
            rows = training_rows(folder / "metrics.jsonl")
            assert rows[0]["loss"] == uniform[0]["loss"] and rows[0]["block_size"] == 1
            assert rows[-1]["block_size"] == 8 and rows[-1]["diffusion"] != uniform[-1]["diffusion"]
    check_intervals(rep)
    table = (tmp_path / "comparison.md").read_text()
    assert "| nbdiff | 2 |" in table and "| block_causal | 2 |" in table and "Paired differences" in table

    # --report-only recomputes the intervals from the per-seed results alone
    stripped = dict(rep)
    del stripped["intervals"]
    (tmp_path / "report.json").write_text(json.dumps(stripped))
    (tmp_path / "comparison.md").unlink()
    (tmp_path / "comparison.png").unlink()
    r = run("--out", str(tmp_path), "--report-only")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "comparison.md").read_text() == table
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    assert (tmp_path / "comparison.png").stat().st_size > 1000

    # a third call finds every stage done and trains nothing
    stages = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert len(stages) == 2 + (5 + 6) + (1 + 5 + 6)
    r = run("--out", str(tmp_path), "--rows", NEW_ROWS, "--adapt-seeds", "0,1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps in" not in r.stdout
    assert json.loads((tmp_path / "report.json").read_text()) == rep

    # other settings in the same folder are refused, naming the folder
    r = run("--out", str(tmp_path), "--adapt-steps", "5")
    assert r.returncode != 0 and "stages.json" in r.stderr and "--fresh" in r.stderr


def test_recipe_comparison_problems_are_held_out():
    cmp = load("run")
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


def cells(p_by_seed, n=200, seed=0):
    """``[seed][problem]`` 0/1 answers with about ``p`` right per seed."""
    rng = random.Random(seed)
    return [[int(rng.random() < p) for _ in range(n)] for p in p_by_seed]


def test_intervals_resample_seeds_and_problems():
    iv = load("intervals")
    # seeds that disagree: the interval spans the seeds (resampling problems alone would give
    # about +-0.04 around 0.5)
    spread = iv.ratio_interval(cells([0.1, 0.5, 0.9]))
    assert spread["lo"] < 0.3 and spread["hi"] > 0.7 and spread["seeds"] == 3 and spread["problems"] == 200
    # seeds that agree exactly: the width comes from the problems, about 2 * 1.96 * sqrt(0.25 / 600)
    # = 0.08 (resampling seeds alone would give width 0)
    same = cells([0.5])[0]
    agree = iv.ratio_interval([same, same, same])
    assert 0.05 < agree["hi"] - agree["lo"] < 0.12 and agree["lo"] < agree["mean"] < agree["hi"]
    # fixed generator: the same data give the same interval; another generator seed another one
    assert iv.ratio_interval(cells([0.1, 0.5, 0.9])) == spread
    assert iv.ratio_interval(cells([0.1, 0.5, 0.9]), seed=5) != spread
    # a ratio of sums: tokens per forward
    tpf = iv.ratio_interval([[8, 8], [8, 8]], [[2, 8], [4, 4]])
    assert tpf["mean"] == 32 / 18 and 1.0 <= tpf["lo"] <= tpf["mean"] <= tpf["hi"] <= 4.0
    with pytest.raises(ValueError, match="same non-zero number of problems"):
        iv.ratio_interval([[1, 0], [1]])


def test_intervals_paired_and_t():
    iv = load("intervals")
    a = cells([0.3, 0.5, 0.7])
    # identical rows: the paired difference is exactly 0 with no width
    same = iv.paired_ratio_interval(a, a)
    assert (same["mean"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0) and iv.excludes_zero(same) is False
    # B is A with 20 of 200 answers made wrong in every seed: a difference of 0.1 that pairing
    # separates although the rows' own intervals overlap
    b = [[0 if i < 20 else x for i, x in enumerate(row)] for row in a]
    for row in a:
        row[:20] = [1] * 20
    d = iv.paired_ratio_interval(a, b)
    assert d["mean"] == pytest.approx(0.1) and iv.excludes_zero(d) and d["lo"] > 0.05
    ia, ib = iv.ratio_interval(a), iv.ratio_interval(b)
    assert ia["lo"] < ib["hi"]
    with pytest.raises(ValueError, match="same seeds and problems"):
        iv.paired_ratio_interval(a, b[:2])
    # t interval over seeds: t_{0.975, 2} = 4.302652729911275
    t = iv.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)
    assert (t["mean"], t["lo"], t["hi"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    one = iv.t_interval([1.5])
    assert (one["mean"], one["lo"], one["hi"]) == (1.5, None, None) and iv.excludes_zero(one) is None


def test_recipe_comparison_bad_inputs(tmp_path):
    (tmp_path / "stages.json").write_text('{"config": ')
    r = run("--out", str(tmp_path))
    assert r.returncode != 0 and "stages.json: not valid JSON" in r.stderr and "--fresh" in r.stderr
    for seeds in ("1,1", "a,b", ","):
        r = run("--out", str(tmp_path / "x"), "--adapt-seeds", seeds)
        assert r.returncode == 2 and "--adapt-seeds" in r.stderr, seeds
    for rows in ("nbdiff,nbdiff", "nbdiff,bd3lm", ","):
        r = run("--out", str(tmp_path / "x"), "--rows", rows)
        assert r.returncode == 2 and "--rows" in r.stderr and "block_causal" in r.stderr, rows
    r = run("--out", str(tmp_path / "empty"), "--report-only")
    assert r.returncode == 2 and "report.json: not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(dict(
        size="tiny", block_size=8, adapt_seeds=[0], results={"nbdiff": {"0": dict(
            ar_loss=1.0, nll_bound=2.0, single_stream_loss=None,
            decoding={"ar": {t: dict(accuracy=0.5, tokens_per_forward=1.0) for t in TASKS}})}})))
    r = run("--out", str(tmp_path / "old"), "--report-only")
    assert r.returncode == 2 and "no per-problem correct" in r.stderr and "Traceback" not in r.stderr


def test_an_answer_ends_at_a_newline_or_the_end_of_document_token():
    """The answer is read up to the first end-of-document token, then up to the first newline:
    ``58</s>Q: 8`` answers 58 (scored wrong before 2026-12-03), as do ``58\\nQ: ...`` and ``58``."""
    rc = load("run")

    class Tok:
        eod_id = 0
        vocab = {1: "5", 2: "8", 3: "\n", 4: "Q", 5: " "}

        def decode(self, ids):
            return "".join(self.vocab.get(i, "</s>") for i in ids)

    tok = Tok()
    assert rc.answer_text([5, 1, 2, 0, 4, 1], tok) == "58"
    assert rc.answer_text([1, 2, 3, 4, 0], tok) == "58"
    assert rc.answer_text([1, 2], tok) == "58"
    assert rc.answer_text([1, 0, 2], tok) == "5"
    assert rc.evaluated({"scoring": rc.SCORING, "decoding": {"ar": {"copy": {"correct": [1]}}}})
    assert not rc.evaluated({"decoding": {"ar": {"copy": {"correct": [1]}}}})  # scored by the old rule
