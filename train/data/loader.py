"""Batches on the device from a split: the batching mode, and a prefetch thread on CUDA.

`make_loader(split, mode, batch_size, block_size, ...)` returns a `BatchLoader` over a sampler of
train/data/batches.py (``windows`` or ``documents``; `resolve_batching` turns ``auto`` into one).
``next_batch()`` gives this rank's int64 ``x, y`` (batch_size, block_size) on the device.

Prefetch (on by default on CUDA): a background thread draws the next batches (depth 2) and pins
them in page-locked memory while the GPU computes; the main thread then copies them with
``.to(device, non_blocking=True)`` on its current stream. The thread is the sampler's only user and
draws in the same order, so the batches are the same with or without it, and ``state_dict()`` is
the sampler's state after the last batch *handed out*, not after the ones waiting in the queue:
a checkpoint resumes with the first batch the run had not trained on. ``prefetch=True`` on the CPU
uses the thread without pinning (for tests). Halting the thread (``close()``, ``load_state_dict``)
rewinds the sampler to that state, so the loader can go on afterwards without skipping a batch.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from .batches import BUFFER_DOCS, SAMPLERS
from .shards import TokenSplit

BATCHING_MODES = ("windows", "documents")


def resolve_batching(batching: str, split_method: str) -> str:
    """``auto``: ``documents`` for data split by whole documents, else ``windows`` (a corpus split by
    position, such as Shakespeare, has too few documents to begin rows at)."""
    if batching == "auto":
        return "documents" if split_method == "documents" else "windows"
    if batching not in BATCHING_MODES:
        raise ValueError(f"unknown batching {batching!r}: windows, documents or auto")
    return batching


def cropped_fraction(state: dict) -> float | None:
    """Cropped tokens / tokens drawn of a documents loader's state (None for windows, which crops none)."""
    if state.get("mode") != "documents":
        return None
    return state["cropped"] / state["drawn"] if state["drawn"] else 0.0


def make_sampler(split: TokenSplit, mode: str, batch_size: int, block_size: int, *, rank: int = 0,
                 world: int = 1, seed: int = 0, name: str | None = None, buffer_docs: int = BUFFER_DOCS):
    """The `WindowSampler` or `DocumentSampler` (train/data/batches.py) for `mode`."""
    if mode not in SAMPLERS:
        raise ValueError(f"unknown batching {mode!r}: {' or '.join(SAMPLERS)} (resolve auto first)")
    kw = {"buffer_docs": buffer_docs} if mode == "documents" else {}
    return SAMPLERS[mode](split, batch_size, block_size, rank=rank, world=world, seed=seed, name=name, **kw)


def make_loader(split: TokenSplit, mode: str, batch_size: int, block_size: int, *, rank: int = 0, world: int = 1,
                seed: int = 0, device="cpu", prefetch: bool | None = None, name: str | None = None,
                buffer_docs: int = BUFFER_DOCS) -> "BatchLoader":
    """A loader of this rank's rows of one seeded global schedule (see train/data/batches.py)."""
    sampler = make_sampler(split, mode, batch_size, block_size, rank=rank, world=world, seed=seed, name=name,
                           buffer_docs=buffer_docs)
    return BatchLoader(sampler, device, prefetch)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class BatchLoader:
    """Batches from a sampler on `device`; prefetch=None: a background thread on CUDA only."""

    def __init__(self, sampler, device="cpu", prefetch: bool | None = None, depth: int = 2):
        self.sampler = sampler
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.prefetch = self.pin if prefetch is None else bool(prefetch)
        self.depth = depth
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._state = sampler.state_dict() if self.prefetch else None  # after the last batch handed out

    @property
    def mode(self) -> str:
        return self.sampler.mode

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefetch:
            x, y = self._host(self.sampler.draw())
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._halt()
                raise item.error
            x, y, self._state = item
        if self.device.type == "cuda":
            if not x.is_pinned():
                x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    __next__ = next_batch

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """The sampler's state after the batches handed out so far (none waiting in the queue)."""
        return self._state if self.prefetch else self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.sampler.load_state_dict(state)
        if self.prefetch:
            self._state = self.sampler.state_dict()

    @property
    def cropped_fraction(self) -> float | None:
        return cropped_fraction(self.state_dict())

    def close(self) -> None:
        """Stop the prefetch thread (the loader may still be used: it starts again)."""
        self._halt()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the thread ---------------------------------------------------------------------------------
    def _host(self, rows: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        return (x.pin_memory(), y.pin_memory()) if pin else (x, y)

    def _start(self) -> None:
        self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._stop, self._queue), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _produce(self, stop: threading.Event, q: queue.Queue) -> None:
        try:
            while not stop.is_set():
                x, y = self._host(self.sampler.draw(), pin=self.pin)
                q.put((x, y, self.sampler.state_dict()))
        except BaseException as e:  # handed to the main thread, raised by next_batch
            q.put(_Failure(e))

    def _halt(self) -> None:
        """Stop the thread and rewind the sampler to the state after the last batch handed out."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():  # the producer may be blocked on a full queue: make room
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.01)
        self._thread = self._queue = self._stop = None
        self.sampler.load_state_dict(self._state)
