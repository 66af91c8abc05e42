#!/usr/bin/env python
"""Recipe comparison at small scale: one AR base, four adaptations at the same token budget,
evaluated the same way.

    python examples/recipe_comparison/run.py --out runs/comparison            # one GPU, ~25M model
    python examples/recipe_comparison/run.py --size tiny --out /tmp/cmp       # CPU smoke run

Corpus (generated, checkable): two-digit additions (``Q: 23+58= A: 81``) and copy problems
(``copy: k f a q -> k f a q``) mixed with the Python standard library's docstrings (see the
quickstart). Additions test whether the adapted model still computes what the AR base learnt
(the answer depends on the whole prompt, and its digits on each other); copies are easy to
predict in parallel once the prompt is seen, which is what block decoding exploits; the text
keeps it a language model. Held-out additions use operand pairs never seen in training.

Stages: a Llama is pretrained from random weights with ``ar``; converted with an appended mask
token; adapted with ``diffullama`` (annealing over half the steps), ``transplant`` (fixed block
B, lambda 0), ``nbdiff`` without curriculum (fixed block B, lambda 0.5) and full ``nbdiff``
(curriculum 1 -> B), each for the same steps x batch x sequence (equal training tokens); then
every model is evaluated: held-out AR loss and block-diffusion NLL bound at B on text, addition
accuracy with the model's native decoding (AR for the base, block decoding at thresholds 0.9
and 0.5 for dual-stream recipes, full-sequence decoding for diffullama) and its tokens per
forward. Writes ``report.json``, ``comparison.md`` and ``comparison.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "examples", "quickstart"))

SIZES = {
    # ~25M parameters with a 2048-token vocabulary
    "small": dict(model=dict(hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4,
                             ffn_hidden_size=1536, max_seq_len=512),
                  vocab=2048, seq=256, micro=32, batch=64, pretrain=2000, adapt=600, block=16,
                  problems=60000, eval_problems=300, dtype="auto"),
    "tiny": dict(model=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, max_seq_len=128),
                 vocab=512, seq=64, micro=8, batch=8, pretrain=30, adapt=12, block=8,
                 problems=2000, eval_problems=12, dtype="fp32"),
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def held_out_pair(a: int, b: int) -> bool:
    return (a * 131 + b * 71) % 10 == 0  # 10% of operand pairs never appear in training


def corpus(n: int, seed: int) -> list[str]:
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
                w = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
                lines.append(f"copy: {w} -> {w}")
        docs.append("\n".join(lines))
    return docs


def eval_problems(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed + 1)
    out = []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if held_out_pair(a, b):
            out.append((f"Q: {a}+{b}= A:", a + b))
    return out


def accuracy(runner, problems, tok, **decode) -> dict:
    from megatron_nbdiff.inference import generate

    prompts = [tok.encode(q) for q, _ in problems]
    outs = generate(runner, prompts, max_new_tokens=8, stop_at_eos=False, **decode)
    right = 0
    for (q, ans), o in zip(problems, outs):
        m = re.match(r"\s*(\d+)", o.get("text", ""))
        right += int(bool(m) and int(m.group(1)) == ans)
    toks = sum(o["stats"]["tokens"] for o in outs)
    passes = sum(o["stats"]["forward_passes"] for o in outs)
    return dict(accuracy=right / len(problems), tokens_per_forward=toks / passes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--adapt-steps", type=int, default=None)
    args = p.parse_args(argv)
    S = dict(SIZES[args.size])
    S["pretrain"] = args.pretrain_steps or S["pretrain"]
    S["adapt"] = args.adapt_steps or S["adapt"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    import quickstart as qs
    from megatron_nbdiff.checkpoint import convert_hf_to_megatron
    from megatron_nbdiff.data import Tokenizer
    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.evaluation.metrics import heldout_losses, load_sequences
    from megatron_nbdiff.inference import load_runner
    from megatron_nbdiff.parallel import destroy_parallel
    from preprocess_data import preprocess

    docs_text, held_text = qs.split(qs.stdlib_docs())
    docs = corpus(S["problems"], args.seed) + docs_text
    random.Random(args.seed).shuffle(docs)
    qs.write_jsonl(os.path.join(out, "train.jsonl"), docs)
    qs.write_jsonl(os.path.join(out, "heldout.jsonl"), held_text)
    tok_dir = train_bpe_tokenizer(docs, S["vocab"], os.path.join(out, "tokenizer"))
    tok = Tokenizer(tok_dir)
    prefix = os.path.join(out, "data", "train")
    stats = preprocess(os.path.join(out, "train.jsonl"), tok_dir, prefix, quiet=True)
    qs.log(f"corpus: {len(docs)} documents, {stats['tokens']} tokens")

    common = dict(seq=S["seq"], micro_batch=S["micro"], global_batch=S["batch"], dtype=S["dtype"])
    qs.make_hf_init(os.path.join(out, "hf_init"), tok.vocab_size, tok_dir, model=S["model"])
    convert_hf_to_megatron(os.path.join(out, "hf_init"), os.path.join(out, "meg_init"), mask_token="none", progress=False)
    base_run = qs.train("ar", os.path.join(out, "meg_init"), os.path.join(out, "run_ar"), prefix, tok_dir,
                        dict(name="ar"), S["pretrain"], 1e-3, **common)
    from megatron_nbdiff.checkpoint import convert_megatron_to_hf

    convert_megatron_to_hf(base_run, os.path.join(out, "hf_base"), progress=False)
    base = os.path.join(out, "meg_base")
    convert_hf_to_megatron(os.path.join(out, "hf_base"), base, mask_token="append", progress=False)

    B = S["block"]
    recipes = {
        "diffullama": dict(name="diffullama", anneal_steps=max(S["adapt"] // 2, 1)),
        "transplant": dict(name="transplant", block_size=B),
        "nbdiff (no curriculum)": dict(name="nbdiff", block_size=B),
        "nbdiff": dict(name="nbdiff", block_max=B, block_interval=max(S["adapt"] // 8, 1)),
    }
    ckpts = {"AR base": base}
    for label, recipe in recipes.items():
        run_dir = os.path.join(out, "run_" + re.sub(r"[^a-z]+", "_", label).strip("_"))
        ckpts[label] = qs.train(label, base, run_dir, prefix, tok_dir, recipe, S["adapt"], 3e-4, **common)
    budget = S["adapt"] * S["batch"] * S["seq"]

    problems = eval_problems(S["eval_problems"], args.seed)
    seqs = load_sequences(os.path.join(out, "heldout.jsonl"), tokenizer=tok, seq_length=S["seq"],
                          max_sequences=64)
    results = {}
    for label, ck in ckpts.items():
        runner = load_runner(ck)
        losses = heldout_losses(runner, seqs, block_sizes=[B])
        row = dict(ar_loss=losses["ar"]["loss"], nll_bound=losses["block"][str(B)]["nll_bound"],
                   single_stream_loss=losses.get("single_stream", {}).get("diffusion_loss"))
        if label == "AR base":
            row["decoding"] = {"ar": accuracy(runner, problems, tok, mode="ar")}
        elif label == "diffullama":
            row["decoding"] = {"full, 8 steps": accuracy(runner, problems, tok, mode="full", steps=8),
                               "full, 4 steps": accuracy(runner, problems, tok, mode="full", steps=4)}
        else:
            row["decoding"] = {f"block, threshold {th}": accuracy(runner, problems, tok, mode="block", block_size=B,
                                                                  threshold=th) for th in (0.9, 0.5)}
        results[label] = row
        qs.log(f"{label}: {row}")
        del runner
    destroy_parallel()

    report = dict(size=args.size, model=S["model"], block_size=B, seed=args.seed,
                  pretrain_tokens=S["pretrain"] * S["batch"] * S["seq"], adapt_tokens_per_recipe=budget,
                  eval_problems=len(problems), heldout_sequences=len(seqs), results=results,
                  seconds=time.time() - t0)
    tmp = os.path.join(out, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out, "report.json"))
    lines = [f"| model | held-out AR loss | block NLL bound (B={B}) | single-stream loss | decoding | "
             "addition accuracy | tokens/forward |", "|---|---|---|---|---|---|---|"]
    for label, row in results.items():
        ss = "-" if row["single_stream_loss"] is None else f"{row['single_stream_loss']:.3f}"
        for how, d in row["decoding"].items():
            lines.append(f"| {label} | {row['ar_loss']:.3f} | {row['nll_bound']:.3f} | {ss} | {how} | "
                         f"{d['accuracy']:.3f} | {d['tokens_per_forward']:.2f} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in results.items():
        xs = [d["tokens_per_forward"] for d in row["decoding"].values()]
        ys = [d["accuracy"] for d in row["decoding"].values()]
        ax.plot(xs, ys, "o-", label=label)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("held-out addition accuracy")
    ax.set_title(f"recipe comparison ({args.size}, {budget:,} adaptation tokens each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "comparison.png"), dpi=110)
    plt.close(fig)
    print(table)
    print(f"report: {os.path.join(out, 'report.json')} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
