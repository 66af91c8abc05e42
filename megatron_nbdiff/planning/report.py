"""What the planner writes: the ranked table, the run config of a plan (YAML that
``nbdiff-launch-slurm`` accepts), the JSON of all plans and a PNG of their memory breakdown.

The run config holds only fields :class:`~megatron_nbdiff.config.RunConfig` has (``train.ep`` for a
mixture-of-experts plan with EP > 1, and for every mixture-of-experts plan the token dispatcher
its estimate assumes, ``train.moe_dispatcher``, written out rather than left to ``auto``): a
layout field the trainer lacked (``train.cp``, ``train.vpp`` and ``train.recompute`` until
2026-12-03; none today) would go into the file's comment header and the plan's notes, never into
a section, so the file loads and launches as is.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from ..config import RunConfig, TrainConfig
from ..fileio import atomic_write, save_figure
from .layouts import Cluster, Workload, selective_modules
from .memory import GIB
from .planner import Plan
from .shapes import ModelSource

COLUMNS = ("#", "tp", "pp", "vpp", "cp", "dp", "mbs", "recompute", "GiB", "weights+grad+opt",
           "act", "attn", "logits", "step s", "bubble", "MFU", "today")


def table(plans: list[Plan], top: int) -> str:
    """The ``top`` plans, one row each; a mixture-of-experts model's table has ``ep`` and
    ``dispatcher`` columns (after ``cp``) and its step time's ``EP comm`` share."""
    moe = any(p.moe for p in plans)
    columns = COLUMNS if not moe else COLUMNS[:5] + ("ep", "dispatcher") + COLUMNS[5:14] + ("EP comm",) + COLUMNS[14:]
    rows = []
    for i, p in enumerate(plans[:top], 1):
        m, lay = p.memory, p.layout
        row = [str(i), str(lay.tp), str(lay.pp), str(lay.vpp), str(lay.cp), str(lay.dp),
               str(lay.mbs), lay.recompute, f"{m.total / GIB:.1f}",
               f"{(m.weights + m.gradients + m.optimizer) / GIB:.1f}",
               f"{m.activations / GIB:.1f}", f"{m.attention / GIB:.1f}", f"{m.logits / GIB:.1f}",
               f"{p.time.seconds:.2f}", f"{p.time.bubble / p.time.seconds:.0%}",
               f"{p.time.mfu:.2f}", "yes" if not p.unsupported else "needs " + ",".join(p.unsupported)]
        if moe:
            row = (row[:5] + [str(lay.ep), lay.dispatcher] + row[5:14] + [f"{p.time.ep_comm / p.time.seconds:.0%}"]
                   + row[14:])
        rows.append(tuple(row))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def why(p: Plan, plans: list[Plan], cluster: Cluster) -> str:
    """One paragraph: what the plan is and why it ranks where it does."""
    lay, m, t = p.layout, p.memory, p.time
    parts = [f"{lay.label()}: peak {m.total / GIB:.1f} of {cluster.gpu_memory_gib:g} GiB on pipeline "
             f"stage {m.stage} (weights {m.weights / GIB:.1f}, gradients {m.gradients / GIB:.1f}, "
             f"optimizer {m.optimizer / GIB:.1f}, activations {m.activations / GIB:.1f}, attention "
             f"{m.attention / GIB:.1f}, logits {m.logits / GIB:.1f}, reserve {m.reserve / GIB:.1f})",
             f"step {t.seconds:.2f} s (compute {t.compute:.2f}, bubble {t.bubble:.2f}, TP comm "
             f"{t.tp_comm:.2f}, CP comm {t.cp_comm:.2f}, DP comm {t.dp_comm:.2f}, PP comm "
             f"{t.pp_comm:.3f}" + (f", EP comm {t.ep_comm:.2f}" if p.moe else "")
             + f"), effective MFU {t.mfu:.2f}, {t.tokens_per_s:,.0f} tokens/s"]
    parts += p.notes()
    return "; ".join(parts)


