"""Atomic file writes shared by the package and its tools (directories: checkpoint/fsutil.py).

A file is written to ``.<name>.<pid>.tmp`` in the same directory, flushed to disk, then renamed
over ``path``: a reader sees the old file or the whole new one, never a part, and a failure
removes the temporary file. The new file gets the usual permissions (umask), or ``mode``.
:func:`save_figure` writes a matplotlib figure the same way.
"""
from __future__ import annotations

import os
from typing import Optional, Union


def atomic_write(path: str, data: Union[bytes, str], mode: Optional[int] = None) -> None:
    """Write ``data`` (text is encoded as UTF-8) to ``path`` atomically; ``mode`` sets the
    permission bits (e.g. ``0o755`` for a script)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def figure_png(fig, dpi: int = 110) -> bytes:
    """The matplotlib figure ``fig`` rendered as PNG bytes; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Render the matplotlib figure ``fig`` as a PNG (:func:`figure_png`), write it to ``path``
    with :func:`atomic_write`, and close the figure."""
    atomic_write(path, figure_png(fig, dpi))
