"""The two ways a launch fails: bad input (:class:`LaunchError`, exit status 2 through
:func:`megatron_nbdiff.cli.run_main`) and a scheduler that is missing or refuses the job
(:class:`SubmitError`, an ``OSError``: exit status 1)."""
from __future__ import annotations

from ..errors import ConfigError


class LaunchError(ConfigError):
    """Bad input to the launcher (an option, the run config, a path): the message is for the user."""


class SubmitError(OSError):
    """``sbatch`` is missing or refused the job."""
