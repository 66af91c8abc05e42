#!/usr/bin/env python
"""Recipe comparison at small scale: one AR base, four adaptations at the same token budget,
evaluated the same way.

    python examples/recipe_comparison/run.py --out runs/comparison            # one GPU, ~27M model
    python examples/recipe_comparison/run.py --size cpu --out runs/cmp-cpu    # 2 CPU cores, ~2M, ~1 h
    python examples/recipe_comparison/run.py --size tiny --out /tmp/cmp       # smoke run (tests)

Corpus (generated, checkable): two-digit additions (``Q: 23+58= A: 81``) and copy problems
(``copy: k f a q -> k f a q``) mixed with the Python standard library's docstrings (see the
quickstart). Additions test whether the adapted model still computes what the AR base learnt:
the answer depends on the whole prompt and its digits on each other (carries), which is what
parallel commits inside a block can get wrong. Copies are easy to predict in parallel once the
prompt is seen, which is what block decoding exploits. The text keeps it a language model. The
tokenizer splits digits (as the Llama tokenizers do), so addition is learnt digit by digit, not
as a lookup over number tokens; held-out additions use operand pairs never seen in training.

Stages: a Llama is pretrained from random weights with ``ar``; converted with an appended mask
token; adapted with ``diffullama`` (annealing over half the steps), ``transplant`` (fixed block
B, lambda 0), ``nbdiff`` without curriculum (fixed block B, lambda 0.5) and full ``nbdiff``
(curriculum 1 -> B), each for the same steps x batch x sequence (equal training tokens), once
per ``--adapt-seeds`` seed (training order and noise); then every model is evaluated the same
way: held-out AR loss and block-diffusion NLL bound at B on text, and on held-out additions,
additions of trained pairs and copies the accuracy of the model's native decoding (AR for the
base, block decoding at thresholds 0.9 and 0.5 for dual-stream recipes, full-sequence decoding
in 8 and 4 steps for diffullama) with its tokens per forward.

Every finished stage is recorded in ``stages.json`` under ``--out``; running the same command
again skips finished stages (a run cut off by a time limit continues where it stopped; a
training stage stopped by SIGTERM saves and resumes from its checkpoint), and a later call may
add seeds to ``--adapt-seeds``. Other settings in the same folder are refused.
``report.json``, ``comparison.md`` and ``comparison.png`` are rewritten after every evaluated
model (``"complete": false`` until the last); ``training.png`` shows the training losses.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
import zlib

from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.fileio import atomic_write, save_figure

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


TASKS = ("addition", "addition (trained pairs)", "copy")
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


def task_accuracy(runner, problems, tok, max_new_tokens: int, **decode) -> dict:
    """Greedy decoding of every prompt (after an end-of-document token, as each training document
    starts); right when the text up to the first newline equals the answer."""
    from megatron_nbdiff.inference import generate

    prompts = [[tok.eod_id] + tok.encode(q) for q, _ in problems]
    outs = generate(runner, prompts, max_new_tokens=max_new_tokens, stop_at_eos=False, **decode)
    right = sum(int(o.get("text", "").split("\n")[0].strip() == ans) for (_, ans), o in zip(problems, outs))
    toks = sum(o["stats"]["tokens"] for o in outs)
    passes = sum(o["stats"]["forward_passes"] for o in outs)
    return dict(accuracy=right / len(problems), tokens_per_forward=toks / passes,
                sample=problems[0][0] + outs[0].get("text", ""))


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


def run_dir_name(label: str, seed: int) -> str:
    return "run_" + re.sub(r"[^a-z]+", "_", label).strip("_") + f"_s{seed}"


def write_outputs(out: str, report: dict) -> str:
    """report.json, comparison.md (mean over seeds, and the range when there are several) and
    comparison.png (accuracy against tokens per forward, one line per model)."""
    write_json(os.path.join(out, "report.json"), report)
    B = report["block_size"]

    def fmt(values, digits):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        s = f"{statistics.mean(values):.{digits}f}"
        if len(values) > 1:
            s += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
        return s

    lines = [f"| model | held-out AR loss | block NLL bound (B={B}) | single-stream loss | decoding | "
             + " | ".join(f"{t} accuracy | {t} tokens/forward" for t in TASKS) + " |",
             "|---" * (5 + 2 * len(TASKS)) + "|"]
    summary = {}
    for label, by_seed in report["results"].items():
        rows = list(by_seed.values())
        for how in rows[0]["decoding"]:
            d = {task: [r["decoding"][how][task] for r in rows] for task in TASKS}
            summary.setdefault(label, {})[how] = {
                task: (statistics.mean(x["accuracy"] for x in v), statistics.mean(x["tokens_per_forward"] for x in v))
                for task, v in d.items()}
            lines.append(
                f"| {label} | {fmt([r['ar_loss'] for r in rows], 3)} | {fmt([r['nll_bound'] for r in rows], 3)} | "
                f"{fmt([r['single_stream_loss'] for r in rows], 3)} | {how} | "
                + " | ".join(f"{fmt([x['accuracy'] for x in d[t]], 3)} | "
                             f"{fmt([x['tokens_per_forward'] for x in d[t]], 2)}" for t in TASKS) + " |")
    table = "\n".join(lines)
    atomic_write(os.path.join(out, "comparison.md"), table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5))
    for ax, task in zip(axes, TASKS):
        for label, hows in summary.items():
            pts = sorted(v[task][::-1] for v in hows.values())  # (tokens/forward, accuracy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
    axes[0].legend()
    seeds = len(report["adapt_seeds"])
    fig.suptitle(f"recipe comparison ({report['size']}: {report['adapt_tokens_per_recipe']:,} adaptation tokens per "
                 f"recipe, mean of {seeds} seed{'s' if seeds > 1 else ''})")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "comparison.png"))
    return table


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--seed", type=int, default=0, help="corpus, tokenizer and AR base")
    p.add_argument("--adapt-seeds", default="0", help="comma-separated seeds of the adaptations (data order, noise)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--adapt-steps", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of continuing a run there")
    args = p.parse_args(argv)
    S = dict(SIZES[args.size])
    S["pretrain"] = args.pretrain_steps or S["pretrain"]
    S["adapt"] = args.adapt_steps or S["adapt"]
    try:
        adapt_seeds = [int(s) for s in args.adapt_seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--adapt-seeds: expected comma-separated integers, found {args.adapt_seeds!r}")
    if not adapt_seeds or len(set(adapt_seeds)) != len(adapt_seeds):
        p.error(f"--adapt-seeds: expected distinct integers, found {args.adapt_seeds!r}")
    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
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

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    qs.log(f"recipe comparison, size {args.size}, on {device}; run folder {out}")
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
        qs.make_hf_init(os.path.join(out, "hf_init"), tok.vocab_size, tok_dir, model=S["model"])
        convert_hf_to_megatron(os.path.join(out, "hf_init"), os.path.join(out, "meg_init"), mask_token="none",
                               progress=False)
        base_run = qs.train("ar", os.path.join(out, "meg_init"), os.path.join(out, "run_ar"), prefix, tok_dir,
                            dict(name="ar"), S["pretrain"], S["pretrain_lr"], seed=args.seed, **common)
        convert_megatron_to_hf(base_run, os.path.join(out, "hf_base"), progress=False)
        convert_hf_to_megatron(os.path.join(out, "hf_base"), base, mask_token="append", progress=False)
        stages.done("pretrain", dict(checkpoint=base, seconds=time.time() - t))

    B = S["block"]
    recipes = {
        "diffullama": dict(name="diffullama", anneal_steps=max(S["adapt"] // 2, 1)),
        "transplant": dict(name="transplant", block_size=B),
        "nbdiff (no curriculum)": dict(name="nbdiff", block_size=B),
        "nbdiff": dict(name="nbdiff", block_max=B, block_interval=max(S["adapt"] // 8, 1)),
    }
    models = [("AR base", None, base)]
    for seed in adapt_seeds:
        for label, recipe in recipes.items():
            name = f"adapt/{label}/seed {seed}"
            if not stages.get(name):
                t = time.time()
                ck = qs.train(f"{label} (seed {seed})", base, os.path.join(out, run_dir_name(label, seed)), prefix,
                              tok_dir, recipe, S["adapt"], S["adapt_lr"], seed=1000 + seed, **common)
                stages.done(name, dict(checkpoint=ck, seconds=time.time() - t))
            models.append((label, seed, stages.get(name)["checkpoint"]))

    problems = eval_problems(S["eval_problems"], args.seed)
    seqs = load_sequences(os.path.join(out, "heldout.jsonl"), tokenizer=tok, seq_length=S["seq"], max_sequences=64)
    budget = S["adapt"] * S["batch"] * S["seq"]
    report = dict(size=args.size, device=device, model=S["model"], settings=S, block_size=B, seed=args.seed,
                  adapt_seeds=adapt_seeds, pretrain_tokens=S["pretrain"] * S["batch"] * S["seq"],
                  adapt_tokens_per_recipe=budget, eval_problems_per_task=S["eval_problems"],
                  heldout_sequences=len(seqs), results={}, stage_seconds={}, complete=False)
    decodings = {
        "AR base": {"ar": dict(mode="ar")},
        "diffullama": {"full, 8 steps": dict(mode="full", steps=8), "full, 4 steps": dict(mode="full", steps=4)},
    }
    dual = {f"block, threshold {th}": dict(mode="block", block_size=B, threshold=th) for th in (0.9, 0.5)}
    table = ""
    for i, (label, seed, ck) in enumerate(models):
        name = f"eval/{label}" + ("" if seed is None else f"/seed {seed}")
        if not stages.get(name):
            t = time.time()
            runner = load_runner(ck)
            losses = heldout_losses(runner, seqs, block_sizes=[B], seed=7)
            row = dict(ar_loss=losses["ar"]["loss"], nll_bound=losses["block"][str(B)]["nll_bound"],
                       single_stream_loss=losses.get("single_stream", {}).get("diffusion_loss"), decoding={})
            for how, kw in decodings.get(label, dual).items():
                row["decoding"][how] = {t: task_accuracy(runner, problems[t], tok, MAX_NEW_TOKENS[t], **kw)
                                        for t in TASKS}
            row["seconds"] = time.time() - t
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
        table = write_outputs(out, report)
    destroy_parallel()
    plot_training(out, {"AR pretraining": os.path.join(out, "run_ar", "metrics.jsonl"),
                        **{f"{label} (seed {seed})": os.path.join(out, run_dir_name(label, seed), "metrics.jsonl")
                           for label, seed, _ in models[1:]}})
    print(table)
    print(f"report: {os.path.join(out, 'report.json')} ({time.time() - t0:.0f} s in this call)")
    return 0


if __name__ == "__main__":
    from megatron_nbdiff.cli import run_main

    sys.exit(run_main(main))
