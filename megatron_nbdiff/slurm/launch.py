"""Submit a training run to Slurm (``nbdiff-launch-slurm``, ``tools/launch_slurm.py``): validate the
config, write the batch script, call sbatch.

    nbdiff-launch-slurm --config run.yaml --nodes 4 --gpus-per-node 8 \\
        [--partition P] [--time 24:00:00] [--account A] [--job-name J] [--output-dir D] \\
        [--dry-run] [--wait] [section.key=value ...]

Before anything is written the config is loaded with its overrides (unknown keys, values of the
wrong type and bad values are refused) and validated as the training job will validate it, on
this allocation (:func:`megatron_nbdiff.slurm.checks.validate_launch`): TP x PP must divide
nodes x processes per node, the global batch must split over the data-parallel ranks, TP must
divide the heads, PP the layers, and the data, tokenizer and init checkpoint must exist and fit
the model. ``--dry-run`` validates the same way (and fails the same way). Then the run folder
(``--output-dir``, default ``checkpoint.save_dir``; it becomes the run's ``checkpoint.save_dir``)
receives ``slurm/config.yaml`` (the validated config, paths made absolute) and
``slurm/job.sbatch`` (the packaged ``train.sbatch.template`` filled in), both written atomically,
and ``slurm/logs/`` for the job's output. ``--dry-run`` prints the script instead of submitting
it; otherwise ``sbatch`` submits it and the job id is printed on stdout.

``--gpus-per-node 0`` runs CPU processes on gloo (``--procs-per-node`` of them per node), for
tests and small machines. Submitting the same run folder again continues the run from its latest
checkpoint. Exit codes: 0 submitted (with ``--wait``: the job's exit code), 2 bad input, 1 sbatch
missing or failing.
"""
from __future__ import annotations

import os
import sys
from argparse import RawDescriptionHelpFormatter
from typing import Optional, Sequence

from ..cli import ArgumentParser, entry, run_main
from ..fileio import atomic_write
from .checks import absolute, check_options, load_config, resolve_paths, validate_launch
from .submit import submit
from .template import TEMPLATE, read_template, render, script_values


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="nbdiff-launch-slurm", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (as for nbdiff-train)")
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
    p.add_argument("--template", default=TEMPLATE, help="batch script template (default: the packaged one)")
    p.add_argument("--skip-path-check", action="store_true",
                   help="do not require the data, tokenizer and checkpoint paths to exist here")
    p.add_argument("--dry-run", action="store_true", help="validate, write and print the script; do not submit")
    p.add_argument("--wait", action="store_true", help="wait for the job (sbatch --wait); exit with its code")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nbdiff-launch-slurm``; run it through :func:`megatron_nbdiff.cli.run_main` (bad input:
    one ``error:`` line and exit 2; sbatch missing or failing: exit 1)."""
    args = parser().parse_intermixed_args(argv)  # overrides may come before or after the options
    return launch(args)


def launch(args) -> int:
    procs_per_node = check_options(args)  # cheap, and they need no config
    template_text = read_template(args.template)

    cfg = load_config(args.config, args.overrides)
    cwd = os.getcwd()
    run_dir = absolute(args.output_dir or cfg.checkpoint.save_dir, cwd)
    cfg.checkpoint.save_dir = run_dir
    resolve_paths(cfg, cwd)
    warnings_out = validate_launch(cfg, args.nodes, procs_per_node, args.gpus_per_node,
                                   check_paths=not args.skip_path_check)
    script_text = render(template_text, script_values(args, run_dir, procs_per_node))

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


console_main = entry(main)

if __name__ == "__main__":
    sys.exit(run_main(main))
