#!/usr/bin/env python
"""Submit a training run to Slurm: validate the config, write the batch script, call sbatch.

    python tools/launch_slurm.py --config run.yaml --nodes 4 --gpus-per-node 8 \\
        [--partition P] [--time 24:00:00] [--account A] [--job-name J] [--output-dir D] \\
        [--dry-run] [--wait] [section.key=value ...]

Before anything is written the config is loaded with its overrides (unknown keys and bad values
are refused), the parallel layout is checked against the allocation (TP x PP must divide
nodes x processes per node, the global batch must split over the data-parallel ranks, TP must
divide the heads, PP the layers) and the data, tokenizer and init checkpoint paths must exist.
Then the run folder (``--output-dir``, default ``checkpoint.save_dir``; it becomes the run's
``checkpoint.save_dir``) receives ``slurm/config.yaml`` (the validated config, paths made
absolute) and ``slurm/job.sbatch`` (examples/slurm/train.sbatch.template filled in), both written
atomically, and ``slurm/logs/`` for the job's output. ``--dry-run`` prints the script instead of
submitting it; otherwise ``sbatch`` submits it and the job id is printed on stdout.

``--gpus-per-node 0`` runs CPU processes on gloo (``--procs-per-node`` of them per node), for
tests and small machines. Submitting the same run folder again continues the run from its latest
checkpoint. Exit codes: 0 submitted (with ``--wait``: the job's exit code), 2 bad input, 1 sbatch
missing or failing.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron_nbdiff.fileio import atomic_write  # noqa: E402  (no torch: --help stays fast)
TEMPLATE = os.path.join(ROOT, "examples", "slurm", "train.sbatch.template")
PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_SLURM_LIST = re.compile(r"^[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*$")


class LaunchError(Exception):
    """Bad input to the launcher: the message is for the user (exit code 2)."""


class SubmitError(Exception):
    """sbatch is missing or refused the job (exit code 1)."""


# ------------------------------------------------------------------------------ parsing --


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


def _is_blend(items: list) -> bool:
    """Whether ``data.train`` is a flat blend [w1, prefix1, w2, prefix2, ...]."""
    def is_weight(x) -> bool:
        try:
            float(x)
            return True
        except ValueError:
            return False

    return bool(items) and len(items) % 2 == 0 and all(is_weight(w) for w in items[0::2])


def data_prefixes(train: list) -> list[str]:
    """Dataset prefixes of ``data.train``: a list of prefixes or a flat blend."""
    items = [str(x) for x in train]
    return items[1::2] if _is_blend(items) else items


def _absolute(path, base: str):
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


# --------------------------------------------------------------------------- validation --


def load_config(path: str, overrides: list):
    """The RunConfig of ``path`` with the overrides applied; LaunchError on any problem."""
    from megatron_nbdiff.config import RunConfig

    if not os.path.isfile(path):
        raise LaunchError(f"config file not found: {path}")
    try:
        return RunConfig.load(path, overrides)
    except (ValueError, TypeError) as exc:
        raise LaunchError(str(exc)) from None


def resolve_paths(cfg, base: str) -> None:
    """Make the config's file paths absolute (relative ones are relative to ``base``), so the job
    does not depend on the directory it starts in."""
    if cfg.data.train:
        items = [str(x) for x in cfg.data.train]
        if _is_blend(items):
            cfg.data.train = [x if i % 2 == 0 else _absolute(x, base) for i, x in enumerate(items)]
        else:
            cfg.data.train = [_absolute(x, base) for x in items]
    cfg.data.tokenizer = _absolute(cfg.data.tokenizer, base)
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir, base)
    cfg.checkpoint.init_from = _absolute(cfg.checkpoint.init_from, base)


def missing_paths(cfg) -> list[str]:
    """What the job will need and cannot find (as messages)."""
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
        problems.append("no tokenizer: set data.tokenizer (the one tools/preprocess_data.py used)")
    return problems


def model_config(cfg):
    """The architecture: the config's model section, else the init checkpoint's nbdiff.json
    (None when neither is readable yet)."""
    from megatron_nbdiff.checkpoint.errors import ConversionError
    from megatron_nbdiff.checkpoint.metadata import read_metadata

    src = cfg.checkpoint.init_from
    meta = None
    if src is not None and os.path.isdir(src):
        try:
            meta = read_metadata(src, kind="megatron")
        except ConversionError as exc:
            raise LaunchError(f"checkpoint.init_from: {exc}") from None
    if cfg.model is not None:
        if meta is not None and meta.get_model_config().to_dict() != cfg.model.to_dict():
            theirs, ours = meta.get_model_config().to_dict(), cfg.model.to_dict()
            diff = ", ".join(f"{k}: {ours[k]!r} here, {theirs[k]!r} in the checkpoint"
                             for k in sorted(ours) if ours[k] != theirs.get(k))
            raise LaunchError(
                f"the model section differs from the architecture of {src} ({diff}); leave 'model' "
                "out when starting from a checkpoint"
            )
        return cfg.model
    return meta.get_model_config() if meta is not None else None


def check_layout(cfg, nodes: int, procs_per_node: int, gpus_per_node: int) -> list[str]:
    """Raise LaunchError for a parallel layout that cannot run on the allocation; return warnings."""
    from megatron_nbdiff.attention.core_attention import check_parallel_divisibility

    t = cfg.train
    world = nodes * procs_per_node
    model_parallel = t.tp * t.pp
    if world % model_parallel != 0:
        raise LaunchError(
            f"train.tp x train.pp = {t.tp} x {t.pp} = {model_parallel} does not divide the "
            f"{world} processes of {nodes} node(s) x {procs_per_node} per node"
        )
    dp = world // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise LaunchError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x data-parallel size {dp} ({world} processes / (tp {t.tp} x pp {t.pp}))"
        )
    warn = []
    mc = model_config(cfg)
    if mc is not None:
        try:
            check_parallel_divisibility(mc.num_attention_heads, mc.num_query_groups, t.tp)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        if mc.num_layers % t.pp != 0:
            raise LaunchError(f"train.pp {t.pp} does not divide model num_layers={mc.num_layers}")
        if t.seq_len > mc.max_seq_len:
            raise LaunchError(f"train.seq_len {t.seq_len} exceeds model.max_seq_len {mc.max_seq_len}")
        if gpus_per_node == 0 and mc.attention_backend == "flex":
            raise LaunchError(
                "model.attention_backend is 'flex', which cannot train on CPU (no backward pass): "
                "add model.attention_backend=dense for a CPU job"
            )
    else:
        warn.append("the architecture is not known yet (no model section and no readable "
                    "checkpoint.init_from): heads and layers were not checked against tp and pp")
    if gpus_per_node > 0 and t.tp > gpus_per_node:
        warn.append(f"train.tp {t.tp} is larger than the {gpus_per_node} GPUs of a node: tensor "
                    "parallelism across nodes is slow")
    if gpus_per_node == 0 and t.dtype == "bf16":
        warn.append("train.dtype bf16 on a CPU job: 'auto' (fp32 on CPU) is the tested setting")
    return warn


# ------------------------------------------------------------------------------ writing --


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


def _directive_value(name: str, value: str, pattern=_SLURM_NAME) -> str:
    if not pattern.match(value):
        raise LaunchError(f"{name} {value!r} contains characters Slurm does not accept here")
    return value


def _directive_path(name: str, path: str) -> str:
    if re.search(r"[\s%\\\"']", path):
        raise LaunchError(f"{name} {path!r}: Slurm directives need a path without spaces, quotes, '%' or '\\'")
    return path


def build_script(args, cfg, run_dir: str, procs_per_node: int, template_text: str) -> str:
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
        optional.append(f"#SBATCH --partition={_directive_value('--partition', args.partition, _SLURM_LIST)}")
    if args.account:
        optional.append(f"#SBATCH --account={_directive_value('--account', args.account)}")
    if args.time:
        optional.append(f"#SBATCH --time={args.time}")
    for opt in args.sbatch_option:
        if not opt.startswith("-") or re.search(r"[\n\r]", opt):
            raise LaunchError(f"--sbatch-option {opt!r} must be one sbatch option such as --qos=high")
        optional.append(f"#SBATCH {opt}")
    job_name = args.job_name or os.path.splitext(os.path.basename(args.config))[0]
    values = dict(
        JOB_NAME=_directive_value("--job-name", job_name),
        NODES=args.nodes,
        RESOURCE_DIRECTIVES="\n".join(resources),
        OPTIONAL_DIRECTIVES="\n".join(optional),
        SIGNAL_SECONDS=args.signal_seconds,
        LOG_DIR=_directive_path("the log folder", os.path.join(slurm_dir, "logs")),
        WORKDIR=_directive_path("the working directory", os.getcwd()),
        PYTHON=shlex.quote(args.python),
        REPO=shlex.quote(ROOT),
        RUN_DIR=shlex.quote(run_dir),
        CONFIG=shlex.quote(os.path.join(slurm_dir, "config.yaml")),
        SCRIPT=shlex.quote(os.path.join(slurm_dir, "job.sbatch")),
        GPUS_PER_NODE=args.gpus_per_node,
        PROCS_PER_NODE=procs_per_node,
        MAX_REQUEUES=args.max_requeues,
        MASTER_PORT=args.master_port or "",
    )
    return render(template_text, values)


# ----------------------------------------------------------------------------- submitting --


def submit(script: str, wait: bool) -> int:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run)")
    cmd = [sbatch, "--parsable"] + (["--wait"] if wait else []) + [script]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()
    job_id = first.split(";")[0]
    if job_id.isdigit():
        print(job_id, flush=True)
        print(f"submitted job {job_id}", file=sys.stderr, flush=True)
    rest, err = proc.communicate()
    if not job_id.isdigit():
        raise SubmitError(f"sbatch failed (exit {proc.returncode}): {(first + rest + err).strip()}")
    if wait:
        return proc.returncode
    if proc.returncode != 0:
        raise SubmitError(f"sbatch exited with {proc.returncode}: {err.strip()}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (as for tools/train.py)")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node, one training process each; 0: CPU processes on gloo")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-node", type=int, default=None,
                   help="CPUs per node (default: the whole node with GPUs, --procs-per-node without)")
    p.add_argument("--partition", help="Slurm partition(s)")
    p.add_argument("--time", help="time limit (minutes, HH:MM:SS, D-HH:MM:SS, ...)")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--job-name", help="job name (default: the config file's name)")
    p.add_argument("--output-dir", help="run folder; becomes checkpoint.save_dir (default: checkpoint.save_dir)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="send SIGUSR1 this long before the time limit: the trainer saves and the job "
                        "requeues itself (default 300)")
    p.add_argument("--max-requeues", type=int, default=100,
                   help="stop requeueing after this many restarts (default 100)")
    p.add_argument("--master-port", type=int, default=0,
                   help="torchrun rendezvous port on the first node (default: 20000 + job id %% 20000)")
    p.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                   help="share GPU nodes with other jobs (default: --exclusive)")
    p.add_argument("--sbatch-option", action="append", default=[],
                   help="one more #SBATCH line, e.g. --sbatch-option=--qos=high (repeatable)")
    p.add_argument("--python", default=sys.executable,
                   help="Python interpreter on the compute nodes (default: this one)")
    p.add_argument("--template", default=TEMPLATE, help="batch script template (default: %(default)s)")
    p.add_argument("--skip-path-check", action="store_true",
                   help="do not require the data, tokenizer and checkpoint paths to exist here")
    p.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    p.add_argument("--wait", action="store_true", help="wait for the job (sbatch --wait); exit with its code")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    try:
        return _launch(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _launch(args) -> int:
    # sizes first: cheap, and they need no config
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
    procs_per_node = args.gpus_per_node or args.procs_per_node or 1
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
    if not os.path.isfile(args.template):
        raise LaunchError(f"template not found: {args.template}")
    if not os.path.isfile(args.python) or not os.access(args.python, os.X_OK):
        raise LaunchError(f"--python {args.python!r} is not an executable file")

    cfg = load_config(args.config, args.overrides)
    cwd = os.getcwd()
    run_dir = _absolute(args.output_dir or cfg.checkpoint.save_dir, cwd)
    cfg.checkpoint.save_dir = run_dir
    resolve_paths(cfg, cwd)
    warnings_out = check_layout(cfg, args.nodes, procs_per_node, args.gpus_per_node)
    problems = [] if args.skip_path_check else missing_paths(cfg)
    if problems and not args.dry_run:
        raise LaunchError("; ".join(problems) + " (--skip-path-check if the compute nodes see paths this machine does not)")
    warnings_out += problems
    with open(args.template, encoding="utf-8") as f:
        template_text = f.read()
    script_text = build_script(args, cfg, run_dir, procs_per_node, template_text)

    slurm_dir = os.path.join(run_dir, "slurm")
    os.makedirs(os.path.join(slurm_dir, "logs"), exist_ok=True)
    config_path = os.path.join(slurm_dir, "config.yaml")
    cfg.save(config_path)  # atomic (temporary name, then rename)
    script_path = os.path.join(slurm_dir, "job.sbatch")
    atomic_write(script_path, script_text, mode=0o755)
    for w in warnings_out:
        print(f"warning: {w}", file=sys.stderr)

    if args.dry_run:
        sys.stdout.write(script_text)
        print(f"wrote {script_path} and {config_path} (dry run: not submitted)", file=sys.stderr)
        return 0
    code = submit(script_path, args.wait)
    print(f"run folder {run_dir}; log {os.path.join(slurm_dir, 'logs')}/", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
