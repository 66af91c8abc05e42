#!/usr/bin/env python
"""Recipe comparison at small scale: one AR base, adaptations by several recipes at the same
token budget, evaluated the same way, with 95% intervals over seeds and problems.

    python examples/recipe_comparison/run.py --out runs/comparison            # one GPU, ~27M model
    python examples/recipe_comparison/run.py --size cpu --out runs/cmp-cpu    # 2 CPU cores, ~2M
    python examples/recipe_comparison/run.py --size tiny --out /tmp/cmp       # smoke run (tests)
    python examples/recipe_comparison/run.py --out runs/cmp-cpu --report-only # re-render report.json

Corpus (generated, checkable): two-digit additions (``Q: 23+58= A: 81``) and copy problems
(``copy: k f a q -> k f a q``) mixed with the Python standard library's docstrings (see the
quickstart). Additions test whether the adapted model still computes what the AR base learnt:
the answer depends on the whole prompt and its digits on each other (carries), which is what
parallel commits inside a block can get wrong. Copies are easy to predict in parallel once the
prompt is seen, which is what block decoding exploits. The text keeps it a language model. The
tokenizer splits digits (as the Llama tokenizers do), so addition is learnt digit by digit, not
as a lookup over number tokens; held-out additions use operand pairs never seen in training.

Stages: a Llama is pretrained from random weights with ``ar``; converted with an appended mask
token; adapted by each row of ``--rows`` (default: all), each for the same steps x batch x
sequence (equal training tokens), once per ``--adapt-seeds`` seed (training order and noise):

* ``diffullama`` (annealing over half the steps), ``transplant`` (fixed block B, lambda 0),
  ``nbdiff_no_curriculum`` (fixed block B, lambda 0.5), ``nbdiff`` (curriculum 1 -> B): the
  recipe comparison (NBDiff's Table 2);
* ``block_causal``: ``nbdiff`` with the block-causal clean stream (BD3-LM's layout), same
  curriculum and lambda: the clean-stream mask ablation (NBDiff's Table 1);
* ``nbdiff_antithetic``, ``nbdiff_stratified``: ``nbdiff`` with ``recipe.t_sampling`` antithetic
  or stratified instead of uniform (docs/method.md, "Noise").

Every model is evaluated right after its training, the same way: held-out AR loss and
block-diffusion NLL bound at B on text, and on held-out additions, additions of trained pairs
and copies the accuracy of the model's native decoding (AR for the base, block decoding at
thresholds 0.9 and 0.5 for dual-stream recipes, full-sequence decoding in 8 and 4 steps for
diffullama) with its tokens per forward; per problem, whether it was right and its tokens and
forward passes are kept. Means and 95% intervals (a bootstrap over seeds and problems for
accuracies, a t interval over seeds for losses; ``intervals.py``) and the paired differences
behind the paper's claims are computed from those by ``report.py``.

Every finished stage is recorded in ``stages.json`` under ``--out``; running the same command
again skips finished stages (a run cut off by a time limit continues where it stopped; a
training stage stopped by SIGTERM saves and resumes from its checkpoint), and a later call may
add seeds to ``--adapt-seeds`` or rows to ``--rows``. Other settings in the same folder are
refused. ``report.json`` (the rows and seeds of this call), ``comparison.md`` and
``comparison.png`` are rewritten after every evaluated model (``"complete": false`` until the
last); ``--report-only`` rewrites them from ``report.json`` alone. ``training.png`` shows the
training losses.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import zlib

from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.fileio import atomic_write, save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart", "quickstart.py")

SIZES = {
    # ~27M parameters with a 2048-token vocabulary (one H100)
    "small": dict(model=dict(hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4,
                             ffn_hidden_size=1536, max_seq_len=512),
                  vocab=2048, seq=256, micro=32, batch=64, pretrain=2000, adapt=600, block=16,
                  problems=60000, eval_problems=300, dtype="auto", pretrain_lr=1e-3, adapt_lr=3e-4),
    # ~2M parameters (two CPU cores, about an hour)
    "cpu": dict(model=dict(hidden_size=192, num_layers=4, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=512, max_seq_len=256),
                vocab=768, seq=128, micro=32, batch=32, pretrain=1500, adapt=300, block=8,
                problems=40000, eval_problems=200, dtype="fp32", pretrain_lr=2e-3, adapt_lr=5e-4),
    # smoke run (tests, about 35 s): long enough that every adaptation lowers the block NLL bound
    # of the AR base clearly (4.89 -> 4.70..4.82) and the AR loss term shows (nbdiff keeps a lower
    # held-out AR loss than transplant)
    "tiny": dict(model=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, max_seq_len=128),
                 vocab=512, seq=64, micro=8, batch=8, pretrain=250, adapt=30, block=8,
                 problems=2000, eval_problems=12, dtype="fp32", pretrain_lr=3e-3, adapt_lr=1e-3),
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def held_out_pair(a: int, b: int) -> bool:
    """About 10% of operand pairs never appear in training, chosen by a hash so that the split
    is unrelated to the digits (a linear rule such as ``(131a + 71b) % 10 == 0`` is ``a + b``
    ending in 0: every held-out answer would end in a digit never seen there in training)."""
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 0


def copy_words(rng: random.Random) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))


def corpus(n: int, seed: int) -> list[str]:
    """``n`` problem lines in documents of 8: 60% additions, 40% copies."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n // 8):
        lines = []
        for _ in range(8):
            if rng.random() < 0.6:
                while True:
                    a, b = rng.randint(10, 99), rng.randint(10, 99)
                    if not held_out_pair(a, b):
                        break
                lines.append(f"Q: {a}+{b}= A: {a + b}")
            else:
                w = copy_words(rng)
                lines.append(f"copy: {w} -> {w}")
        docs.append("\n".join(lines))
    return docs


