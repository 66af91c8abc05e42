#!/usr/bin/env python
"""The whole pipeline on an embedded default, on a laptop-class CPU (``make quickstart``).

1. Corpus: the docstrings of about 70 Python standard-library modules (Python Software
   Foundation License; every Python install has them), split into train and held-out documents,
   a byte-level BPE tokenizer trained on them, tokenised with
   :func:`megatron_nbdiff.data.preprocess.preprocess` (``tools/preprocess_data.py``).
2. A tiny Llama (random init, saved as an HF checkpoint, converted without a mask token) trained
   with the ``ar`` recipe, then exported to HF: the "AR base model".
3. HF -> Megatron conversion of the base with an appended mask token.
4. NBDiff adaptation with a compressed curriculum (block 1 -> 2 -> 4 -> 8).
5. Evaluation of the AR base and the adapted model on held-out text (AR loss, diffusion loss at
   block 8: cross-entropy per masked token, through ``megatron_nbdiff.evaluation``), block
   decoding of held-out and Zen prompts with statistics, AR decoding for comparison.
6. Export of the adapted model to HF and decoding of the export with ``tools/generate.py``.
7. A summary table on the console, ``summary.json`` and PNG plots in the work folder.

    python examples/quickstart/quickstart.py [--workdir runs/quickstart] [--fast]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STDLIB_MODULES = sorted("""
