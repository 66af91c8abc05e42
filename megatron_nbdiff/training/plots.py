"""PNG plots of a run: loss curves (train and held-out) and the block-size schedule."""
from __future__ import annotations

import json
import os

from ..fileio import save_figure


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, evaluation records) of a ``metrics.jsonl``; a torn last line (a kill
    while it was written) is skipped."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            (evals if "eval_loss" in rec else train).append(rec)
    return train, evals


def plot_run(metrics_path: str, out_dir: str, curriculum, steps: int) -> list[str]:
    """Write ``loss.png`` and ``block_size.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        xs = [r["step"] for r in train]
        ax.plot(xs, [r["loss"] for r in train], label="train loss")
        if any(r["diffusion"] for r in train):
            ax.plot(xs, [r["diffusion"] for r in train], label="diffusion", alpha=0.7)
        if any(r["ar"] for r in train):
            ax.plot(xs, [r["ar"] for r in train], label="AR", alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    save_figure(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.step(range(steps), curriculum.schedule(steps), where="post")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("block size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "block_size.png"))
    save_figure(fig, paths[-1])
    return paths