def run_config(p: Plan, source: ModelSource, work: Workload, data: Optional[list] = None,
               tokenizer: Optional[str] = None, init_from: Optional[str] = None,
               save_dir: Optional[str] = None) -> dict:
    """The run config of plan ``p`` as a dict of sections (only fields RunConfig has)."""
    have = {f.name for f in dataclasses.fields(TrainConfig)}
    lay = p.layout
    train = {"tp": lay.tp, "pp": lay.pp, "sequence_parallel": lay.tp > 1,
             "micro_batch_size": lay.mbs, "global_batch_size": work.global_batch,
             "seq_len": work.seq_len, "dtype": "bf16"}
    for name, value, default in (("cp", lay.cp, 1), ("vpp", lay.vpp, 1), ("recompute", lay.recompute, "none"),
                                 ("ep", lay.ep, 1)):
        if name in have and value != default:
            train[name] = value
    if source.model.is_moe and "moe_dispatcher" in have:  # the dispatcher the estimate assumes
        train["moe_dispatcher"] = lay.dispatcher
    if train.get("recompute") == "selective":  # what the memory model assumes (memory.py)
        train["recompute_modules"] = list(selective_modules(source.model))
    elif train.get("recompute") == "full":
        train.update(recompute_method="uniform", recompute_num_layers=1)
    cfg: dict = {}
    if source.kind != "checkpoint":
        cfg["model"] = source.model.to_dict()
    recipe = {"name": work.recipe}
    if source.mask_token_id is not None and work.recipe != "ar":
        recipe["mask_token_id"] = source.mask_token_id
    cfg["recipe"] = recipe
    cfg["data"] = {"train": list(data or [])}
    if tokenizer:
        cfg["data"]["tokenizer"] = tokenizer
    cfg["train"] = train
    ckpt = {"save_dir": save_dir or f"runs/plan-{work.recipe}-{work.seq_len}"}
    start = init_from or (source.name if source.kind == "checkpoint" else None)
    if start:
        ckpt["init_from"] = start
    cfg["checkpoint"] = ckpt
    RunConfig.from_dict(cfg, source="the planned run config")  # refuses anything the trainer would not load
    return cfg


def write_run_config(path: str, p: Plan, source: ModelSource, work: Workload, cluster: Cluster,
                     **paths) -> None:
    import yaml

    cfg = run_config(p, source, work, **paths)
    header = [f"Run config written by tools/plan.py for {source.described}",
              f"on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gib:g} GiB, "
              f"recipe {work.recipe}, L={work.seq_len}, global batch {work.global_batch}.",
              f"Plan: {p.layout.label()}; peak {p.memory.total / GIB:.1f} GiB per GPU, "
              f"step {p.time.seconds:.2f} s at the stated MFU {cluster.mfu:g}."]
    skipped = list(p.unsupported)
    if skipped:
        values = {"cp": p.layout.cp, "vpp": p.layout.vpp, "recompute": p.layout.recompute, "ep": p.layout.ep}
        header.append("The plan also needs " + ", ".join(f"train.{f}: {values[f]}" for f in skipped)
                      + ", which the trainer does not have yet (issue #25): left out of the sections")
        header.append("below; the memory and time above assume them (tools/plan.py --supported-only plans")
        header.append("without them).")
    if source.kind == "hf":
        header.append(f"Convert {source.name} first (nbdiff-convert-hf-to-megatron) and set "
                      "checkpoint.init_from to the result.")
    if not cfg["data"]["train"]:
        header.append("Fill in data.train (and data.tokenizer) before launching.")
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(cfg, sort_keys=False)
    atomic_write(path, text)


def write_json(path: str, plans: list[Plan], source: ModelSource, work: Workload, cluster: Cluster) -> None:
    doc = {"model": {"source": source.described, **source.model.to_dict()},
           "workload": dataclasses.asdict(work), "cluster": dataclasses.asdict(cluster),
           "trainer_fields": sorted(f.name for f in dataclasses.fields(TrainConfig)),
           "plans": [p.to_json() for p in plans]}
    atomic_write(path, json.dumps(doc, indent=1) + "\n")


def plot_memory(path: str, plans: list[Plan], cluster: Cluster, top: int, title: str) -> None:
    """Stacked bars of the memory parts of the ``top`` best plans, the GPU's memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = plans[:top]
    parts = ("weights", "gradients", "optimizer", "activations", "attention", "logits", "reserve")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(shown) + 3), 4.5))
    bottom = [0.0] * len(shown)
    for part in parts:
        vals = [getattr(p.memory, part) / GIB for p in shown]
        ax.bar(range(len(shown)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(cluster.gpu_memory_gib, color="black", linestyle="--", linewidth=1, label="GPU memory")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([p.layout.label().replace(" ", "\n") for p in shown], fontsize=6)
    ax.set_ylabel("GiB per GPU (peak stage)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
