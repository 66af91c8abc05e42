"""Output directories of the converters: checked before any work, written atomically, and
replaced only when they are this project's.

:func:`check_output_dir` refuses, before anything expensive:

- the current directory or one of its parents, ``/`` and the home directory (with or without
  ``--force``);
- an output that overlaps an input (the input is inside it or is it, or it is inside the input);
- an existing path that is a symbolic link or not a directory;
- an existing non-empty directory without ``force``;
- with ``force``, a non-empty directory that is not a checkpoint this project wrote (it has no
  ``nbdiff.json``): ``--force`` replaces an earlier conversion, never a folder of other files.

:class:`AtomicOutputDir` writes into ``<out>.tmp-<pid>`` (a sibling: the same filesystem) and
commits with one rename when ``<out>`` does not exist, or, when it does, with one
``renameat2(RENAME_EXCHANGE)`` that swaps the two directories atomically; the old output (now at
the temporary name) is deleted afterwards. A kill at any instant leaves ``<out>`` holding the old
output or the new one, never neither and never a mixture. Where the kernel or filesystem cannot
exchange (not Linux, some network filesystems) the old output is renamed to ``<out>.old-<pid>``
and the new one into place: a kill between those two renames leaves the old output under
``.old-<pid>``. Inside the temporary directory ``nbdiff.json`` is written last, so a temporary
never looks like a finished checkpoint; temporaries of processes that no longer run are removed
when the next conversion to the same output starts.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from typing import Optional

from .errors import ConversionError
from .metadata import METADATA_NAME

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _protected(out_dir: str) -> Optional[str]:
    """Why ``out_dir`` may never be an output (None when it may)."""
    real = os.path.realpath(out_dir)
    if real == os.path.realpath(os.sep):
        return "is the root directory"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "is the home directory"
    if _inside(os.getcwd(), real):
        return "is the current directory or one of its parents"
    return None


def check_output_dir(out_dir: str, force: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output that would clobber work (call before doing anything expensive)."""
    if not out_dir:
        raise ConversionError("no output directory given")
    why = _protected(out_dir)
    if why:
        raise ConversionError(f"output directory {out_dir} {why}; choose a new directory for the output")
    for src in inputs:
        if _inside(src, out_dir) or _inside(out_dir, src):
            raise ConversionError(
                f"output directory {out_dir} overlaps the input {src}; choose another location"
            )
    if os.path.islink(out_dir):
        raise ConversionError(f"output path {out_dir} is a symbolic link; give a real directory")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConversionError(f"output path {out_dir} exists and is not a directory")
        if os.listdir(out_dir):
            ours = os.path.isfile(os.path.join(out_dir, METADATA_NAME))
            if not ours:
                raise ConversionError(
                    f"output directory {out_dir} exists and holds files that are not a checkpoint "
                    f"of megatron_nbdiff (no {METADATA_NAME}); --force only replaces an earlier "
                    "conversion: choose another output directory"
                )
            if not force:
                raise ConversionError(
                    f"output directory {out_dir} exists and is not empty; pass --force to replace it"
                )
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ConversionError(f"parent directory {parent} of the output does not exist")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_free_space(out_dir: str, need_bytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` before any work when the output's filesystem has less free space
    than ``need_bytes`` (the weights about to be written, plus 1%)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    free = shutil.disk_usage(parent).free
    need = int(need_bytes * 1.01)
    if free < need:
        raise OSError(errno.ENOSPC, f"not enough free space for the output: it needs about "
                                    f"{_size(need)}, {_size(free)} are free", parent)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Remove ``<out>.tmp-<pid>`` directories whose process no longer runs; returns their paths."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    pattern = re.compile(re.escape(base) + r"\.tmp-(\d+)")
    removed = []
    for name in os.listdir(parent):
        m = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if m and int(m.group(1)) != os.getpid() and not _pid_running(int(m.group(1))) \
                and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def exchange(a: str, b: str) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2``). Returns False where
    the system cannot (no such call, or the filesystem does not support it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {b} for its replacement: {os.strerror(err)}", b)


class AtomicOutputDir:
    """Context manager yielding the temporary directory; puts it in place of ``out_dir`` on
    success (module docstring) and removes it on any failure."""

    def __init__(self, out_dir: str, force: bool, inputs: tuple[str, ...] = ()):
        check_output_dir(out_dir, force, inputs)
        self.out_dir = os.path.abspath(out_dir)
        self.force = force
        self.inputs = inputs
        self.tmp = f"{self.out_dir}.tmp-{os.getpid()}"

    def __enter__(self) -> str:
        remove_stale_temporaries(self.out_dir)
        if os.path.lexists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            name = getattr(exc, "filename", None)
            if isinstance(exc, OSError) and isinstance(name, str) and name.startswith(self.tmp):
                # name the output the user asked for, not the temporary that no longer exists
                raise OSError(exc.errno, exc.strerror, self.out_dir + name[len(self.tmp):]) from None
            return False
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False

    def _commit(self) -> None:
        if not os.path.lexists(self.out_dir):
            os.rename(self.tmp, self.out_dir)
            return
        check_output_dir(self.out_dir, self.force, self.inputs)  # it may have changed meanwhile
        if exchange(self.tmp, self.out_dir):
            shutil.rmtree(self.tmp, ignore_errors=True)  # the old output, now at the temporary name
            return
        old = f"{self.out_dir}.old-{os.getpid()}"
        os.rename(self.out_dir, old)
        os.rename(self.tmp, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)


def pread_full(fd: int, offset: int, buf: memoryview, name: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (``os.preadv`` until done); a file that ends first
    is a :class:`ConversionError` naming ``name``."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ConversionError(f"{name} ended early (truncated while reading)")
        done += n
