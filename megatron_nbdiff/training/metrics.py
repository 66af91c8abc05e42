"""The metrics component: ``metrics.jsonl``, TensorBoard, the progress bar, throughput and MFU,
and the PNG plots at the end of a run. Only rank 0 writes.

``metrics.jsonl`` holds one JSON object per line. When a run resumes, records of the steps it
will redo (a kill after the last checkpoint) and a torn last line (a kill in the middle of a
write) are dropped first, so every step appears once.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from ..fileio import atomic_write


@dataclasses.dataclass
class StepMetrics:
    """One training step's record in ``metrics.jsonl``."""

    step: int
    loss: float
    diffusion: float
    ar: float
    block_size: int
    lr: float
    grad_norm: float
    tokens_per_s: float
    mfu: Optional[float]
    seconds: float
    skipped: bool = False
    moe: dict = dataclasses.field(default_factory=dict)
    """Mixture-of-experts entries (:mod:`.moe_metrics`: expert load per stream, router losses);
    empty for a dense model. They join the record at its top level."""

    def record(self) -> dict:
        """The ``metrics.jsonl`` record: the fields, with the ``moe`` entries at the top level."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "moe"}
        out.update(self.moe)
        return out


def repair_metrics(path: str, start_step: int) -> int:
    """Keep the records of steps before ``start_step`` and drop torn lines; returns how many
    lines were dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(rec, dict) and rec.get("step", -1) < start_step:
                kept.append(json.dumps(rec))
            else:
                dropped += 1
    if dropped:
        atomic_write(path, "".join(k + "\n" for k in kept))
    return dropped


class MetricsLogger:
    """Writes step and evaluation records; shows progress."""

    def __init__(self, folder, rank: int, quiet: bool, start_step: int, total_steps: int):
        self.folder, self.enabled = folder, rank == 0
        self.tb = None
        self.bar = None
        if not self.enabled:
            return
        repair_metrics(folder.metrics, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(folder.tensorboard)
        except ImportError:
            self.tb = None
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, disable=quiet, desc="train", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.folder.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def step(self, record: dict, log: bool) -> None:
        """One training step's record (written when ``log``); advances the progress bar."""
        if log:
            self.write(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", B=record["block_size"],
                                     tok_s=f"{record['tokens_per_s']:,.0f}")
        if self.bar is not None:
            self.bar.update(1)

    def plot(self, curriculum, steps: int) -> list[str]:
        """``loss.png`` and ``block_size.png`` in the run folder."""
        if not self.enabled or not os.path.isfile(self.folder.metrics):
            return []
        from .plots import plot_run

        return plot_run(self.folder.metrics, self.folder.root, curriculum, steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def throughput(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def step_tokens(global_batch_size: int, stream_length: int) -> int:
    """Tokens the model processed in one step (both streams count for dual layouts)."""
    return global_batch_size * stream_length


__all__ = ["MetricsLogger", "StepMetrics", "repair_metrics", "throughput", "step_tokens"]
