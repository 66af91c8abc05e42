"""Slurm: turn a run config into a batch job for the trainer, and submit it.

``nbdiff-launch-slurm`` (:mod:`.launch`) validates the config on the allocation (:mod:`.checks`),
fills in the packaged batch-script template (:mod:`.template`, ``train.sbatch.template``) and
hands it to ``sbatch`` (:mod:`.submit`). ``examples/slurm/README.md`` describes the job: one task
per node running torchrun, a checkpoint before the time limit, and a requeue that resumes.
"""
from .checks import parse_time_limit, validate_launch
from .errors import LaunchError, SubmitError
from .template import TEMPLATE, render

__all__ = ["TEMPLATE", "LaunchError", "SubmitError", "parse_time_limit", "render", "validate_launch"]
