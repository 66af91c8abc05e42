"""What the launcher refuses before it writes anything: its own options (sizes, the time limit,
the interpreter) and the run config on the allocation.

:func:`validate_launch` is the one call for the config: the allocation checks phrased in nodes
and processes, the existence of every path the job reads (all missing ones in one message), the
model section against the init checkpoint (naming the fields that differ), then the trainer's own
validation (:func:`megatron_nbdiff.training.validation.validate_run`, so a job is refused here
exactly when ``nbdiff-train`` would refuse it), then what only a job on this allocation needs.
With ``--skip-path-check`` (the compute nodes see paths this machine does not) the checks that
need those paths are left to the job, and the config-only ones (parallel sizes, sequence length,
recipe) still run.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from ..errors import NBDiffError
from .errors import LaunchError


# -- options ------------------------------------------------------------------------------------
def parse_time_limit(value: str) -> int:
    """Seconds of a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise LaunchError(
            f"--time {value!r} is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
            "or D-HH:MM:SS)"
        )
    days, a, b, c = m.groups()
    a, b, c = int(a), (int(b) if b is not None else None), (int(c) if c is not None else None)
    if days is not None:  # D-H[:M[:S]]
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise LaunchError(f"--time {value!r} is not a positive time limit")
    return seconds


def check_options(args) -> int:
    """Refuse bad launcher options (cheap, no config needed); returns the processes per node."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, found {args.nodes}")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, found {args.gpus_per_node}")
    if args.procs_per_node is not None and args.procs_per_node < 1:
        raise LaunchError(f"--procs-per-node must be >= 1, found {args.procs_per_node}")
    if args.gpus_per_node > 0 and args.procs_per_node not in (None, args.gpus_per_node):
        raise LaunchError(
            f"--procs-per-node {args.procs_per_node} with --gpus-per-node {args.gpus_per_node}: "
            "GPU jobs run one process per GPU"
        )
    if args.cpus_per_node is not None and args.cpus_per_node < 1:
        raise LaunchError(f"--cpus-per-node must be >= 1, found {args.cpus_per_node}")
    if args.signal_seconds < 1 or args.signal_seconds > 65535:
        raise LaunchError(f"--signal-seconds must be in 1..65535, found {args.signal_seconds}")
    if not 0 <= args.master_port <= 65535:
        raise LaunchError(f"--master-port must be in 1..65535, found {args.master_port}")
    if args.max_requeues < 0:
        raise LaunchError(f"--max-requeues must be >= 0, found {args.max_requeues}")
    if args.time is not None:
        limit = parse_time_limit(args.time)
        if limit <= args.signal_seconds:
            raise LaunchError(
                f"--time {args.time} ({limit} s) leaves no training time before the save signal "
                f"{args.signal_seconds} s ahead of it (--signal-seconds)"
            )
    if not os.path.isfile(args.python) or not os.access(args.python, os.X_OK):
        raise LaunchError(f"--python {args.python!r} is not an executable file")
    return args.gpus_per_node or args.procs_per_node or 1


# -- the run config -----------------------------------------------------------------------------
def load_config(path: str, overrides: list):
    """The RunConfig of ``path`` with the overrides applied (types checked and coerced by
    :mod:`megatron_nbdiff.config`)."""
    from ..config import RunConfig

    if not os.path.isfile(path):
        raise LaunchError(f"config file not found: {path}")
    try:
        return RunConfig.load(path, overrides)
    except NBDiffError:
        raise
    except (ValueError, TypeError) as exc:
        raise LaunchError(str(exc)) from None


def _is_blend(items: list) -> bool:
    """Whether ``data.train`` is a flat blend [w1, prefix1, w2, prefix2, ...], as megatron-core's
    ``get_blend_from_list`` reads it (the trainer's reading, through ``data.datasets``)."""
    from megatron.core.datasets.utils import get_blend_from_list

    return bool(items) and get_blend_from_list([str(x) for x in items])[1] is not None


def data_prefixes(train: list) -> list[str]:
    """Dataset prefixes of ``data.train`` (empty for an empty list)."""
    from ..data.datasets import data_prefixes as prefixes

    return prefixes(train) if train else []


def absolute(path, base: str):
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def resolve_paths(cfg, base: str) -> None:
    """Make the config's file paths absolute (relative ones are relative to ``base``), so the job
    does not depend on the directory it starts in."""
    if cfg.data.train:
        items = [str(x) for x in cfg.data.train]
        if _is_blend(items):
            cfg.data.train = [x if i % 2 == 0 else absolute(x, base) for i, x in enumerate(items)]
        else:
            cfg.data.train = [absolute(x, base) for x in items]
    cfg.data.tokenizer = absolute(cfg.data.tokenizer, base)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir, base)
    cfg.checkpoint.init_from = absolute(cfg.checkpoint.init_from, base)


