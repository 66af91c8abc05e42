"""Atomic output directories: write into ``<out>.tmp-<pid>``, rename when complete.

A crash leaves only the ``.tmp-<pid>`` directory, which never looks like a finished checkpoint
(and inside it ``nbdiff.json`` is written last). An existing non-empty output directory is
refused unless ``force``; with ``force`` it is replaced only after the new one is complete.
"""
from __future__ import annotations

import os
import shutil

from .errors import ConversionError


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir: str, force: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output that would clobber work (call before doing anything expensive)."""
    if not out_dir:
        raise ConversionError("no output directory given")
    for src in inputs:
        if _inside(src, out_dir) or _inside(out_dir, src):
            raise ConversionError(
                f"output directory {out_dir} overlaps the input {src}; choose another location"
            )
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConversionError(f"output path {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not force:
            raise ConversionError(
                f"output directory {out_dir} exists and is not empty; pass --force to replace it"
            )
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise ConversionError(f"parent directory {parent} of the output does not exist")


class AtomicOutputDir:
    """Context manager yielding the temporary directory; renames it to ``out_dir`` on success
    and removes it on any failure."""

    def __init__(self, out_dir: str, force: bool, inputs: tuple[str, ...] = ()):
        check_output_dir(out_dir, force, inputs)
        self.out_dir = os.path.abspath(out_dir)
        self.force = force
        self.tmp = f"{self.out_dir}.tmp-{os.getpid()}"

    def __enter__(self) -> str:
        if os.path.lexists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False

    def _commit(self) -> None:
        old = None
        if os.path.lexists(self.out_dir):
            check_output_dir(self.out_dir, self.force)  # it may have changed meanwhile
            old = f"{self.out_dir}.old-{os.getpid()}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
