"""Checkpoints: atomic writes, validated loads, and the RNG state needed for exact resume."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "tokenizer")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the run; the message says what to do."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically: a temp file in the same directory, fsync, then rename.
    A crash or kill at any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint; any problem is a CheckpointError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        hint = " (train one with `python -m train`, or pass --ckpt PATH)" if path.suffix == ".pt" else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file, e.g. {path / 'ckpt.pt'}")
    try:
        # weights_only=False: the checkpoint holds plain dicts, numpy RNG state and config dicts that
        # we wrote ourselves; only load checkpoints you trust.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}); use another file or retrain") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a tritongpt checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