def missing_paths(cfg) -> list[str]:
    """What the job will read and cannot be found here (as messages)."""
    problems = []
    if not cfg.data.train:
        problems.append("data.train is empty: give at least one indexed-dataset prefix")
    for prefix in data_prefixes(cfg.data.train or []):
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                problems.append(f"data prefix {prefix!r}: missing {prefix + suffix}")
    if cfg.data.tokenizer is not None and not os.path.exists(cfg.data.tokenizer):
        problems.append(f"data.tokenizer {cfg.data.tokenizer!r} does not exist")
    if cfg.checkpoint.init_from is not None and not os.path.isdir(cfg.checkpoint.init_from):
        problems.append(f"checkpoint.init_from {cfg.checkpoint.init_from!r} is not a directory")
    if cfg.data.tokenizer is None and cfg.checkpoint.init_from is None:
        problems.append("no tokenizer: set data.tokenizer (the one nbdiff-preprocess used)")
    return problems


def model_config(cfg):
    """The architecture: the config's model section, else the init checkpoint's nbdiff.json (None
    when neither is readable here). A model section that differs from the checkpoint is refused
    with the fields that differ."""
    from ..checkpoint.metadata import read_metadata

    src = cfg.checkpoint.init_from
    meta = None
    if src is not None and os.path.isdir(src):
        try:
            meta = read_metadata(src, kind="megatron")
        except NBDiffError as exc:
            raise LaunchError(f"checkpoint.init_from: {exc}") from None
    from ..training.validation import resolve_model

    try:
        return resolve_model(cfg, meta)
    except NBDiffError as exc:
        raise LaunchError(str(exc)) from None


def check_allocation(cfg, nodes: int, procs_per_node: int) -> None:
    """TP x PP x CP divides the job's processes and the global batch splits over the
    data-parallel ranks (the context-parallel ranks of one data-parallel rank share its samples),
    in the allocation's terms."""
    t = cfg.train
    world = nodes * procs_per_node
    model_parallel = t.tp * t.pp * t.cp
    if world % model_parallel != 0:
        raise LaunchError(
            f"train.tp x train.pp x train.cp = {t.tp} x {t.pp} x {t.cp} = {model_parallel} does not divide the "
            f"{world} processes of {nodes} node(s) x {procs_per_node} per node"
        )
    dp = world // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise LaunchError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x data-parallel size {dp} ({world} processes / (tp {t.tp} x pp {t.pp} "
            f"x cp {t.cp}))"
        )


def _config_only_checks(cfg, mc, world: int) -> None:
    """The part of the trainer's validation that needs no file: used with --skip-path-check."""
    from ..training.recipes import resolve_recipe
    from ..training.validation import check_layout

    t = cfg.train
    if t.seq_len > mc.max_seq_len:
        raise LaunchError(f"train.seq_len {t.seq_len} exceeds model.max_seq_len {mc.max_seq_len}")
    resolve_recipe(cfg.recipe).check(t.seq_len, t.steps)
    check_layout(cfg, mc, world)  # TP / PP / CP / EP against the model and the world, CP's block split


def validate_launch(cfg, nodes: int, procs_per_node: int, gpus_per_node: int,
                    check_paths: bool = True) -> list[str]:
    """Refuse a config the job would refuse, or that cannot run on the allocation (see the module
    docstring); returns warnings. ``cfg``'s paths must already be absolute."""
    world = nodes * procs_per_node
    t = cfg.train
    check_allocation(cfg, nodes, procs_per_node)
    warn = []
    if check_paths:
        problems = missing_paths(cfg)
        if problems:
            raise LaunchError("; ".join(problems) +
                              " (--skip-path-check if the compute nodes see paths this machine does not)")
        from ..training.validation import validate_run

        mc: Optional[object] = validate_run(cfg, world_size=world).model
    else:
        mc = model_config(cfg)
        if mc is not None:
            _config_only_checks(cfg, mc, world)
        else:
            warn.append("the architecture is not known here (no model section and no readable "
                        "checkpoint.init_from): heads and layers were not checked against tp and pp")
    if mc is not None and gpus_per_node == 0 and mc.attention_backend == "flex":
        raise LaunchError(
            "model.attention_backend is 'flex', which cannot train on CPU (no backward pass): "
            "add model.attention_backend=dense for a CPU job"
        )
    if gpus_per_node > 0 and t.tp > gpus_per_node:
        warn.append(f"train.tp {t.tp} is larger than the {gpus_per_node} GPUs of a node: tensor "
                    "parallelism across nodes is slow")
    if gpus_per_node == 0 and t.dtype == "bf16":
        warn.append("train.dtype bf16 on a CPU job: 'auto' (fp32 on CPU) is the tested setting")
    return warn
