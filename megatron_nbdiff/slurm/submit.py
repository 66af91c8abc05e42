"""Handing the batch script to ``sbatch``."""
from __future__ import annotations

import shutil
import subprocess
import sys

from .errors import SubmitError


def submit(script: str, wait: bool) -> int:
    """``sbatch --parsable [--wait] script``: prints the job id on stdout as soon as sbatch tells
    it; returns 0, or with ``wait`` the job's exit status. :class:`SubmitError` when sbatch is
    missing or refuses the job."""
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