abc argparse ast asyncio base64 bisect calendar cmd code codecs collections colorsys configparser
contextlib copy csv dataclasses datetime decimal difflib dis email enum fileinput fnmatch fractions
ftplib functools getopt gettext glob gzip hashlib heapq hmac html http imaplib inspect io ipaddress
json logging lzma mailbox mimetypes numbers operator optparse os pathlib pickle pkgutil platform
plistlib poplib pprint queue random re reprlib sched secrets selectors shelve shlex shutil smtplib
socket socketserver statistics string struct subprocess tarfile tempfile textwrap threading
timeit tokenize trace traceback types typing unittest urllib uuid warnings weakref zipfile
""".split())

MODEL = dict(hidden_size=128, num_layers=4, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=384, max_seq_len=256)
SEQ = 128
BLOCK = 8
# --fast: the fewest steps (measured) after which the adapted model still commits several tokens
# per pass on the Zen prompts at threshold 0.7 (100 + 100 steps: 1.11 tokens per forward;
# 150 + 150: 1.54), so that tests/test_quickstart.py can check what the pipeline is for
FAST_STEPS = (150, 150)


def log(msg: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stdlib_docs() -> list[str]:
    """Docstrings (module, classes, functions) of STDLIB_MODULES, de-duplicated, >= 80 chars."""
    seen, docs = set(), []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            if getattr(obj, "__module__", name) not in (name, None) and obj is not mod:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
            if inspect.isclass(obj):
                for _, meth in sorted(vars(obj).items()):
                    d = inspect.getdoc(meth) if inspect.isfunction(meth) else None
                    if d and len(d) >= 80 and d not in seen:
                        seen.add(d)
                        docs.append(d)
    return docs


def zen_of_python() -> str:
    """The Zen of Python, read from the source of the standard library's ``this`` module (which
    prints it when imported, so it is parsed, not imported)."""
    import ast
    import codecs
    import importlib.util

    origin = importlib.util.find_spec("this").origin
    tree = ast.parse(open(origin, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "s" for t in node.targets):
            return codecs.decode(ast.literal_eval(node.value), "rot_13")
    raise SystemExit(f"{origin}: no Zen of Python found")


ZEN_COPIES = 200


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """Held-out: documents whose CRC32 falls in the last 5% (stable across runs)."""
    train, held = [], []
    for d in docs:
        (held if zlib.crc32(d.encode()) % 100 >= 95 else train).append(d)
    return train, held


def write_jsonl(path: str, docs: list[str]) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def make_hf_init(directory: str, vocab: int, tokenizer_dir: str, model: Optional[dict] = None) -> None:
    """A randomly initialised HF Llama of shape ``model`` (default: the quickstart's), with the
    tokenizer files beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    MODEL = model or globals()["MODEL"]  # noqa: N806 - the module default's name

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=MODEL["hidden_size"],
                      intermediate_size=MODEL["ffn_hidden_size"], num_hidden_layers=MODEL["num_layers"],
                      num_attention_heads=MODEL["num_attention_heads"],
                      num_key_value_heads=MODEL["num_query_groups"],
                      max_position_embeddings=MODEL["max_seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)


def train(name: str, init_from: str, save_dir: str, data_prefix: str, tokenizer: str, recipe: dict,
          steps: int, lr: float, seq: int = SEQ, micro_batch: int = 8, global_batch: int = 16,
          dtype: str = "fp32", seed: int = 1234) -> str:
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    cfg = RunConfig.from_dict(dict(
        recipe=recipe,
        data=dict(train=[data_prefix], tokenizer=tokenizer, split="98,2,0"),
        train=dict(steps=steps, micro_batch_size=micro_batch, global_batch_size=global_batch, seq_len=seq, lr=lr,
                   min_lr=lr / 10, warmup_steps=20, log_interval=25, dtype=dtype, seed=seed),
        checkpoint=dict(init_from=init_from, save_dir=save_dir, save_interval=0),
    ))
    t0 = time.time()
    code = Trainer(cfg).run()
    if code != 0:
        raise SystemExit(f"{name} training stopped with exit code {code}")
    log(f"{name}: {steps} steps in {time.time() - t0:.0f} s")
    from megatron_nbdiff.training.checkpointing import resolve_checkpoint

    return resolve_checkpoint(save_dir)


def evaluate(ckpt: str, sequences, block: int) -> dict:
    """Held-out AR loss and diffusion loss at ``block`` (cross-entropy per masked token, seeded
    noise) through :func:`megatron_nbdiff.evaluation.metrics.heldout_losses`."""
    from megatron_nbdiff.evaluation.metrics import heldout_losses
    from megatron_nbdiff.inference import load_runner

    losses = heldout_losses(load_runner(ckpt), sequences, block_sizes=[block], seed=7)
    return dict(ar_loss=losses["ar"]["loss"], diffusion_loss=losses["block"][str(block)]["masked_ce"])


def plot_losses(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_nbdiff.fileio import save_figure

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for name, metrics_path in runs.items():
        rows = [json.loads(line) for line in open(metrics_path)]
        train = [r for r in rows if "loss" in r and "eval_loss" not in r]
        label = "ar: AR loss" if name == "ar" else "nbdiff: L_diff + 0.5 L_AR"
        ax.plot([offset + r["step"] for r in train], [r["loss"] for r in train], label=label)
        if name != "ar":
            ax2 = ax.twinx()
            ax2.step([offset + r["step"] for r in train], [r["block_size"] for r in train], "k:", where="post",
                     label="block size")
            ax2.set_ylabel("block size (dotted)")
        offset += max(r["step"] for r in train) + 1
    ax.set_xlabel("step (AR pretraining, then NBDiff adaptation)")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("quickstart: AR base, then NBDiff adaptation")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quickstart"))
    p.add_argument("--ar-steps", type=int, default=500)
    p.add_argument("--nbdiff-steps", type=int, default=300)
    p.add_argument("--fast", action="store_true",
                   help=f"{FAST_STEPS[0]} AR and {FAST_STEPS[1]} NBDiff steps (tests; about 3 minutes on 2 cores)")
    args = p.parse_args(argv)
    if args.fast:
        args.ar_steps, args.nbdiff_steps = FAST_STEPS
    t_start = time.time()
    w = os.path.abspath(args.workdir)
    if os.path.isdir(w):
        shutil.rmtree(w)
    os.makedirs(w)

    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.data.preprocess import preprocess
    from megatron_nbdiff.fileio import atomic_write

    log("1. corpus: docstrings of the Python standard library (PSF License)")
    docs = stdlib_docs()
    train_docs, held = split(docs)
    # a text the model can learn by heart: where the continuation is certain, block decoding
    # commits several tokens per pass; on unfamiliar text it degrades to about one
    zen = zen_of_python()
    train_docs += [zen] * ZEN_COPIES
    write_jsonl(os.path.join(w, "train.jsonl"), train_docs)
    tok_dir = train_bpe_tokenizer(train_docs, 1024, os.path.join(w, "tokenizer"))
    stats = preprocess(os.path.join(w, "train.jsonl"), tok_dir, os.path.join(w, "data", "train"), quiet=True)
    log(f"   {len(train_docs)} train / {len(held)} held-out documents, {stats.get('tokens', '?')} tokens")

    log("2. tiny Llama, AR pretraining with the 'ar' recipe")
    from megatron_nbdiff.data import Tokenizer

    vocab = Tokenizer(tok_dir).vocab_size
    make_hf_init(os.path.join(w, "hf_init"), vocab, tok_dir)
    convert_hf_to_megatron(os.path.join(w, "hf_init"), os.path.join(w, "meg_init"), mask_token="none", progress=False)
    ar_ckpt = train("ar", os.path.join(w, "meg_init"), os.path.join(w, "run_ar"), os.path.join(w, "data", "train"),
                    tok_dir, dict(name="ar"), args.ar_steps, 3e-3)
    convert_megatron_to_hf(ar_ckpt, os.path.join(w, "hf_base"), progress=False)

    log("3. HF -> Megatron with an appended mask token")
    convert_hf_to_megatron(os.path.join(w, "hf_base"), os.path.join(w, "meg_base"), mask_token="append", progress=False)

    log("4. NBDiff adaptation, curriculum 1 -> 2 -> 4 -> 8")
    interval = max(args.nbdiff_steps // 10, 1)  # block 8 from 30% of the run on
    nb_ckpt = train("nbdiff", os.path.join(w, "meg_base"), os.path.join(w, "run_nbdiff"),
                    os.path.join(w, "data", "train"), tok_dir,
                    dict(name="nbdiff", block_max=BLOCK, block_interval=interval), args.nbdiff_steps, 2e-3)

    log("5. evaluation on held-out text and block decoding")
    from megatron_nbdiff.evaluation.metrics import load_sequences

    write_jsonl(os.path.join(w, "heldout.jsonl"), held)
    sequences = load_sequences(os.path.join(w, "heldout.jsonl"), tokenizer=Tokenizer(tok_dir), seq_length=SEQ,
                               max_sequences=32)
    ev = {"AR base": evaluate(os.path.join(w, "meg_base"), sequences, BLOCK),
          "NBDiff adapted": evaluate(nb_ckpt, sequences, BLOCK)}
    from megatron_nbdiff.inference import generate, load_runner

    tok = Tokenizer(tok_dir)
    held_prompts = [tok.encode(d)[:24] for d in held[:6]]
    lines = [ln for ln in zen.splitlines() if len(ln) > 30]
    zen_prompts = [tok.encode(ln)[:6] for ln in lines[:6]]
    runner = load_runner(nb_ckpt)
    decode = {}
    for label, kw in (("block, threshold 0.9", dict(mode="block", threshold=0.9)),
                      ("block, threshold 0.7", dict(mode="block", threshold=0.7)),
                      ("ar", dict(mode="ar"))):
        row = {}
        for group, ps in (("held-out docstrings", held_prompts), ("Zen of Python (learnt by heart)", zen_prompts),
                          ("all prompts", held_prompts + zen_prompts)):
            outs = generate(runner, ps, max_new_tokens=48, stop_at_eos=False, **kw)
            toks = sum(o["stats"]["tokens"] for o in outs)
            passes = sum(o["stats"]["forward_passes"] for o in outs)
            row[group] = dict(tokens_per_forward=toks / passes, tokens_per_s=outs[0]["stats"]["tokens_per_s"],
                              sample=outs[0]["text"])
        decode[label] = row
    prompts = zen_prompts

    log("6. export the adapted model to HF and decode it with tools/generate.py")
    convert_megatron_to_hf(nb_ckpt, os.path.join(w, "hf_nbdiff"), progress=False)
    prompt_text = tok.decode(prompts[0])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--model",
                        os.path.join(w, "hf_nbdiff"), "--prompt", prompt_text, "--max-new-tokens", "48",
                        "--threshold", "0.9", "--stats"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"tools/generate.py failed:\n{r.stderr}")
    export_stats = r.stdout.strip().splitlines()[-1]

    log("7. summary")
    plot_losses({"ar": os.path.join(w, "run_ar", "metrics.jsonl"),
                 "nbdiff": os.path.join(w, "run_nbdiff", "metrics.jsonl")}, os.path.join(w, "loss_curves.png"))
    shutil.copy(os.path.join(w, "run_nbdiff", "block_size.png"), os.path.join(w, "block_size_schedule.png"))
    summary = dict(evaluation=ev, decoding=decode, export_decode=export_stats, block_size=BLOCK,
                   seconds=time.time() - t_start, workdir=w)
    atomic_write(os.path.join(w, "summary.json"), json.dumps(summary, indent=1))
    print()
    print(f"{'model':<16} {'held-out AR loss':>17} {f'diffusion loss (B={BLOCK})':>22}")
    for k, v in ev.items():
        print(f"{k:<16} {v['ar_loss']:>17.3f} {v['diffusion_loss']:>22.3f}")
    print()
    print(f"decoding of the adapted model (Megatron runner, block {BLOCK}, 48 new tokens): tokens per forward")
    groups = list(next(iter(decode.values())))
    print(f"{'':<22}" + "".join(f"{g:>34}" for g in groups))
    for k, row in decode.items():
        print(f"{k:<22}" + "".join(f"{row[g]['tokens_per_forward']:>34.2f}" for g in groups))
    print(f"\nexported HF model via tools/generate.py: {export_stats}")
    sample = decode["block, threshold 0.9"]["Zen of Python (learnt by heart)"]["sample"]
    print(f"sample (block, threshold 0.9): {prompt_text!r} -> {sample!r}")
    print(f"\nplots: {os.path.join(w, 'loss_curves.png')}, {os.path.join(w, 'block_size_schedule.png')}")
    print(f"total {time.time() - t_start:.0f} s; summary in {os.path.join(w, 'summary.json')}")
    return 0


if __name__ == "__main__":
    from megatron_nbdiff.cli import run_main

    sys.exit(run_main(main))
