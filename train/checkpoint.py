"""Writing training checkpoints: atomic saves, and the RNG states exact resume needs.

The file format and loading live in gpt/checkpoint.py. What training adds (optimizer, scaler, run state,
RNG states) is stored as tensors and plain values too, so every checkpoint loads with weights_only=True.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import FORMAT_VERSION


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


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain values (numpy's key array as an int64 tensor)."""
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": bit_generator, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["bit_generator"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)  # a format-1 checkpoint (read with --trust-checkpoint) holds numpy's own tuple
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
