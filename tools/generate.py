#!/usr/bin/env python
"""Decode prompts with an exported HF model, a Megatron checkpoint or a training run folder.

    python tools/generate.py --model DIR --prompt "Once upon a time" [--stats]
    python tools/generate.py --model DIR --prompt-file prompts.jsonl > out.jsonl

``--prompt`` prints the generated text (``--stats``: forward passes, tokens per forward, tokens/s
on stderr-free extra lines). ``--prompt-file`` reads JSONL lines with a ``prompt`` field (text) or
``prompt_ids`` (token ids), optionally ``suffix``, and writes one JSON line per prompt with
``text``, ``token_ids`` and ``stats``. Exit codes: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported HF dir, Megatron checkpoint or run folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--prompt-file", help="JSONL with 'prompt' (text) or 'prompt_ids' per line")
    p.add_argument("--mode", choices=["block", "full", "ar"], default="block")
    p.add_argument("--block-size", type=int, default=None, help="default: the trained block size")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--sub-blocks", type=int, default=1)
    p.add_argument("--confidence", choices=["prob", "margin", "entropy"], default="prob")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="full mode: denoising passes")
    p.add_argument("--suffix", default=None, help="full mode: text after the span to fill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (--prompt-file)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix at every pass")
    p.add_argument("--stats", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import warnings

    from megatron_nbdiff.checkpoint.errors import CheckpointMetadataError
    from megatron_nbdiff.inference import DecodingError, generate, load_runner, read_prompt_file

    opts = dict(mode=args.mode, block_size=args.block_size, threshold=args.threshold,
                sub_blocks=args.sub_blocks, confidence=args.confidence,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                steps=args.steps, seed=args.seed)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        runner = load_runner(args.model, dtype=args.dtype, use_cache=not args.no_cache)
        if args.prompt is not None:
            out = generate(runner, [args.prompt], suffix=args.suffix, **opts)[0]
            print(out.get("text", " ".join(map(str, out["token_ids"]))))
            if args.stats:
                s = out["stats"]
                print(f"# forward passes {s['forward_passes']} (denoise {s['denoise_passes']}, commit "
                      f"{s['commit_passes']}), tokens {s['tokens']}, tokens/forward "
                      f"{s['tokens_per_forward']:.2f}, tokens/s {s['tokens_per_s']:.1f}")
            return 0
        rows = [row for _, row in read_prompt_file(args.prompt_file)]
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            suffixes = {json.dumps(r.get("suffix", args.suffix)) for r in chunk}
            groups = [chunk] if len(suffixes) == 1 else [[r] for r in chunk]
            for group in groups:
                prompts = [r["prompt_ids"] if "prompt_ids" in r else r["prompt"] for r in group]
                outs = generate(runner, prompts, suffix=group[0].get("suffix", args.suffix), **opts)
                for row, out in zip(group, outs):
                    rec = dict(row, **out)
                    print(json.dumps(rec), flush=True)
        return 0
    except (DecodingError, CheckpointMetadataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
