"""The checkpointing component: the one owner of a training run's folder.

Layout of ``save_dir`` (:class:`RunFolder`)::

    config.yaml            the run config (written once validation has passed)
    metrics.jsonl          one JSON record per logged step / evaluation
    tensorboard/           TensorBoard events
    loss.png, block_size.png
    data_cache/            megatron's sample indices and the token scans
    checkpoints/
      step_0000100/        a megatron distributed checkpoint of model and optimizer,
        trainer_state.json   step, scheduler, recipe, config
        nbdiff.json          (runs started from a converted checkpoint) metadata for loading
        COMPLETE             written last: only a checkpoint holding it is trusted
      latest               the name of the newest complete checkpoint (for people and tools)
      FORMAT               "2": this folder's checkpoints carry COMPLETE (earlier versions'
                           checkpoints, without it, are adopted once as complete)

A save can be killed at any instruction and the run still resumes (docs/architecture.md,
"Checkpoints"): a checkpoint is written under ``step_N.tmp``, renamed to ``step_N`` and only then
marked ``COMPLETE``; an existing complete ``step_N`` is never written again (the state at a step
is a pure function of the step); ``latest`` moves after the marker; old checkpoints lose their
marker before they are deleted. At start, temporaries and unmarked checkpoints are removed, and
the newest complete checkpoint that loads is used, with a warning when it is not the one
``latest`` names or when a newer one fails to load.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Callable, Optional

from ..errors import CheckpointError, ConfigError, TrainingError
from ..fileio import atomic_write

COMPLETE = "COMPLETE"
FORMAT = "FORMAT"  # in checkpoints/: written by versions that mark complete checkpoints
STATE = "trainer_state.json"
_PREFIX = "step_"
FAULT_ENV = "NBDIFF_FAULT_KILL_AT"


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when ``$NBDIFF_FAULT_KILL_AT`` names this point (the
    fault-injection tests use it to stop a save at its dangerous instructions)."""
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error under torch's CheckpointException (which keeps each
    rank's failure) and megatron's "Worker failure" wrappers."""
    seen = 0
    while seen < 16:
        seen += 1
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict) and failures:
            first = next(iter(failures.values()))
            exc = first[0] if isinstance(first, tuple) else first
            continue
        if exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunFolder:
    """Paths of a run folder and the checkpoints in it."""

    def __init__(self, root: str):
        self.root = root
        self.checkpoints = os.path.join(root, "checkpoints")
        self.config = os.path.join(root, "config.yaml")
        self.metrics = os.path.join(root, "metrics.jsonl")
        self.tensorboard = os.path.join(root, "tensorboard")
        self.data_cache = os.path.join(root, "data_cache")
        self.latest_pointer = os.path.join(self.checkpoints, "latest")

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"{_PREFIX}{step:07d}")

    @staticmethod
    def is_complete(path: str) -> bool:
        return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, STATE))

    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.checkpoints):
            return []
        out = []
        for name in os.listdir(self.checkpoints):
            path = os.path.join(self.checkpoints, name)
            if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and self.is_complete(path):
                out.append((int(name[len(_PREFIX):]), path))
        return sorted(out)

    def latest_named(self) -> Optional[str]:
        """What ``latest`` names, or None."""
        try:
            with open(self.latest_pointer) as f:
                name = f.read().strip()
        except OSError:
            return None
        return os.path.join(self.checkpoints, name) if name else None

    def newest(self, warn: bool = True) -> Optional[str]:
        """The newest complete checkpoint; warns when ``latest`` names another one."""
        done = self.complete()
        if not done:
            if warn and self.latest_named() is not None:
                warnings.warn(f"{self.latest_pointer} names {os.path.basename(self.latest_named())}, "
                              "which is not a complete checkpoint, and there is no other")
            return None
        newest = done[-1][1]
        named = self.latest_named()
        if warn and named is not None and os.path.abspath(named) != os.path.abspath(newest):
            what = "is not a complete checkpoint" if not self.is_complete(named) else "is older"
            warnings.warn(f"{self.latest_pointer} names {os.path.basename(named)}, which {what}; "
                          f"using {os.path.basename(newest)}")
        return newest

    def adopt_legacy(self) -> list[str]:
        """A checkpoints folder written before checkpoints carried ``COMPLETE`` (it has no
        ``FORMAT`` file): mark each ``step_N`` that has ``trainer_state.json`` complete, as the
        version that wrote it trusted it (a load failure still falls back to an older one), so
        that :meth:`clean` does not remove a run's checkpoints on upgrade. Returns their names."""
        if not os.path.isdir(self.checkpoints) or os.path.isfile(os.path.join(self.checkpoints, FORMAT)):
            return []
        adopted = []
        for name in sorted(os.listdir(self.checkpoints)):
            path = os.path.join(self.checkpoints, name)
            if (name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and os.path.isdir(path)
                    and os.path.isfile(os.path.join(path, STATE)) and not self.is_complete(path)):
                atomic_write(os.path.join(path, COMPLETE), f"{int(name[len(_PREFIX):])}\n")
                adopted.append(name)
        self.mark_format()
        return adopted

    def mark_format(self) -> None:
        os.makedirs(self.checkpoints, exist_ok=True)
        if not os.path.isfile(os.path.join(self.checkpoints, FORMAT)):
            atomic_write(os.path.join(self.checkpoints, FORMAT), "2\n")

    def clean(self) -> list[str]:
        """Remove what an interrupted save left (temporaries, unmarked checkpoints); returns the
        names removed. Call on one rank, before any save."""
        removed = []
        if not os.path.isdir(self.checkpoints):
            return removed
        for name in sorted(os.listdir(self.checkpoints)):
            path = os.path.join(self.checkpoints, name)
            if not os.path.isdir(path) or not name.startswith(_PREFIX):
                continue
            if name.endswith(".tmp") or not self.is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
        return removed


