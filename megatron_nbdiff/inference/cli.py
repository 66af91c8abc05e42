"""The decoding command (``tools/generate.py``): decode prompts with an exported HF model, a
Megatron checkpoint or a training run folder (its newest complete checkpoint).

    python tools/generate.py --model DIR --prompt "Once upon a time" [--stats]
    python tools/generate.py --model DIR --prompt-file prompts.jsonl > out.jsonl
    python tools/generate.py --model DIR --chat [--system "Answer briefly."] --prompt "What is 23 plus 58?"

``--prompt`` prints the generated text (``--stats``: one more line with forward passes, tokens
per forward and tokens/s). ``--prompt-file`` reads JSONL lines with a ``prompt`` field (text) or
``prompt_ids`` (token ids), optionally ``suffix``, and writes one JSON line per prompt with
``text``, ``token_ids`` and ``stats``. Options, the prompt file and every prompt (in the
vocabulary, within the model's maximum length with ``--max-new-tokens``) are checked before
anything is decoded. HF weights are read from safetensors only; ``--allow-pickle`` lets a
directory that has only ``pytorch_model.bin`` load it (a pickle can run code: only for a file you
trust). Run through :func:`megatron_nbdiff.cli.run_main`: exit status 0 done, 2 bad input (one
``error:`` line), 1 a file-system error, 130 interrupted.

``--chat`` (instruction-tuned models): every prompt is a user message (``--system`` adds a system
message before it; a prompt-file line may carry its own ``system``), rendered with the
checkpoint tokenizer's chat template and its generation prompt; decoding stops at the template's
end-of-turn token or EOS, and the printed text leaves the stop token out (JSON lines add
``prompt_ids`` and ``stopped``). A tokenizer without a chat template is refused
(:mod:`megatron_nbdiff.inference.chat`).
"""
from __future__ import annotations

import argparse
import json
import warnings
from typing import Optional, Sequence

