"""The one command-line wrapper every tool runs through.

``run_main(main, argv)`` calls ``main(argv)`` and turns what escapes into an exit code and one
line on stderr:

=====================================  ======  ==========================================
what escaped                           exit    printed
=====================================  ======  ==========================================
nothing; ``main`` returned ``code``    code    whatever ``main`` printed
:class:`~megatron_nbdiff.errors.NBDiffError` (any bad input)   2   ``error: <message>``
``FloatingPointError`` (NaN/Inf loss)  3       ``error: <message>``
``OSError`` (disk full, permissions)   1       ``error: <message>``
``KeyboardInterrupt`` (Ctrl-C)         130     ``error: interrupted``
=====================================  ======  ==========================================

Before ``main`` runs it filters the warnings megatron-core prints on every import on a CPU
machine (no Transformer Engine, no Apex: expected there, noise for a user). ``--verbose`` on any
tool's command line keeps them.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from .errors import ConfigError, NBDiffError

EXIT_OK = 0
EXIT_OS = 1
EXIT_USAGE = 2
EXIT_NAN = 3
EXIT_REQUEUE = 75  # "temporary failure": a run saved after a signal and wants to be requeued
EXIT_INTERRUPTED = 130

# Messages megatron-core (and its imports) warn with on every start on a machine without
# Transformer Engine, Apex or CUDA. They say nothing a CPU user can act on.
EXPECTED_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*tp_group is None.*",
    r".*MLP requires ffn_hidden_size.*",
    r".*flex_attention called without torch.compile.*",
)


def quiet_expected_warnings() -> None:
    """Ignore :data:`EXPECTED_WARNINGS` for the rest of this process (and, through
    ``PYTHONWARNINGS``-free filters, for nothing else)."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
    # megatron-core logs the Transformer Engine / Apex notice through logging too
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not ("Transformer Engine" in msg or "Apex" in msg)

    logging.getLogger().addFilter(_Drop())
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).addFilter(_Drop())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`~megatron_nbdiff.errors.ConfigError`, so that a
    bad flag is one ``error:`` line and exit 2 like every other bad input."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def error(message: str) -> None:
    """Print one ``error: ...`` line to stderr (only the first line of ``message``)."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"error: {first}", file=sys.stderr, flush=True)


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main`` under the exit-code contract above; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in args:
        args.remove("--verbose")
    else:
        quiet_expected_warnings()
    try:
        code = main(args)
        return EXIT_OK if code is None else int(code)
    except NBDiffError as exc:
        error(str(exc))
        return EXIT_USAGE
    except FloatingPointError as exc:
        error(str(exc))
        return EXIT_NAN
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        error(str(exc) or type(exc).__name__)
        return EXIT_OS


def entry(main: Callable[[Optional[Sequence[str]]], int]) -> Callable[[], None]:
    """A console-script entry point for ``main``: ``sys.exit(run_main(main))``."""

    def _console() -> None:
        sys.exit(run_main(main))

    _console.__doc__ = main.__doc__
    return _console


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
