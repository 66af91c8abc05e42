#!/usr/bin/env python
"""Convert a Megatron-LM GPT checkpoint (torch_dist) into a megatron_nbdiff checkpoint.

    python tools/convert_megatron_lm.py --load SAVE_DIR --tokenizer TOK --out-dir OUT \
        [--mask-token append] [--args-yaml ARGS.yaml] [--tp 8 --pp 4]

The work is in :mod:`megatron_nbdiff.checkpoint.megatron_lm` (``--help`` for every option).
"""
import sys

from megatron_nbdiff.checkpoint.cli import megatron_lm_main as main
from megatron_nbdiff.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
