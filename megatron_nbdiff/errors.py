"""The one error root of the package.

Every problem with what a user gave (a config, a checkpoint, a data set, an argument) raises a
subclass of :class:`NBDiffError` whose message names the problem: the file or field, what was
expected and what was found. The command-line wrapper (:mod:`megatron_nbdiff.cli`) prints it as
one ``error: ...`` line and exits 2. Anything else escaping is a bug in this package and keeps
its traceback.
"""
from __future__ import annotations


class NBDiffError(ValueError):
    """Bad input: the message is for the user (one line, names file/field, expected vs found)."""


class ConfigError(NBDiffError):
    """A run config (YAML, overrides) that does not type-check or validate."""


class DataError(NBDiffError):
    """A data set, corpus or tokenizer input that cannot be used."""


class TrainingError(NBDiffError):
    """A problem with a training run's inputs or run folder, reported before work where possible."""


class CheckpointError(NBDiffError):
    """A checkpoint (converted, adapted or a training checkpoint) that is missing, incomplete or
    corrupt."""
