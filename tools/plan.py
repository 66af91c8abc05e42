#!/usr/bin/env python
"""Plan a training run's parallel layout: which TP / PP / VPP / CP / DP (and EP for a
mixture-of-experts model), micro-batch and recomputation fit a model on a cluster, best first
(docs/plans.md).

    python tools/plan.py llama3-70b --seq-len 32768 --global-batch 256 --nodes 8 --out-yaml run.yaml

The work is in :mod:`megatron_nbdiff.planning.cli` (``--help`` lists every option).
"""
import sys

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.planning.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
