"""The exceptions a user can act on, by type: each message names the problem and the fix. The CLIs
catch these (and only these) to print one line on stderr and exit with code 2; anything else is a bug
and shows its traceback."""
from __future__ import annotations

import contextlib
import contextvars

try:
    from kernels import KernelsUnavailable
except ImportError:  # another distribution's `kernels` comes first on sys.path
    import kernels as _other
    raise ImportError(f"the `kernels` package at {getattr(_other, '__file__', None) or _other.__path__} is not "
                      f"tritongpt's (Hugging Face's `kernels`, which transformers 5.25+ requires, has the same "
                      f"import name): pip uninstall kernels, and pip install 'transformers<5.25'") from None


class ConfigError(ValueError):
    """A setting that cannot work: a model config field, preset, device, dtype, kernel mode or sampling
    option."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, unsafe to load without --trust-checkpoint, or does not fit
    the run."""


class DiskFullError(OSError):
    """A file could not be written because its disk (or quota) is full; the file it was replacing, if
    any, is intact (gpt/files.py writes through a temp file)."""


USER_ERRORS = (ConfigError, CheckpointError, KernelsUnavailable, DiskFullError)


class GPTWarning(UserWarning):
    """Something this project tells its user (once): a slower path taken and why. The sampler prints these
    as its own messages, apart from other libraries' warnings."""


# Whether the code raising an error runs under one of the command-line tools (set by their main()).
_UNDER_CLI = contextvars.ContextVar("tritongpt_under_cli", default=False)
_UNSET = object()


@contextlib.contextmanager
def command_line():
    """The block runs a CLI: error hints name flags (`--device cpu`) instead of arguments."""
    token = _UNDER_CLI.set(True)
    try:
        yield
    finally:
        _UNDER_CLI.reset(token)


def under_command_line() -> bool:
    """Whether a CLI's main() is running (error hints then name flags)."""
    return _UNDER_CLI.get()


def option(name: str, value=_UNSET, flag: str | None = None) -> str:
    """A setting as the caller spells it, for error hints: `--max-iters 5` under a CLI, `max_iters=5`
    from Python. flag: the CLI's spelling where it is not the argument's name in kebab-case."""
    if under_command_line():
        text = flag or "--" + name.replace("_", "-")
        return text if value is _UNSET or value is True else f"{text} {value}"
    return name if value is _UNSET else f"{name}={value!r}"

__all__ = ["ConfigError", "CheckpointError", "GPTWarning", "KernelsUnavailable", "USER_ERRORS", "command_line",
           "option", "under_command_line"]
