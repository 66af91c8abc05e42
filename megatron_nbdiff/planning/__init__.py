"""The capacity planner (``tools/plan.py``, docs/plans.md): which parallel layout of a model fits
a cluster for a recipe and sequence length, and how fast it runs.

``shapes`` (the model), ``parameters`` (per-rank tensors and DDP buffers), ``layouts`` (cluster,
workload, layout, enumeration), ``memory``, ``step_time``, ``planner`` (ranking), ``report``
(table, run config, JSON, plot), ``cli``. Imports neither torch nor megatron-core.
"""
from .layouts import Cluster, Layout, Workload
from .planner import Plan, best_supported, plan
from .shapes import NAMED_SHAPES, load_model

__all__ = ["Cluster", "Layout", "Workload", "Plan", "plan", "best_supported", "NAMED_SHAPES", "load_model"]
