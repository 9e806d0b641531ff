"""The exceptions a user can act on, by type: each message names the problem and the fix. The CLIs
catch these (and only these) to print one line on stderr and exit with code 2; anything else is a bug
and shows its traceback."""
from __future__ import annotations

from kernels import KernelsUnavailable


class ConfigError(ValueError):
    """A setting that cannot work: a model config field, preset, device, dtype, kernel mode or sampling
    option."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe to load without --trust-checkpoint, or does not fit
    the run."""


USER_ERRORS = (ConfigError, CheckpointError, KernelsUnavailable)

__all__ = ["ConfigError", "CheckpointError", "KernelsUnavailable", "USER_ERRORS"]
