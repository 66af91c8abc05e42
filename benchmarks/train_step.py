"""Training step time, tokens/s and MFU of the ``ar`` recipe against ``nbdiff`` at block 32,
measured in one run through the real training loop (data, noise, model, optimizer).

    python benchmarks/train_step.py                      # GPU: ~1B model, seq 4096, bf16
    python benchmarks/train_step.py --size tiny          # CPU: a small model, seq 128

The corpus is synthetic (uniform random token ids written as a megatron indexed dataset), which
does not change the cost of a step. Each recipe runs ``--steps`` steps; the first ``--warmup``
are discarded (compilation, allocator warm-up) and the median of the rest is reported. The
nbdiff step processes 2L tokens (``[x_t ; x_0]``); tokens/s counts both streams, and the
ratio that matters is nbdiff step time over AR step time (target <= 2.2) and nbdiff MFU over AR
MFU (target >= 0.9).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile

import torch

SIZES = {
    # ~1.1B parameters: 22 layers, hidden 2048, GQA 16/4 heads, SwiGLU 5632, vocab 32k
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_attention_heads=16,
               num_query_groups=4, ffn_hidden_size=5632, max_seq_len=4096),
    "tiny": dict(vocab_size=512, hidden_size=128, num_layers=2, num_attention_heads=4,
                 num_query_groups=2, ffn_hidden_size=256, max_seq_len=128),
}


def synthetic_corpus(prefix: str, vocab: int, tokens: int, eod: int) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    doc = 2048
    for _ in range(max(1, tokens // doc)):
        ids = rng.integers(4, vocab, size=doc)
        ids[-1] = eod
        builder.add_document(torch.from_numpy(ids), [doc])
    builder.finalize(prefix + ".idx")


def run_recipe(name: str, args, model: dict, prefix: str, tok_dir: str, out: str) -> list[dict]:
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    recipe = dict(name=name, mask_token_id=3)
    if name != "ar":
        recipe["block_size"] = args.block_size
    cfg = RunConfig.from_dict(dict(
        model=dict(model, attention_backend="flex" if torch.cuda.is_available() else "dense"),
        recipe=recipe,
        data=dict(train=[prefix], tokenizer=tok_dir, split="100,0,0"),
        train=dict(steps=args.steps, micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch,
                   seq_len=args.seq_len, warmup_steps=1, lr=1e-4, min_lr=1e-5),
        checkpoint=dict(save_dir=out),
    ))
    Trainer(cfg, quiet=True, stop_after=args.steps).run()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--seq-len", type=int, default=None, help="GPU 4096, CPU 128")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or (4096 if torch.cuda.is_available() else 128)
    model = SIZES[args.size]
    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.data.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = train_bpe_tokenizer(["a b c d e f g"] * 10, 300, os.path.join(tmp, "tok"))
        prefix = os.path.join(tmp, "synthetic")
        synthetic_corpus(prefix, model["vocab_size"], args.seq_len * args.micro_batch * (args.steps + 2) * 2,
                         Tokenizer(tok_dir).eod_id)
        rows = {}
        for name in ("ar", "nbdiff"):
            recs = run_recipe(name, args, model, prefix, tok_dir, os.path.join(tmp, name))[args.warmup:]
            rows[name] = dict(
                seconds=statistics.median(r["seconds"] for r in recs),
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in recs),
                mfu=statistics.median(r["mfu"] for r in recs) if recs[0]["mfu"] is not None else None,
                n=len(recs),
            )
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"# train step, {dev}, {datetime.date.today()}, model {args.size}, seq {args.seq_len}, "
          f"micro-batch {args.micro_batch}, nbdiff block {args.block_size}, median of {rows['ar']['n']} steps")
    print(f"{'recipe':<8} {'step ms':>9} {'tokens/s':>11} {'MFU':>7}")
    for name, r in rows.items():
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{name:<8} {r['seconds'] * 1e3:>9.1f} {r['tokens_per_s']:>11,.0f} {mfu:>7}")
    ratio = rows["nbdiff"]["seconds"] / rows["ar"]["seconds"]
    print(f"nbdiff / ar step time: {ratio:.2f} (target <= 2.2)")
    if rows["ar"]["mfu"]:
        print(f"nbdiff MFU / ar MFU: {rows['nbdiff']['mfu'] / rows['ar']['mfu']:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