def resolve_checkpoint(path: str) -> str:
    """A run folder (or its ``checkpoints/`` folder) means its newest complete checkpoint; any
    other path is returned unchanged. A run folder without a complete checkpoint is an error."""
    for root in (path, os.path.dirname(os.path.normpath(path))):
        folder = RunFolder(root)
        if os.path.normpath(path) in (os.path.normpath(folder.root), os.path.normpath(folder.checkpoints)) \
                and os.path.isdir(folder.checkpoints) and (
                    os.path.isfile(folder.latest_pointer) or folder.complete()):
            newest = folder.newest()
            if newest is None:
                raise CheckpointError(f"{path}: a training run folder without a complete checkpoint")
            return newest
    return path


class Checkpointer:
    """Saves and restores a run's checkpoints through ``megatron.core.dist_checkpointing``.

    ``rank``/``barrier`` make it usable from every rank of a job: directory work happens on rank 0
    between barriers, shards are written by every rank."""

    def __init__(self, folder: RunFolder, keep: int, rank: int, barrier: Callable[[], None],
                 log: Callable[[str], None] = print):
        self.folder, self.keep, self.rank, self.barrier, self.log = folder, keep, rank, barrier, log

    # -- saving ------------------------------------------------------------------------------
    def save(self, step: int, sharded_state: Callable[[], dict], record: dict,
             write_extra: Optional[Callable[[str], None]] = None) -> str:
        """Write checkpoint ``step`` (unless a complete one exists); see the module docstring for
        the order of operations."""
        from megatron.core import dist_checkpointing

        from .. import compat

        final = self.folder.checkpoint(step)
        if RunFolder.is_complete(final):
            self.log(f"checkpoint {os.path.basename(final)} exists and is complete; not written again")
            return final
        tmp = final + ".tmp"
        if self.rank == 0:
            self.folder.mark_format()
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        try:
            with compat.cpu_device_mode():
                compat.no_orphan_writers()
                dist_checkpointing.save(sharded_state(), tmp)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a full disk arrives as torch's CheckpointException
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = _root_cause(exc)
            raise OSError(f"writing checkpoint {final} failed ({cause}); the previous checkpoint is "
                          "kept") from exc
        self.barrier()
        if self.rank == 0:
            fault_point("after_shards")
            atomic_write(os.path.join(tmp, STATE), json.dumps(record, indent=1))
            if write_extra is not None:
                write_extra(tmp)
            fault_point("before_rename")
            if os.path.exists(final):  # an unmarked leftover: never a checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder.checkpoints)
            fault_point("before_marker")
            atomic_write(os.path.join(final, COMPLETE), f"{step}\n")
            fault_point("before_latest")
            atomic_write(self.folder.latest_pointer, os.path.basename(final))
            fault_point("before_rotate")
            self._rotate(final)
        self.barrier()
        self.log(f"saved {final}")
        return final

    def _rotate(self, newest: str) -> None:
        old = [p for _, p in self.folder.complete() if os.path.abspath(p) != os.path.abspath(newest)]
        for path in old[: max(0, len(old) - (self.keep - 1))]:
            os.remove(os.path.join(path, COMPLETE))  # unmarked first: a kill below leaves no trusted half
            fault_point("mid_rotate")
            shutil.rmtree(path, ignore_errors=True)

    # -- restoring ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Rank 0 removes what interrupted saves left; every rank waits."""
        if self.rank == 0:
            adopted = self.folder.adopt_legacy()
            if adopted:
                self.log(f"checkpoint(s) {', '.join(adopted)} from an earlier version adopted as complete")
            removed = self.folder.clean()
            if removed:
                self.log(f"removed incomplete checkpoint(s) {', '.join(removed)} left by an interrupted save")
        self.barrier()

    def candidates(self) -> list[str]:
        """Complete checkpoints, newest first (warning when ``latest`` disagrees)."""
        newest = self.folder.newest(warn=self.rank == 0)
        if newest is None:
            return []
        return [p for _, p in reversed(self.folder.complete())]

    @staticmethod
    def read_record(path: str) -> dict:
        try:
            with open(os.path.join(path, STATE)) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{os.path.join(path, STATE)}: unreadable ({exc})") from None

    def load_first(self, load: Callable[[str, dict], None], all_ok: Callable[[bool], bool]) -> Optional[dict]:
        """Try ``load(path, record)`` on each candidate, newest first, until one succeeds on every
        rank (``all_ok`` reduces a local success flag over the job). Returns the loaded record, or
        None when the run has no checkpoint. A run whose checkpoints all fail is an error: starting
        from scratch would overwrite them."""
        tried = []
        for path in self.candidates():
            error = None
            try:
                record = self.read_record(path)
                load(path, record)
            except (ConfigError, TrainingError):
                raise  # the run config disagrees with the checkpoint: no fallback
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
                error = exc
            if all_ok(error is None):
                if tried:
                    warnings.warn(f"resumed from {os.path.basename(path)}: newer checkpoint(s) "
                                  f"{', '.join(tried)} could not be loaded")
                return record
            tried.append(os.path.basename(path))
            if self.rank == 0:
                why = f"{type(error).__name__}: {_root_cause(error)[:200]}" if error else "on another rank"
                warnings.warn(f"checkpoint {path} could not be loaded ({why}); trying an older one")
        if tried:
            raise CheckpointError(
                f"{self.folder.checkpoints}: no checkpoint could be loaded (tried {', '.join(tried)}); "
                "move them away to start again"
            )
        return None
