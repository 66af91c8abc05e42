"""Errors of checkpoint conversion and loading.

Every problem with the *input* (a checkpoint, a config, an argument) is a :class:`ConversionError`
whose message says what is wrong and, where there is one, what to do. The command-line tools
(:mod:`megatron_nbdiff.checkpoint.cli`, run through :func:`megatron_nbdiff.cli.run_main`) print it
as one ``error: ...`` line and exit 2, never with a traceback.
"""
from __future__ import annotations

from ..errors import CheckpointError


class ConversionError(CheckpointError):
    """Bad input to a conversion or a checkpoint reader: the message is meant for the user."""


class CheckpointMetadataError(ConversionError):
    """``nbdiff.json`` is missing or says something this reader does not understand."""
