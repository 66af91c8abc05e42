#!/usr/bin/env python
"""Submit a training run to Slurm: validate the config, write the batch script, call sbatch.

    python tools/launch_slurm.py --config run.yaml --nodes 4 --gpus-per-node 8 \\
        [--partition P] [--time 24:00:00] [--account A] [--job-name J] [--output-dir D] \\
        [--dry-run] [--wait] [section.key=value ...]

The same as the ``nbdiff-launch-slurm`` command; the work is in :mod:`megatron_nbdiff.slurm`
(``--help`` lists every option, ``examples/slurm/README.md`` describes the job).
Exit codes: 0 submitted (with ``--wait``: the job's exit code), 2 bad input, 1 sbatch missing or failing.
"""
import sys

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.slurm.launch import main

if __name__ == "__main__":
    sys.exit(run_main(main))
