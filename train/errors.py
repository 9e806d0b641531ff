"""The training package's own exceptions: each names the problem and the fix, and the CLIs catch
them (and only them) to print one line on stderr with exit code 2."""
from __future__ import annotations

from gpt.errors import USER_ERRORS


class DataError(ValueError):
    """A problem with the data the user asked for; the message says what to change."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


# What the train CLIs turn into one line on stderr and exit code 2.
TRAIN_ERRORS = (*USER_ERRORS, DataError, TrainingError)
