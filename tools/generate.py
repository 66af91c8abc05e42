#!/usr/bin/env python
"""Decode prompts with an exported HF model, a Megatron checkpoint or a training run folder.

    python tools/generate.py --model DIR --prompt "Once upon a time" [--stats]
    python tools/generate.py --model DIR --prompt-file prompts.jsonl > out.jsonl

The work is in :mod:`megatron_nbdiff.inference.cli` (``--help`` for every option).
"""
import sys

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.inference.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
