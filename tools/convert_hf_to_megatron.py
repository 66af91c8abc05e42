#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Llama, Qwen2, Qwen3, Mistral; safetensors) into a
megatron-core distributed checkpoint of megatron_nbdiff, with nbdiff.json and the tokenizer.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir OUT --tp 2 --pp 2 \
        --mask-token append --dtype bf16

--mask-token: ``append`` (add ``<|mask|>``, rows = mean of existing rows), an unused id, a token
string of the tokenizer's vocabulary, or ``none``. The checkpoint is written in the reshardable
torch_dist format and loads at any TP/PP; --tp/--pp are checked against the architecture, set the
vocabulary padding and are recorded as the target layout.
"""
import argparse
import sys

# heavy imports (torch, megatron) happen inside main(): dist_checkpointing starts a helper process
# with the "spawn" method, which re-imports this module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out-dir", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (default 1)")
    p.add_argument("--mask-token", default="append",
                   help="append | none | an unused token id | a token string (default append)")
    p.add_argument("--mask-token-string", default="<|mask|>",
                   help="string of the appended mask token (default <|mask|>)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="ModelConfig.max_seq_len (default: max_position_embeddings)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocabulary padding multiple per TP rank (default 128)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_nbdiff.checkpoint import convert_hf_to_megatron
    from megatron_nbdiff.checkpoint.errors import run_tool

    return run_tool(lambda: convert_hf_to_megatron(
        args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, mask_token=args.mask_token,
        mask_token_string=args.mask_token_string, dtype=args.dtype, force=args.force,
        max_seq_len=args.max_seq_len,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        progress=not args.no_progress,
    ))


if __name__ == "__main__":
    sys.exit(main())
