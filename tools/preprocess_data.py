#!/usr/bin/env python
"""Tokenise a JSONL, text or chat corpus into a megatron-core indexed dataset (``PREFIX.bin`` +
``PREFIX.idx``; chat also writes the loss mask ``PREFIX.loss_mask.bin`` + ``.idx``).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer TOKENIZER_DIR_OR_MODEL \\
        --output-prefix data/corpus [--format auto|jsonl|text|chat] [--workers N] \\
        [--json-key text] [--max-tokens N] [--no-eod] [--force]

The same as the ``nbdiff-preprocess`` command; the work is in :mod:`megatron_nbdiff.data.preprocess`.
"""
import sys

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.data.preprocess import main, preprocess  # noqa: F401  (preprocess: for old imports)

if __name__ == "__main__":
    sys.exit(run_main(main))
