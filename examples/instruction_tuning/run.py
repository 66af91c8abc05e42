#!/usr/bin/env python
"""Instruction tuning of a small adapted model on CPU: accuracy on held-out instructions before
and after, with chat decoding (block decoding that stops at the end-of-turn token).

    python examples/instruction_tuning/run.py --out runs/instruct-cpu                # 2 CPU cores, ~40 min
    python examples/instruction_tuning/run.py --size tiny --out /tmp/instruct --fresh # smoke run (tests)

Stages:

1. Corpus and tokenizer: the recipe comparison's generated problems (``Q: 23+58= A: 81`` and
   ``copy: k f a q -> k f a q``, ``examples/recipe_comparison/run.py``), a byte-level BPE
   tokenizer with split digits, to which the ChatML special tokens ``<|im_start|>`` and
   ``<|im_end|>`` and a ChatML chat template are added before any model exists (so the vocabulary
   holds them; the pretraining text never uses them).
2. The quickstart's pipeline (``examples/quickstart/quickstart.py``): a tiny Llama pretrained with
   ``ar``, converted with an appended mask token, adapted with ``nbdiff`` (curriculum 1 -> B):
   the "adapted base", which has never seen a chat template.
3. Instruction data with checkable answers, written as prompt/response JSONL and preprocessed with
   ``--format chat`` (tokens and the loss mask: 1 on the answer and its ``<|im_end|>``):
   ``What is 23 plus 58?`` -> ``81`` and ``Repeat: k f a q`` -> ``k f a q``, a system message
   (``Answer briefly.``) on half of them. Additions use operand pairs the pretraining corpus
   also had (the recipe comparison leaves about 10% of pairs out of training); the held-out
   evaluation uses those left-out pairs, never seen in pretraining or tuning, and fresh copies.
4. Tuning from the adapted base with ``data.loss_mask: true`` and ``nbdiff`` at the fixed block B
   (``--rows loss_mask``), and the same with ``recipe.complementary: true`` (``--rows
   complementary``), at the same steps and batch (docs/method.md, "Instruction tuning").
5. Evaluation of the adapted base and each tuned model on the held-out instructions: the AR
   negative log-likelihood per token of the answer and its end-of-turn token given the rendered
   prompt (``response NLL``), and the accuracy of chat decoding
   (:func:`megatron_nbdiff.inference.chat.generate_chat`: the answer is right when the decoded
   turn, stripped, equals it) with its tokens per forward and the share of turns that ended with
   the end-of-turn token.

``report.json`` (settings, data counts, every model's numbers and a sample) and ``report.md`` (the
table) are written atomically under ``--out``. ``--out`` must be empty or absent (``--fresh``
deletes it first).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.fileio import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart", "quickstart.py")
COMPARISON = os.path.join(ROOT, "examples", "recipe_comparison", "run.py")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = "Answer briefly."
TASKS = ("addition", "copy")
MAX_NEW_TOKENS = 16

SIZES = {
    # 1.8M parameters; 38 minutes on two shared CPU cores (2026-12-03): pretraining 13 min,
    # adaptation 4, tuning 7 (loss mask) and 12 (complementary: the 3L forward), evaluation 15 s
    "cpu": dict(model=dict(hidden_size=192, num_layers=4, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=512, max_seq_len=256),
                vocab=768, seq=128, micro=16, batch=32, pretrain=1200, adapt=200, tune=300, block=8,
                problems=24000, instructions=6000, eval_problems=100, pretrain_lr=2e-3, adapt_lr=5e-4,
                tune_lr=5e-4, decodings={"block, threshold 0.9": dict(mode="block", threshold=0.9),
                                         "ar": dict(mode="ar")}),
    # smoke run (tests, about 30 s): the tuned models must beat the adapted base on the held-out
    # answers' NLL and end their turns; 0.12M parameters learn neither addition nor copying here
    "tiny": dict(model=dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, max_seq_len=128),
                 vocab=512, seq=64, micro=8, batch=8, pretrain=250, adapt=30, tune=100, block=4,
                 problems=2000, instructions=800, eval_problems=12, pretrain_lr=3e-3, adapt_lr=1e-3,
                 tune_lr=1e-3, decodings={"block, threshold 0.9": dict(mode="block", threshold=0.9)}),
}
ROWS = {
    "loss_mask": ("tuned (loss mask)", {}),
    "complementary": ("tuned (loss mask, complementary)", dict(complementary=True)),
}


def load_script(path: str, name: str):
    """Another example script as a module, loaded from its file: examples are scripts, not an
    importable package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instruction(task: str, rng: random.Random, comparison, held_out: bool) -> tuple[str, str]:
    """One ``(user message, answer)``: additions of pairs the pretraining saw (``held_out``: of the
    pairs it never saw), copies of fresh random letters."""
    if task == "addition":
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if comparison.held_out_pair(a, b) == held_out:
                return f"What is {a} plus {b}?", str(a + b)
    words = comparison.copy_words(rng)
    return f"Repeat: {words}", words


