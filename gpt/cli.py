"""What every command-line tool of the package shares: flag spellings and error hints.

`command_line_main` wraps a tool's `main(argv)`: flags may be spelled with underscores as well as
dashes (`--max_iters 5` is `--max-iters 5`, `--no_compile` is `--no-compile`), and errors raised
inside name the flags to change (gpt.errors.option) instead of Python arguments.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

from .errors import command_line

UNDERSCORE_NOTE = "Every flag may also be spelled with underscores instead of dashes."


def kebab_flags(argv: Sequence[str]) -> list[str]:
    """argv with every long flag's name in kebab-case (its value, after '=' or in the next word, kept)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2 and not arg.startswith("---"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        elif arg == "--":  # everything after it is positional
            out += argv[len(out):]
            break
        out.append(arg)
    return out


def command_line_main(main: Callable[[list[str]], int]) -> Callable[..., int]:
    """main(argv) with kebab-cased flags and CLI error hints; argv defaults to sys.argv[1:]."""
    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        with command_line():
            return main(kebab_flags(sys.argv[1:] if argv is None else argv))
    return wrapped
