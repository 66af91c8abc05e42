"""The batch script: the packaged template (``train.sbatch.template``, beside this file, so an
installed ``nbdiff-launch-slurm`` finds it) and its filling-in.

The template has ``@NAME@`` placeholders; :func:`render` fills them (every placeholder needs a
value and every value a placeholder) and :func:`script_values` computes the values from the
launcher's options. Values that end up in ``#SBATCH`` lines are checked for characters Slurm does
not accept there; values that end up in shell assignments are shell-quoted.
"""
from __future__ import annotations

import os
import re
import shlex

from .errors import LaunchError

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.sbatch.template")
TRAIN_MODULE = "megatron_nbdiff.training.cli"
"""The module whose ``main`` every training process of the job runs (through ``run_main``)."""

PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_SLURM_LIST = re.compile(r"^[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*$")


def render(template: str, values: dict) -> str:
    """Fill ``@NAME@`` placeholders. A placeholder alone on its line that expands to nothing
    removes the line; every placeholder must have a value and every value must be used."""
    used = set(PLACEHOLDER.findall(template))
    missing = sorted(used - set(values))
    if missing:
        raise LaunchError(f"the template has placeholders the launcher does not fill: {', '.join(missing)}")
    unused = sorted(set(values) - used)
    if unused:
        raise LaunchError(f"the template lacks the placeholders: {', '.join(unused)}")
    lines = []
    for line in template.splitlines(keepends=True):
        m = PLACEHOLDER.fullmatch(line.strip())
        if m and values[m.group(1)] == "":
            continue
        lines.append(PLACEHOLDER.sub(lambda mm: str(values[mm.group(1)]), line))
    return "".join(lines)


def directive_value(name: str, value: str, pattern=_SLURM_NAME) -> str:
    if not pattern.match(value):
        raise LaunchError(f"{name} {value!r} contains characters Slurm does not accept here")
    return value


def directive_path(name: str, path: str) -> str:
    if re.search(r"[\s%\\\"']", path):
        raise LaunchError(f"{name} {path!r}: Slurm directives need a path without spaces, quotes, '%' or '\\'")
    return path


def script_values(args, run_dir: str, procs_per_node: int) -> dict:
    """The placeholder values for the launcher's parsed options ``args`` (see
    :func:`megatron_nbdiff.slurm.launch.parser`)."""
    slurm_dir = os.path.join(run_dir, "slurm")
    resources = []
    if args.gpus_per_node > 0:
        resources.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
        if args.exclusive:
            resources.append("#SBATCH --exclusive")
        if args.cpus_per_node:
            resources.append(f"#SBATCH --cpus-per-task={args.cpus_per_node}")
    else:
        resources.append(f"#SBATCH --cpus-per-task={args.cpus_per_node or procs_per_node}")
    optional = []
    if args.partition:
        optional.append(f"#SBATCH --partition={directive_value('--partition', args.partition, _SLURM_LIST)}")
    if args.account:
        optional.append(f"#SBATCH --account={directive_value('--account', args.account)}")
    if args.time:
        optional.append(f"#SBATCH --time={args.time}")
    for opt in args.sbatch_option:
        if not opt.startswith("-") or re.search(r"[\n\r]", opt):
            raise LaunchError(f"--sbatch-option {opt!r} must be one sbatch option such as --qos=high")
        optional.append(f"#SBATCH {opt}")
    job_name = args.job_name or os.path.splitext(os.path.basename(args.config))[0]
    return dict(
        JOB_NAME=directive_value("--job-name", job_name),
        NODES=args.nodes,
        RESOURCE_DIRECTIVES="\n".join(resources),
        OPTIONAL_DIRECTIVES="\n".join(optional),
        SIGNAL_SECONDS=args.signal_seconds,
        LOG_DIR=directive_path("the log folder", os.path.join(slurm_dir, "logs")),
        WORKDIR=directive_path("the working directory", os.getcwd()),
        PYTHON=shlex.quote(args.python),
        TRAIN_MODULE=TRAIN_MODULE,
        RUN_DIR=shlex.quote(run_dir),
        CONFIG=shlex.quote(os.path.join(slurm_dir, "config.yaml")),
        SCRIPT=shlex.quote(os.path.join(slurm_dir, "job.sbatch")),
        GPUS_PER_NODE=args.gpus_per_node,
        PROCS_PER_NODE=procs_per_node,
        MAX_REQUEUES=args.max_requeues,
        MASTER_PORT=args.master_port or "",
    )


def read_template(path: str) -> str:
    if not os.path.isfile(path):
        raise LaunchError(f"template not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()
