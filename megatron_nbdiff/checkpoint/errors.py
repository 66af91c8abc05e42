"""Errors of checkpoint conversion and loading.

Every problem with the *input* (a checkpoint, a config, an argument) is a :class:`ConversionError`
whose message says what is wrong and, where there is one, what to do. The command-line tools
print it as one ``error: ...`` line and exit non-zero, never with a traceback.
"""
from __future__ import annotations

from ..errors import CheckpointError


class ConversionError(CheckpointError):
    """Bad input to a conversion or a checkpoint reader: the message is meant for the user."""


class CheckpointMetadataError(ConversionError):
    """``nbdiff.json`` is missing or says something this reader does not understand."""


def run_tool(action) -> int:
    """Run a conversion for a command-line tool: print its one-line summary and return 0, or print
    ``error: ...`` and return 2 (bad input), 1 (an OS error: disk full, permissions; nothing was
    written) or 130 (interrupted)."""
    import sys

    try:
        result = action()
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    print(result.summary)
    return 0
