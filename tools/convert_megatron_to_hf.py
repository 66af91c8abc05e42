#!/usr/bin/env python
"""Export a megatron_nbdiff checkpoint to a plain Hugging Face checkpoint (safetensors).

    python tools/convert_megatron_to_hf.py --megatron-dir CKPT --out-dir HF_OUT [--dtype bf16] \
        [--max-shard-size 2GB] [--force] [--allow-nonfinite]

The work is in :mod:`megatron_nbdiff.checkpoint.cli` (``--help`` for every option).
"""
import sys

from megatron_nbdiff.checkpoint.cli import megatron_to_hf_main as main
from megatron_nbdiff.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
