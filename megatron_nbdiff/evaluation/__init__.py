"""Evaluation: held-out AR and diffusion losses, decoding speed, and an lm-evaluation-harness
adapter.

    from megatron_nbdiff.evaluation import heldout_losses, load_sequences, decoding_speed
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM   # needs `lm-eval`

``TASKS_DIR`` holds small local lm-eval tasks (``nbdiff_toy_copy``, ``nbdiff_toy_arith``,
``nbdiff_toy_text``, tag ``nbdiff_toy``): ``lm_eval.tasks.TaskManager(include_path=TASKS_DIR)``.
``tools/eval.py`` runs everything and writes a JSON report and a plot.
"""
import os

from .common import EvaluationError, atomic_write_bytes
from .metrics import decoding_speed, heldout_losses, load_sequences

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")

__all__ = ["TASKS_DIR", "EvaluationError", "atomic_write_bytes", "decoding_speed", "heldout_losses",
           "load_sequences"]
