"""Random training batches from a 1-D array of token ids, and the check that a split holds a window."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


def _check_window(n_tokens: int, block_size: int, name: str) -> None:
    if n_tokens < block_size + 1:
        raise DataError(
            f"{name} has {n_tokens} tokens but one training window needs block_size + 1 = {block_size + 1}: "
            f"use a smaller --block-size (at most {max(n_tokens - 1, 0)}) or more data"
        )


def get_batch(data: np.ndarray, batch_size: int, block_size: int, device, generator: torch.Generator,
              *, name: str = "the dataset", shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size + 1`` tokens from ``data`` (a 1-D array of ids).

    Returns int64 ``x, y`` of shape (B, T) with ``y`` = ``x`` shifted by one. The start positions
    come from ``generator`` (a CPU ``torch.Generator``): saving and restoring its state with
    ``get_state``/``set_state`` reproduces the same batches, which exact resume relies on.

    shard=(rank, world): every rank draws the starts of the global batch (world * batch_size) from
    the same generator and keeps its own run of batch_size of them, so ranks see different windows
    and together exactly the batch one process with world * batch_size would see.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("get_batch needs a CPU torch.Generator, e.g. torch.Generator().manual_seed(seed)")
    _check_window(len(data), block_size, name)
    rank, world = shard
    starts = torch.randint(len(data) - block_size, (world * batch_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].numpy()
    return windows_at(data, starts, block_size, device)


def windows_at(data: np.ndarray, starts, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``x, y`` (len(starts), block_size) from the windows of ``block_size + 1`` tokens of
    ``data`` beginning at ``starts``; only those tokens are read from the memmap."""
    windows = data[np.asarray(starts)[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
