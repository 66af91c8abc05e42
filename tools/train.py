#!/usr/bin/env python
"""Train with a recipe (``nbdiff-train``): see ``megatron_nbdiff/training/cli.py``."""
import sys

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.training.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
