#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (safetensors) into a megatron_nbdiff checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir OUT [--tp 2 --pp 2] [--ep 8] \
        [--mask-token append] [--dtype bf16] [--force] [--allow-nonfinite]

The work is in :mod:`megatron_nbdiff.checkpoint.cli` (``--help`` for every option).
"""
import sys

from megatron_nbdiff.checkpoint.cli import hf_to_megatron_main as main
from megatron_nbdiff.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
