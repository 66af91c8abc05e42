#!/usr/bin/env python
"""Evaluate a model: held-out losses, lm-eval task accuracy and decoding speed, as one JSON report
and a PNG plot.

    python tools/eval.py --model DIR --out report.json [--plot report.png] \\
        [--data PREFIX_OR_JSONL] [--block-sizes 1,4,32] \\
        [--tasks nbdiff_toy ...] [--thresholds 0.5,0.7,0.9,1.0] [--prompts FILE] [--limit N]

The same as the ``nbdiff-eval`` command; the work is in :mod:`megatron_nbdiff.evaluation.report`
(``--help`` lists every option). Exit codes: 0 done, 2 bad input.
"""
import sys

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.evaluation.report import main

if __name__ == "__main__":
    sys.exit(run_main(main))