TASKS = ("addition", "addition (trained pairs)", "copy")  # the order of report.py's TASKS
MAX_NEW_TOKENS = {"addition": 8, "addition (trained pairs)": 8, "copy": 16}  # answer + newline fit


def eval_problems(n: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """``n`` each of: held-out additions (operand pairs never trained on: does the model add?),
    additions of trained pairs (does adaptation keep what the AR base learnt?) and copies (a
    fresh random stream; a copy is checkable whether or not its words were seen)."""
    rng = random.Random(seed + 1)
    held, seen = [], []
    while len(held) < n or len(seen) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        group = held if held_out_pair(a, b) else seen
        if len(group) < n:
            group.append((f"Q: {a}+{b}= A:", str(a + b)))
    copies = []
    for _ in range(n):
        w = copy_words(rng)
        copies.append((f"copy: {w} ->", w))
    return {"addition": held, "addition (trained pairs)": seen, "copy": copies}


SCORING = "answer up to the first newline or end-of-document token"
"""How an answer is read off a decoding (recorded with every evaluation; an evaluation recorded
under another rule is redone). Until 2026-12-03 the answer ran to the first newline only, so an
answer the model ended with the end-of-document token (``58</s>``) counted as wrong."""


def answer_text(ids: list, tok) -> str:
    """The answer a decoding gives: its text up to the first end-of-document token and then up to
    the first newline, stripped (:data:`SCORING`)."""
    if tok.eod_id in ids:
        ids = ids[: ids.index(tok.eod_id)]
    return tok.decode(ids).split("\n")[0].strip()


def task_accuracy(runner, problems, tok, max_new_tokens: int, **decode) -> dict:
    """Greedy decoding of every prompt (after an end-of-document token, as each training document
    starts) for ``max_new_tokens`` tokens whatever it produces (so that tokens per forward compare
    equal lengths); right when :func:`answer_text` equals the answer. Per problem it keeps
    whether it was right and the tokens and forward passes of its decoding, from which the
    intervals are computed (``intervals.py``)."""
    from megatron_nbdiff.inference import generate

    prompts = [[tok.eod_id] + tok.encode(q) for q, _ in problems]
    outs = generate(runner, prompts, max_new_tokens=max_new_tokens, stop_at_eos=False, **decode)
    correct = [int(answer_text(list(o["token_ids"]), tok) == ans) for (_, ans), o in zip(problems, outs)]
    tokens = [int(o["stats"]["tokens"]) for o in outs]
    passes = [int(o["stats"]["forward_passes"]) for o in outs]
    return dict(accuracy=sum(correct) / len(problems), tokens_per_forward=sum(tokens) / sum(passes),
                sample=problems[0][0] + outs[0].get("text", ""), correct=correct, tokens=tokens, passes=passes)


def load_quickstart():
    """The quickstart script as a module (its corpus, model and training helpers), loaded from
    its file: examples are scripts, not an importable package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nbdiff_quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stages:
    """Finished stages of one run folder, kept in ``stages.json`` (written atomically)."""

    def __init__(self, out: str, config: dict):
        self.path = os.path.join(out, "stages.json")
        self.data = {"config": config, "stages": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    old = json.load(f)
            except ValueError as exc:
                raise ConfigError(f"{self.path}: not valid JSON ({exc}); use another --out or pass --fresh") from None
            if old.get("config") != config:
                diff = sorted(k for k in set(config) | set(old.get("config", {}))
                              if config.get(k) != old.get("config", {}).get(k))
                raise ConfigError(f"{self.path}: this folder holds a run with other settings ({', '.join(diff)}); "
                                  "use another --out or pass --fresh")
            self.data = old

    def get(self, name: str):
        return self.data["stages"].get(name)

    def done(self, name: str, value) -> None:
        self.data["stages"][name] = value
        write_json(self.path, self.data)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def report_module():
    """``report.py`` beside this script (intervals, table, plot), loaded from its path: examples
    are scripts, not an importable package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_comparison_report", os.path.join(HERE, "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dir_name(label: str, seed: int) -> str:
    return "run_" + re.sub(r"[^a-z]+", "_", label).strip("_") + f"_s{seed}"


def plot_training(out: str, runs: dict) -> None:
    """training.png: the AR pretraining loss, and each adaptation's training loss against step
    (the objectives differ between recipes, so compare shapes, not levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, path in runs.items():
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path)]
        rows = [r for r in rows if "loss" in r and "step" in r]
        ax = axes[0] if label == "AR pretraining" else axes[1]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    axes[0].set_title("AR pretraining (ar recipe)")
    axes[1].set_title("adaptation (each recipe's own training loss)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "training.png"))


def recipes(S: dict) -> dict[str, tuple[str, dict]]:
    """Every row the comparison can train: ``--rows`` name -> (label in the report, recipe).
    All train for the same steps x batch x sequence; the curriculum rows share one curriculum."""
    B = S["block"]
    curriculum = dict(block_max=B, block_interval=max(S["adapt"] // 8, 1))
    return {
        "diffullama": ("diffullama", dict(name="diffullama", anneal_steps=max(S["adapt"] // 2, 1))),
        "transplant": ("transplant", dict(name="transplant", block_size=B)),
        "nbdiff_no_curriculum": ("nbdiff (no curriculum)", dict(name="nbdiff", block_size=B)),
        "nbdiff": ("nbdiff", dict(name="nbdiff", **curriculum)),
        "block_causal": ("block_causal", dict(name="block_causal", **curriculum)),
        "nbdiff_antithetic": ("nbdiff (antithetic t)", dict(name="nbdiff", t_sampling="antithetic", **curriculum)),
        "nbdiff_stratified": ("nbdiff (stratified t)", dict(name="nbdiff", t_sampling="stratified", **curriculum)),
    }


ROW_NAMES = tuple(recipes(SIZES["tiny"]))


def evaluated(row) -> bool:
    """Whether a recorded evaluation has the per-problem data the intervals need and was scored
    by :data:`SCORING` (other evaluations are redone)."""
    return bool(row) and row.get("scoring") == SCORING and all(
        isinstance(r.get("correct"), list) for d in row["decoding"].values() for r in d.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--seed", type=int, default=0, help="corpus, tokenizer and AR base")
    p.add_argument("--adapt-seeds", default="0", help="comma-separated seeds of the adaptations (data order, noise)")
    p.add_argument("--rows", default=",".join(ROW_NAMES),
                   help=f"comma-separated adaptations to run (default: all of {','.join(ROW_NAMES)})")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--adapt-steps", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of continuing a run there")
    p.add_argument("--report-only", action="store_true",
                   help="recompute the intervals and rewrite comparison.md and comparison.png from --out/report.json; "
                        "trains and evaluates nothing")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.report_only:
        if args.fresh:
            p.error("--report-only re-renders an existing report; it cannot be combined with --fresh")
        rep = report_module()
        print(rep.render(out, rep.read_report(out)))
        return 0
    S = dict(SIZES[args.size])
    S["pretrain"] = args.pretrain_steps or S["pretrain"]
    S["adapt"] = args.adapt_steps or S["adapt"]
    try:
        adapt_seeds = [int(s) for s in args.adapt_seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--adapt-seeds: expected comma-separated integers, found {args.adapt_seeds!r}")
    if not adapt_seeds or len(set(adapt_seeds)) != len(adapt_seeds):
        p.error(f"--adapt-seeds: expected distinct integers, found {args.adapt_seeds!r}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_NAMES]
    if not rows or unknown or len(set(rows)) != len(rows):
        p.error(f"--rows: expected distinct names among {','.join(ROW_NAMES)}, found {args.rows!r}")
    rows = [r for r in ROW_NAMES if r in rows]  # the report's order does not depend on the option's
    if args.fresh and os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    # rows and seeds are not settings: a later call may add either to the same folder
    stages = Stages(out, dict(size=args.size, seed=args.seed, settings=S))
    t0 = time.time()

    import torch

    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_nbdiff.data import Tokenizer
    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.data.preprocess import preprocess
    from megatron_nbdiff.evaluation.metrics import heldout_losses, load_sequences
    from megatron_nbdiff.inference import load_runner
    from megatron_nbdiff.parallel import destroy_parallel

    qs = load_quickstart()
    render = report_module().render

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    qs.log(f"recipe comparison, size {args.size}, on {device}; run folder {out}; rows {','.join(rows)}; "
           f"adaptation seeds {','.join(map(str, adapt_seeds))}")
    tok_dir, prefix = os.path.join(out, "tokenizer"), os.path.join(out, "data", "train")
    if not stages.get("data"):
        t = time.time()
        docs_text, held_text = qs.split(qs.stdlib_docs())
        docs = corpus(S["problems"], args.seed) + docs_text
        random.Random(args.seed).shuffle(docs)
        qs.write_jsonl(os.path.join(out, "train.jsonl"), docs)
        qs.write_jsonl(os.path.join(out, "heldout.jsonl"), held_text)
        train_bpe_tokenizer(docs, S["vocab"], tok_dir, split_digits=True)
        # force: a rerun after a kill between writing the data and marking the stage done
        st = preprocess(os.path.join(out, "train.jsonl"), tok_dir, prefix, quiet=True, force=True)
        stages.done("data", dict(documents=len(docs), tokens=st["tokens"], seconds=time.time() - t))
    qs.log(f"corpus: {stages.get('data')['documents']} documents, {stages.get('data')['tokens']} tokens")
    tok = Tokenizer(tok_dir)

    common = dict(seq=S["seq"], micro_batch=S["micro"], global_batch=S["batch"], dtype=S["dtype"])
    base = os.path.join(out, "meg_base")
    if not stages.get("pretrain"):
        t = time.time()
        # force: a rerun after a kill inside this stage redoes its conversions (deterministic, into
        # this script's own folders); the training resumes from run_ar's latest checkpoint
        qs.make_hf_init(os.path.join(out, "hf_init"), tok.vocab_size, tok_dir, model=S["model"])
        convert_hf_to_megatron(os.path.join(out, "hf_init"), os.path.join(out, "meg_init"), mask_token="none",
                               progress=False, force=True)
        base_run = qs.train("ar", os.path.join(out, "meg_init"), os.path.join(out, "run_ar"), prefix, tok_dir,
                            dict(name="ar"), S["pretrain"], S["pretrain_lr"], seed=args.seed, **common)
        convert_megatron_to_hf(base_run, os.path.join(out, "hf_base"), progress=False, force=True)
        convert_hf_to_megatron(os.path.join(out, "hf_base"), base, mask_token="append", progress=False, force=True)
        stages.done("pretrain", dict(checkpoint=base, seconds=time.time() - t))

    B = S["block"]
    table = recipes(S)
    # seed-major, so that every row has its first seed early in a long run; each model is
    # evaluated right after its training, so the report grows as the run goes
    models = [("AR base", None, None)]
    models += [(table[r][0], seed, table[r][1]) for seed in adapt_seeds for r in rows]

    problems = eval_problems(S["eval_problems"], args.seed)
    seqs = load_sequences(os.path.join(out, "heldout.jsonl"), tokenizer=tok, seq_length=S["seq"], max_sequences=64)
    budget = S["adapt"] * S["batch"] * S["seq"]
    report = dict(size=args.size, device=device, model=S["model"], settings=S, block_size=B, seed=args.seed,
                  adapt_seeds=adapt_seeds, rows=rows, pretrain_tokens=S["pretrain"] * S["batch"] * S["seq"],
                  adapt_tokens_per_recipe=budget, eval_problems_per_task=S["eval_problems"],
                  heldout_sequences=len(seqs), recipes={table[r][0]: table[r][1] for r in rows}, results={},
                  stage_seconds={}, complete=False)
    decodings = {
        "AR base": {"ar": dict(mode="ar")},
        "diffullama": {"full, 8 steps": dict(mode="full", steps=8), "full, 4 steps": dict(mode="full", steps=4)},
    }
    dual = {f"block, threshold {th}": dict(mode="block", block_size=B, threshold=th) for th in (0.9, 0.5)}
    text = ""
    for i, (label, seed, recipe) in enumerate(models):
        ck = base
        if recipe is not None:
            name = f"adapt/{label}/seed {seed}"
            if not stages.get(name):
                t = time.time()
                ck = qs.train(f"{label} (seed {seed})", base, os.path.join(out, run_dir_name(label, seed)), prefix,
                              tok_dir, recipe, S["adapt"], S["adapt_lr"], seed=1000 + seed, **common)
                stages.done(name, dict(checkpoint=ck, seconds=time.time() - t, recipe=recipe))
            ck = stages.get(name)["checkpoint"]
        name = f"eval/{label}" + ("" if seed is None else f"/seed {seed}")
        if not evaluated(stages.get(name)):
            t = time.time()
            runner = load_runner(ck)
            losses = heldout_losses(runner, seqs, block_sizes=[B], seed=7)
            row = dict(ar_loss=losses["ar"]["loss"], nll_bound=losses["block"][str(B)]["nll_bound"],
                       single_stream_loss=losses.get("single_stream", {}).get("diffusion_loss"), decoding={})
            for how, kw in decodings.get(label, dual).items():
                row["decoding"][how] = {t: task_accuracy(runner, problems[t], tok, MAX_NEW_TOKENS[t], **kw)
                                        for t in TASKS}
            row["seconds"] = time.time() - t
            row["scoring"] = SCORING
            del runner
            stages.done(name, row)
        row = stages.get(name)
        qs.log(f"{label}" + ("" if seed is None else f" (seed {seed})") + ": AR loss "
               f"{row['ar_loss']:.3f}, NLL bound {row['nll_bound']:.3f}; " + "; ".join(
                   f"{how}: " + ", ".join(f"{t} {d[t]['accuracy']:.3f} @ {d[t]['tokens_per_forward']:.2f} tok/fwd"
                                          for t in TASKS)
                   for how, d in row["decoding"].items()))
        report["results"].setdefault(label, {})[str(seed if seed is not None else args.seed)] = row
        report["stage_seconds"] = {k: v["seconds"] for k, v in stages.data["stages"].items()}
        report["complete"] = i == len(models) - 1
        text = render(out, report)
    destroy_parallel()
    plot_training(out, {"AR pretraining": os.path.join(out, "run_ar", "metrics.jsonl"),
                        **{f"{label} (seed {seed})": os.path.join(out, run_dir_name(label, seed), "metrics.jsonl")
                           for label, seed, _ in models[1:]}})
    print(text)
    print(f"report: {os.path.join(out, 'report.json')} ({time.time() - t0:.0f} s in this call)")
    return 0


if __name__ == "__main__":
    from megatron_nbdiff.cli import run_main

    sys.exit(run_main(main))
