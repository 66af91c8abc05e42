"""Rank every layout: estimate each one's memory and step time, keep those that fit, order them.

A plan fits when its peak stage (first or last pipeline stage, :mod:`.memory`) needs no more than
the GPU's memory. Fitting plans are ranked by step time (:mod:`.step_time`) in tiers of
``TOLERANCE`` (2%: closer than that, the estimate cannot tell them apart); within a tier the plan
needing fewer fields the trainer lacks comes first, then the one with less memory.
A plan that needs a ``train.*`` field the trainer does not have (read from ``TrainConfig``; today
it has tp, pp, vpp, cp, ep, moe_dispatcher and recompute) is ranked with the others and marked;
:func:`best_supported` is the best plan the trainer runs today. When nothing fits, :func:`plan`
raises one line naming the closest plan, by how much it misses and its largest part.

A mixture-of-experts layout at EP > 1 is one plan, with the token dispatcher (``alltoall`` or
``allgather``) whose estimate is faster (:func:`with_dispatcher`); its run config names it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..config import ModelConfig
from ..errors import ConfigError
from .layouts import Cluster, Layout, Workload, check_workload, dispatchers, enumerate_layouts
from .memory import GIB, StageMemory, peak_memory
from .step_time import StepTime, step_time

TOLERANCE = 0.02


@dataclasses.dataclass
class Plan:
    layout: Layout
    memory: StageMemory
    time: StepTime
    fits: bool
    unsupported: list[str]
    """``train.*`` fields this plan needs that the trainer lacks today."""
    moe: bool = False
    """Whether the model has mixture-of-experts layers (the report then shows EP)."""

    def notes(self) -> list[str]:
        out = []
        if self.layout.tp > 1:
            out.append("sequence parallelism on (train.sequence_parallel)")
        if self.unsupported:
            out.append("needs " + ", ".join(f"train.{f}" for f in self.unsupported)
                       + " (not in the trainer yet, issue #25)")
        return out

    def to_json(self) -> dict:
        return {"layout": dataclasses.asdict(self.layout), "fits": self.fits,
                "supported_today": not self.unsupported, "unsupported": self.unsupported,
                "memory_gib": self.memory.gib(), "step_time": dataclasses.asdict(self.time),
                "notes": self.notes()}


def evaluate(mc: ModelConfig, work: Workload, layout: Layout, cluster: Cluster) -> Plan:
    mem = peak_memory(mc, work, layout, cluster)
    return Plan(layout, mem, step_time(mc, work, layout, cluster),
                mem.total <= cluster.gpu_memory_gib * GIB, layout.unsupported(), mc.is_moe)


def with_dispatcher(mc: ModelConfig, work: Workload, layout: Layout, cluster: Cluster) -> Plan:
    """``layout`` evaluated with each token dispatcher it may use (:func:`.layouts.dispatchers`):
    the fastest that fits, else the one needing the least memory; on a tie the first (what
    ``train.moe_dispatcher: auto`` runs)."""
    candidates = [evaluate(mc, work, dataclasses.replace(layout, dispatcher=d), cluster)
                  for d in dispatchers(mc, layout.ep)]
    fitting = [p for p in candidates if p.fits]
    if fitting:
        return min(fitting, key=lambda p: p.time.seconds)
    return min(candidates, key=lambda p: p.memory.total)


def _largest_part(mem: StageMemory) -> str:
    parts = {k: v for k, v in dataclasses.asdict(mem).items() if k not in ("stage", "reserve")}
    name = max(parts, key=parts.get)
    return f"{name} {parts[name] / GIB:.1f} GiB"


def plan(mc: ModelConfig, work: Workload, cluster: Cluster, supported_only: bool = False,
         max_micro_batch: int = 8) -> list[Plan]:
    """Every fitting plan, best first (see the module docstring); ``supported_only`` keeps the
    layouts the trainer runs today. Raises :class:`ConfigError` when no layout exists or none
    fits."""
    check_workload(mc, work, cluster)
    plans = [with_dispatcher(mc, work, lay, cluster)
             for lay in enumerate_layouts(mc, work, cluster, max_micro_batch=max_micro_batch)]
    if supported_only:
        plans = [p for p in plans if not p.unsupported]
    if not plans:
        raise ConfigError(
            f"no parallel layout of {cluster.world} GPUs suits the model (heads "
            f"{mc.num_attention_heads}, query groups {mc.num_query_groups}, layers {mc.num_layers}) "
            f"with --global-batch {work.global_batch}: the global batch must be a multiple of the "
            "data-parallel size"
        )
    fitting = [p for p in plans if p.fits]
    if fitting:
        fastest = min(p.time.seconds for p in fitting)
        fitting.sort(key=lambda p: (math.floor(math.log(p.time.seconds / fastest) / math.log1p(TOLERANCE)),
                                    len(p.unsupported), p.memory.total, p.time.seconds))
    if not fitting:
        closest = min(plans, key=lambda p: p.memory.total)
        over = (closest.memory.total - cluster.gpu_memory_gib * GIB) / GIB
        part = _largest_part(closest.memory)
        hint = ("; more GPUs (--nodes) shard it further" if part.split()[0] in
                ("weights", "gradients", "optimizer") else "; a shorter --seq-len or more GPUs would help")
        raise ConfigError(
            f"nothing fits in {cluster.gpu_memory_gib:g} GiB per GPU: the closest layout "
            f"({closest.layout.label()}) needs {closest.memory.total / GIB:.1f} GiB on pipeline stage "
            f"{closest.memory.stage}, {over:.1f} GiB too much; its largest part is "
            f"{part}{hint}"
            + ("" if not supported_only else
               " (only layouts the trainer supports today were considered: drop --supported-only)")
        )
    return fitting


def best_supported(plans: list[Plan]) -> Optional[Plan]:
    return next((p for p in plans if not p.unsupported), None)