def instructions(n: int, seed: int, comparison) -> list[dict]:
    """``n`` prompt/response records, tasks alternating, a system message on every other pair."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a = instruction(TASKS[i % len(TASKS)], rng, comparison, held_out=False)
        rec = dict(prompt=q, response=a)
        if (i // len(TASKS)) % 2:
            rec["system"] = SYSTEM
        out.append(rec)
    return out


def eval_problems(n: int, seed: int, comparison) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(seed + 7)
    return {t: [instruction(t, rng, comparison, held_out=True) for _ in range(n)] for t in TASKS}


def make_tokenizer(docs: list[str], vocab: int, out_dir: str) -> str:
    """BPE with split digits, plus the ChatML special tokens and template."""
    from transformers import AutoTokenizer

    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(docs, vocab, out_dir, split_digits=True)
    hf = AutoTokenizer.from_pretrained(out_dir)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return out_dir


def tune(name: str, init_from: str, save_dir: str, prefix: str, tok_dir: str, recipe: dict, S: dict,
         seed: int) -> str:
    """Instruction tuning: the quickstart's training call with ``data.loss_mask: true``."""
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.checkpointing import resolve_checkpoint
    from megatron_nbdiff.training.trainer import Trainer

    cfg = RunConfig.from_dict(dict(
        recipe=recipe,
        data=dict(train=[prefix], tokenizer=tok_dir, split="98,2,0", loss_mask=True),
        train=dict(steps=S["tune"], micro_batch_size=S["micro"], global_batch_size=S["batch"], seq_len=S["seq"],
                   lr=S["tune_lr"], min_lr=S["tune_lr"] / 10, warmup_steps=max(S["tune"] // 10, 1),
                   log_interval=max(S["tune"] // 10, 1), dtype="fp32", seed=seed),
        checkpoint=dict(init_from=init_from, save_dir=save_dir, save_interval=0),
    ))
    t0 = time.time()
    code = Trainer(cfg).run()
    if code != 0:
        raise SystemExit(f"{name} training stopped with exit code {code}")
    log(f"{name}: {S['tune']} steps in {time.time() - t0:.0f} s")
    return resolve_checkpoint(save_dir)


def log(msg: str) -> None:
    print(f"[instruction tuning {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def response_nll(runner, template, problems) -> float:
    """AR negative log-likelihood per token of ``answer + <|im_end|>`` given the rendered prompt
    (softmax over the runner's whole vocabulary), over all problems."""
    import torch
    from tqdm import tqdm

    from megatron_nbdiff.inference.chat import user_conversation

    eot = template.end_of_turn_ids[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for q, a in tqdm(problems, desc="response NLL", leave=False):
            prompt = template.prompt_ids(user_conversation(q))
            target = list(runner.tokenizer.encode(a)) + [eot]
            logits = runner.prefill([prompt])[:, None]
            if len(target) > 1:
                more = runner.commit(torch.tensor([target[:-1]], dtype=torch.long, device=runner.device))
                logits = torch.cat([logits, more], 1)
            logp = torch.log_softmax(logits[0].float(), -1)
            total -= float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
            count += len(target)
    return total / count


def evaluate(ckpt: str, problems: dict, decodings: dict) -> dict:
    """Response NLL and chat-decoding accuracy of the checkpoint ``ckpt`` (module docstring)."""
    from tqdm import tqdm

    from megatron_nbdiff.inference import load_runner
    from megatron_nbdiff.inference.chat import ChatTemplate, generate_chat

    runner = load_runner(ckpt)
    template = ChatTemplate.of(runner)
    row = dict(response_nll={t: response_nll(runner, template, problems[t]) for t in TASKS}, decoding={})
    for how, kw in decodings.items():
        row["decoding"][how] = {}
        for t in TASKS:
            outs = []
            for i in tqdm(range(0, len(problems[t]), 32), desc=f"{t}, {how}", leave=False):
                outs += generate_chat(runner, [q for q, _ in problems[t][i:i + 32]], template=template,
                                      max_new_tokens=MAX_NEW_TOKENS, **kw)
            correct = [int(o["text"].strip() == a) for (_, a), o in zip(problems[t], outs)]
            tokens = sum(o["stats"]["tokens"] for o in outs)
            passes = sum(o["stats"]["forward_passes"] for o in outs)
            row["decoding"][how][t] = dict(
                accuracy=sum(correct) / len(correct), correct=correct, tokens_per_forward=tokens / passes,
                ended=sum(o["stopped"] for o in outs) / len(outs),
                sample=dict(prompt=problems[t][0][0], answer=problems[t][0][1], output=outs[0]["text"]))
    return row


def render(report: dict) -> str:
    """report.md: one row per model."""
    hows = list(report["settings"]["decodings"])
    head = ["model"] + [f"response NLL ({t})" for t in TASKS]
    for how in hows:
        head += [f"{t} accuracy ({how})" for t in TASKS] + [f"tokens/forward ({how})", f"turns ended ({how})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in report["results"].items():
        cells = [label] + [f"{r['response_nll'][t]:.3f}" for t in TASKS]
        for how in hows:
            d = r["decoding"][how]
            toks = sum(d[t]["tokens_per_forward"] for t in TASKS) / len(TASKS)
            ended = sum(d[t]["ended"] for t in TASKS) / len(TASKS)
            cells += [f"{d[t]['accuracy']:.3f}" for t in TASKS] + [f"{toks:.2f}", f"{ended:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = report["settings"]["eval_problems"]
    lines += ["", f"{n} held-out instructions per task (additions of operand pairs never trained on; copies of "
              f"fresh letters); {report['instruction_data']['documents']} tuning conversations, "
              f"{report['instruction_data']['loss_tokens']} of {report['instruction_data']['tokens']} tokens "
              "carry loss; tokens/forward and turns ended (share of answers closed by <|im_end|>) are the "
              "means over the tasks."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated tuning runs among {','.join(ROWS)}")
    p.add_argument("--tune-steps", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows or any(r not in ROWS for r in rows) or len(set(rows)) != len(rows):
        raise ConfigError(f"--rows: expected distinct names among {','.join(ROWS)}, found {args.rows!r}")
    S = dict(SIZES[args.size])
    if args.tune_steps is not None:
        if args.tune_steps < 1:
            raise ConfigError(f"--tune-steps must be >= 1, found {args.tune_steps}")
        S["tune"] = args.tune_steps
    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"--out {out} is not empty; use another folder or pass --fresh")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    import torch

    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_nbdiff.data import Tokenizer
    from megatron_nbdiff.data.preprocess import preprocess
    from megatron_nbdiff.parallel import destroy_parallel

    qs = load_script(QUICKSTART, "nbdiff_quickstart")
    cmp = load_script(COMPARISON, "nbdiff_recipe_comparison")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    log(f"size {args.size} on {device}; rows {','.join(rows)}; folder {out}")
    seconds = {}

    t = time.time()
    docs = cmp.corpus(S["problems"], args.seed)
    qs.write_jsonl(os.path.join(out, "pretrain.jsonl"), docs)
    tok_dir = make_tokenizer(docs, S["vocab"], os.path.join(out, "tokenizer"))
    prefix = os.path.join(out, "data", "pretrain")
    preprocess(os.path.join(out, "pretrain.jsonl"), tok_dir, prefix, quiet=True)
    seconds["data"] = time.time() - t

    t = time.time()
    common = dict(seq=S["seq"], micro_batch=S["micro"], global_batch=S["batch"], dtype="fp32")
    qs.make_hf_init(os.path.join(out, "hf_init"), Tokenizer(tok_dir).vocab_size, tok_dir, model=S["model"])
    convert_hf_to_megatron(os.path.join(out, "hf_init"), os.path.join(out, "meg_init"), mask_token="none",
                           progress=False)
    ar = qs.train("ar", os.path.join(out, "meg_init"), os.path.join(out, "run_ar"), prefix, tok_dir,
                  dict(name="ar"), S["pretrain"], S["pretrain_lr"], seed=args.seed, **common)
    convert_megatron_to_hf(ar, os.path.join(out, "hf_base"), progress=False)
    convert_hf_to_megatron(os.path.join(out, "hf_base"), os.path.join(out, "meg_base"), mask_token="append",
                           progress=False)
    B = S["block"]
    adapted = qs.train("nbdiff", os.path.join(out, "meg_base"), os.path.join(out, "run_adapt"), prefix, tok_dir,
                       dict(name="nbdiff", block_max=B, block_interval=max(S["adapt"] // 8, 1)), S["adapt"],
                       S["adapt_lr"], seed=args.seed, **common)
    seconds["pretrain and adapt"] = time.time() - t

    t = time.time()
    records = instructions(S["instructions"], args.seed + 1, cmp)
    with open(os.path.join(out, "instructions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    chat_prefix = os.path.join(out, "data", "instructions")
    chat = preprocess(os.path.join(out, "instructions.jsonl"), tok_dir, chat_prefix, fmt="chat", quiet=True)
    problems = eval_problems(S["eval_problems"], args.seed, cmp)
    seconds["instruction data"] = time.time() - t
    log(f"instruction data: {chat['documents']} conversations, {chat['tokens']} tokens, "
        f"{chat['loss_tokens']} with loss")

    settings = {k: v for k, v in S.items()}
    report = dict(size=args.size, device=device, seed=args.seed, rows=rows, settings=settings,
                  instruction_data=dict(documents=chat["documents"], tokens=chat["tokens"],
                                        loss_tokens=chat["loss_tokens"]),
                  results={}, seconds=seconds)
    models = [("adapted base (untuned)", adapted)]
    for r in rows:
        label, extra = ROWS[r]
        t = time.time()
        ck = tune(label, adapted, os.path.join(out, f"run_{r}"), chat_prefix, tok_dir,
                  dict(name="nbdiff", block_size=B, **extra), S, seed=1000 + args.seed)
        seconds[f"tune {r}"] = time.time() - t
        models.append((label, ck))
    for label, ck in models:
        t = time.time()
        row = evaluate(ck, problems, S["decodings"])
        seconds[f"evaluate {label}"] = time.time() - t
        report["results"][label] = row
        summary = "; ".join(f"{how}: " + ", ".join(f"{t} {d[t]['accuracy']:.3f}" for t in TASKS)
                            for how, d in row["decoding"].items())
        log(f"{label}: response NLL " + ", ".join(f"{t} {row['response_nll'][t]:.3f}" for t in TASKS)
            + f"; accuracy {summary}")
    destroy_parallel()
    report["seconds"]["total"] = time.time() - t_start
    atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    text = render(report)
    atomic_write(os.path.join(out, "report.md"), text)
    print()
    print(text)
    print(f"report: {os.path.join(out, 'report.json')} ({report['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    from megatron_nbdiff.cli import run_main

    sys.exit(run_main(main))
