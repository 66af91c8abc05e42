#!/usr/bin/env python
"""Export a megatron_nbdiff checkpoint (converted or adapted, any TP/PP) to a plain Hugging Face
checkpoint of the original architecture: config.json, sharded safetensors with an index, the
tokenizer and nbdiff.json. Loads with AutoModelForCausalLM.from_pretrained, no remote code.

    python tools/convert_megatron_to_hf.py --megatron-dir CKPT --out-dir HF_OUT --dtype bf16
"""
import argparse
import sys

# heavy imports happen inside main() (see convert_hf_to_megatron.py)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", required=True, help="checkpoint directory with nbdiff.json")
    p.add_argument("--out-dir", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the exported weights (default: the stored one)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_nbdiff.checkpoint import convert_megatron_to_hf
    from megatron_nbdiff.checkpoint.errors import run_tool

    return run_tool(lambda: convert_megatron_to_hf(
        args.megatron_dir, args.out_dir, dtype=args.dtype, force=args.force,
        max_shard_size=args.max_shard_size, progress=not args.no_progress,
    ))


if __name__ == "__main__":
    sys.exit(main())