from ..cli import entry
from .runner import DecodingError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`DecodingError` (one ``error:`` line)."""

    def error(self, message):
        raise DecodingError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description=__doc__.split("\n\n")[0],
                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported HF dir, Megatron checkpoint or run folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--prompt-file", help="JSONL with 'prompt' (text) or 'prompt_ids' per line")
    p.add_argument("--mode", choices=["block", "full", "ar"], default="block")
    p.add_argument("--block-size", type=int, default=None, help="default: the trained block size")
    p.add_argument("--threshold", type=float, default=0.9, help="commit threshold in (0, 1]")
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
    p.add_argument("--allow-pickle", action="store_true",
                   help="let an HF directory without safetensors load its pytorch_model.bin (trusted files only)")
    p.add_argument("--stats", action="store_true")
    p.add_argument("--chat", action="store_true",
                   help="prompts are user messages rendered with the tokenizer's chat template; stop at end of turn")
    p.add_argument("--system", default=None, help="--chat: a system message before every prompt")
    return p


def _stats_line(s: dict) -> str:
    return (f"# forward passes {s['forward_passes']} (denoise {s['denoise_passes']}, commit "
            f"{s['commit_passes']}), tokens {s['tokens']}, tokens/forward "
            f"{s['tokens_per_forward']:.2f}, tokens/s {s['tokens_per_s']:.1f}")


def _batches(rows: list[dict], batch_size: int, default_suffix):
    """Groups of rows decoded together: ``batch_size`` rows, split when their suffixes differ."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        suffixes = {json.dumps(r.get("suffix", default_suffix)) for r in chunk}
        yield from ([chunk] if len(suffixes) == 1 else [[r] for r in chunk])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/generate.py`` (module docstring)."""
    args = parser().parse_args(argv)
    from .. import compat
    from .api import check_mode, generate, load_runner, prepare_prompts, read_prompt_file
    from .decode import DecodeOptions

    if args.batch_size < 1:
        raise DecodingError(f"--batch-size must be >= 1, found {args.batch_size}")
    opts = dict(mode=args.mode, block_size=args.block_size, threshold=args.threshold,
                sub_blocks=args.sub_blocks, confidence=args.confidence,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                steps=args.steps, seed=args.seed)
    checked = DecodeOptions(suffix=args.suffix, **opts)
    checked.validate()
    if args.system is not None and not args.chat:
        raise DecodingError("--system applies to --chat only")
    if args.chat and args.suffix is not None:
        raise DecodingError("--chat generates the assistant turn after the prompt; --suffix (infilling) does not apply")
    numbered = read_prompt_file(args.prompt_file) if args.prompt_file is not None else None
    if args.chat and numbered is not None:
        _check_chat_rows(args.prompt_file, numbered)
    compat.install_safe_loading()
    runner = load_runner(args.model, dtype=args.dtype, use_cache=not args.no_cache,
                         allow_pickle=args.allow_pickle)
    shown = warnings.formatwarning
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        if args.chat:
            return _chat(args, runner, numbered, opts)
        if numbered is None:
            out = generate(runner, [args.prompt], suffix=args.suffix, **opts)[0]
            print(out.get("text", " ".join(map(str, out["token_ids"]))))
            if args.stats:
                print(_stats_line(out["stats"]))
            return 0
        rows = [row for _, row in numbered]
        check_mode(runner.info, args.mode)
        for n, row in numbered:  # every prompt checked before the first line is written
            label = f"{args.prompt_file} line {n}"
            suffix = row.get("suffix", args.suffix)
            if suffix is not None:
                DecodeOptions(suffix=suffix, **opts).validate()
            prepare_prompts(runner, [row["prompt_ids"] if "prompt_ids" in row else row["prompt"]],
                            suffix, checked, labels=[label])
        for group in _batches(rows, args.batch_size, args.suffix):
            prompts = [r["prompt_ids"] if "prompt_ids" in r else r["prompt"] for r in group]
            outs = generate(runner, prompts, suffix=group[0].get("suffix", args.suffix), **opts)
            for row, out in zip(group, outs):
                print(json.dumps(dict(row, **out)), flush=True)
        return 0
    finally:
        warnings.formatwarning = shown


def _check_chat_rows(path: str, numbered: list) -> None:
    """Every line of a ``--chat`` prompt file has a text ``prompt`` and at most a text ``system``."""
    for n, row in numbered:
        if not isinstance(row.get("prompt"), str):
            found = "prompt_ids" if "prompt_ids" in row else f"prompt of type {type(row.get('prompt')).__name__}"
            raise DecodingError(f"{path} line {n}: --chat needs a text 'prompt' (the user message), found {found}")
        if "suffix" in row:
            raise DecodingError(f"{path} line {n}: 'suffix' (infilling) does not apply to --chat")
        if "system" in row and not isinstance(row["system"], str):
            raise DecodingError(f"{path} line {n}: field 'system' must be a string, found "
                                f"{type(row['system']).__name__}")


def _chat(args, runner, numbered, opts: dict) -> int:
    """``--chat``: render, check every prompt, then decode (module docstring)."""
    from .api import check_mode, prepare_prompts
    from .chat import ChatTemplate, generate_chat, user_conversation
    from .decode import DecodeOptions

    check_mode(runner.info, args.mode)
    template = ChatTemplate.of(runner)
    if numbered is None:
        out = generate_chat(runner, [args.prompt], system=args.system, template=template, **opts)[0]
        print(out["text"])
        if args.stats:
            print(_stats_line(out["stats"]))
        return 0
    rows = []
    for n, row in numbered:  # every prompt checked before the first line is written
        label = f"{args.prompt_file} line {n}"
        messages = user_conversation(row["prompt"], row.get("system", args.system))
        ids = template.prompt_ids(messages, where=label)
        prepare_prompts(runner, [ids], None, DecodeOptions(**opts), labels=[label])
        rows.append((row, messages))
    for start in range(0, len(rows), args.batch_size):
        group = rows[start:start + args.batch_size]
        outs = generate_chat(runner, [m for _, m in group], template=template, **opts)
        for (row, _), out in zip(group, outs):
            print(json.dumps(dict(row, **out)), flush=True)
    return 0


console_main = entry(main)  # the ``nbdiff-generate`` console script
