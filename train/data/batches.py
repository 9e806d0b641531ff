"""Training rows from a split's token shards: random windows, or rows packed from whole documents.

A split (a `TokenSplit`, train/data/shards.py) is shards of token ids plus the offset where each
document starts; every document's tokens are followed by the separator (the end-of-text id, or a
blank line for the char tokenizer), so documents packed side by side stay separated. A row is
``block_size + 1`` tokens: ``x = row[:-1]``, ``y = row[1:]``. Two samplers cut rows out of a split:

- `WindowSampler` (``--batching windows``; the default for corpora split by position, such as
  Shakespeare): every row is a window at a uniformly random position. A row may start or end in the
  middle of a document, and no token is thrown away. Over several shards the start positions form one
  index space in which shard i holds ``len_i - block_size`` of them, so a window never crosses a shard
  boundary and every position is equally likely; with a single shard the draws are exactly
  ``torch.randint(len - block_size, (world * batch_size,))``, as before shards existed.
- `DocumentSampler` (``--batching documents``; the default for corpora split by whole documents):
  every row begins at the first token of a document, so the model always sees a document from its
  start (no row opens with the tail of an unrelated text), at the price of cropping some tokens.
  Rows are filled best-fit from a buffer of `BUFFER_DOCS` documents drawn in a seeded shuffled
  order (a new permutation of every document of every shard each epoch): into the row's remaining
  space goes the longest buffered document that fits whole (ties: the earliest drawn), again and
  again; when none fits, the shortest buffered document is cropped to fill the row exactly and the
  rest of it is discarded (nanochat's rule). A document longer than a row enters the buffer as its
  first ``block_size + 1`` tokens, which fill one row on their own: its remainder is cropped, never
  seen. The cropped share (cropped tokens / tokens drawn) is logged; where it is large (corpora of
  long documents), ``--batching windows`` wastes nothing.

Both draw one global schedule of ``world * batch_size`` rows per batch, the same on every rank, and
each rank keeps its own ``batch_size`` of them: ranks see disjoint rows and together exactly what one
process with ``world * batch_size`` would see. Both have a small ``state_dict()`` (windows: the
generator's state; documents: seed, epoch, cursor into the permutation, the buffered documents and
the crop counters) that ``load_state_dict`` restores to continue with exactly the same rows: exact
resume, also on another number of ranks since the state does not depend on the rank. The state does
not depend on batch_size either; the rows of a batch are simply the next ones of the stream.

train/data/loader.py turns rows into tensors on the device (with a prefetch thread on CUDA).
"""
from __future__ import annotations

import bisect

import numpy as np
import torch

from ..errors import DataError
from .shards import TokenSplit

BUFFER_DOCS = 1000  # documents the best-fit packer chooses among (nanochat's buffer size)


def _check_window(n_tokens: int, block_size: int, name: str) -> None:
    if n_tokens < block_size + 1:
        raise DataError(
            f"{name} has {n_tokens} tokens but one training window needs block_size + 1 = {block_size + 1}: "
            f"use a smaller --block-size (at most {max(n_tokens - 1, 0)}) or more data"
        )


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("batches need a CPU torch.Generator, e.g. torch.Generator().manual_seed(seed)")


def get_batch(data: np.ndarray, batch_size: int, block_size: int, device, generator: torch.Generator,
              *, name: str = "the dataset", shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size + 1`` tokens from ``data`` (a 1-D array of ids).

    Returns int64 ``x, y`` of shape (B, T) with ``y`` = ``x`` shifted by one. The start positions
    come from ``generator`` (a CPU ``torch.Generator``): saving and restoring its state with
    ``get_state``/``set_state`` reproduces the same batches, which exact resume relies on.

    shard=(rank, world): every rank draws the starts of the global batch (world * batch_size) from
    the same generator and keeps its own run of batch_size of them, so ranks see different windows
    and together exactly the batch one process with world * batch_size would see. (`WindowSampler`
    draws the same windows from a one-shard split.)
    """
    _check_generator(generator)
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


def _check_shape(batch_size: int, block_size: int, rank: int, world: int) -> None:
    if batch_size < 1 or block_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need batch_size >= 1, block_size >= 1 and 0 <= rank < world; got {batch_size}, "
                         f"{block_size}, rank {rank} of {world}")


class WindowSampler:
    """Rows at uniformly random positions of a split, never across a shard boundary (module docstring).

    ``draw()`` returns this rank's rows of the next global batch as an int64 array
    (batch_size, block_size + 1). Shards shorter than a row hold no start position: their tokens are
    never drawn (a split whose shards are all that short is a DataError)."""

    mode = "windows"

    def __init__(self, split: TokenSplit, batch_size: int, block_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, generator: torch.Generator | None = None, name: str | None = None):
        _check_shape(batch_size, block_size, rank, world)
        self.name = name or f"the {split.name} split"
        self.shards = [s.tokens for s in split.shards]
        self.batch_size, self.block_size, self.rank, self.world = batch_size, block_size, rank, world
        counts = np.array([max(len(t) - block_size, 0) for t in self.shards], dtype=np.int64)
        if not counts.any():
            longest = max((len(t) for t in self.shards), default=0)
            if len(self.shards) <= 1:
                _check_window(longest, block_size, self.name)
            raise DataError(f"no shard of {self.name} holds one window of block_size + 1 = {block_size + 1} "
                            f"tokens (the longest has {longest}): use a smaller --block-size (at most "
                            f"{max(longest - 1, 0)}) or prepare the data with a larger --shard-tokens")
        self._counts, self._ends = counts, np.cumsum(counts)
        self.total = int(self._ends[-1])  # start positions in all
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        _check_generator(generator)
        self.generator = generator

    def starts(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, start offset) of this rank's rows of the next global batch."""
        b = self.batch_size
        g = torch.randint(self.total, (self.world * b,), generator=self.generator)
        g = g[self.rank * b:(self.rank + 1) * b].numpy()
        if len(self.shards) == 1:
            return np.zeros(len(g), np.int64), g
        shard = np.searchsorted(self._ends, g, side="right")  # shards with no start position are skipped
        return shard, g - (self._ends[shard] - self._counts[shard])

    def draw(self) -> np.ndarray:
        shard, starts = self.starts()
        offsets = np.arange(self.block_size + 1)
        if len(self.shards) == 1:
            return self.shards[0][starts[:, None] + offsets].astype(np.int64)
        rows = np.empty((len(starts), self.block_size + 1), np.int64)
        for s in np.unique(shard):
            mask = shard == s
            rows[mask] = self.shards[s][starts[mask][:, None] + offsets]
        return rows

    def state_dict(self) -> dict:
        return {"mode": self.mode, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        _check_mode(state, self.mode)
        self.generator.set_state(state["rng"])


class DocumentSampler:
    """Rows that each begin at a document, packed best-fit from a buffer of shuffled documents (see the
    module docstring for the rule). ``draw()`` returns this rank's rows of the next global batch as an
    int64 array (batch_size, block_size + 1); ``cropped`` / ``drawn`` count the tokens of the documents
    taken out of the buffer so far that no row holds / in all, over the global schedule (all ranks)."""

    mode = "documents"

    def __init__(self, split: TokenSplit, batch_size: int, block_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, buffer_docs: int = BUFFER_DOCS, name: str | None = None):
        _check_shape(batch_size, block_size, rank, world)
        self.name = name or f"the {split.name} split"
        self.batch_size, self.block_size, self.rank, self.world = batch_size, block_size, rank, world
        self.row = block_size + 1
        self.shards = [s.tokens for s in split.shards]
        self._starts = [np.asarray(s.doc_starts, dtype=np.int64) for s in split.shards]
        self._lens = [np.diff(np.append(st, len(t))) for st, t in zip(self._starts, self.shards)]
        self._first = np.cumsum([0] + [len(st) for st in self._starts])  # global id of each shard's first document
        self.n_docs = int(self._first[-1])
        if self.n_docs == 0:
            raise DataError(f"{self.name} records no document starts, so --batching documents has no document to "
                            f"begin a row with: prepare the data again with `python -m train.prepare`, or use "
                            f"--batching windows")
        if any((ln <= 0).any() for ln in self._lens):
            raise DataError(f"{self.name} has unordered or empty documents (its shard index is corrupt): prepare "
                            f"the data again with `python -m train.prepare`")
        self.buffer_size = max(1, min(buffer_docs, self.n_docs))
        self.seed = int(seed)
        self.epoch, self.cursor = 0, 0  # the next document to buffer: permutation(epoch)[cursor]
        self.cropped = self.drawn = 0
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None
        self._buffer: list[tuple[int, int, int, int]] = []  # sorted (tokens it fills, -draw order, doc id, length)
        self._order = 0

    # -- documents ----------------------------------------------------------------------------------
    def permutation(self, epoch: int) -> np.ndarray:
        """The order of every document in `epoch` (a function of the seed and the epoch only)."""
        if self._perm is None or self._perm[0] != (self.seed, epoch):
            perm = np.random.default_rng([self.seed % 2 ** 64, epoch]).permutation(self.n_docs)
            self._perm = ((self.seed, epoch), perm.astype(np.int32) if self.n_docs < 2 ** 31 else perm)
        return self._perm[1]

    def _locate(self, doc: int) -> tuple[int, int, int]:
        """(shard, start offset, length) of global document `doc`."""
        s = int(np.searchsorted(self._first, doc, side="right")) - 1
        i = doc - int(self._first[s])
        return s, int(self._starts[s][i]), int(self._lens[s][i])

    def _add(self, doc: int) -> None:
        length = self._locate(doc)[2]
        bisect.insort(self._buffer, (min(length, self.row), -self._order, doc, length))
        self._order += 1

    def _refill(self) -> None:
        while len(self._buffer) < self.buffer_size:
            perm = self.permutation(self.epoch)
            take = perm[self.cursor:self.cursor + self.buffer_size - len(self._buffer)]
            for doc in take.tolist():
                self._add(doc)
            self.cursor += len(take)
            if self.cursor >= self.n_docs:
                self.epoch, self.cursor = self.epoch + 1, 0

    def _pack_row(self) -> list[tuple[int, int]]:
        """The next row of the global schedule: its (document, tokens taken from its start) in order."""
        self._refill()
        space, row = self.row, []
        while space > 0:
            if not self._buffer:  # a buffer of fewer documents than one row holds
                self._refill()
            i = bisect.bisect_right(self._buffer, (space, float("inf"))) - 1  # the longest that fits whole
            fits = i >= 0
            fill, _, doc, length = self._buffer.pop(i if fits else 0)  # or the shortest, cropped to fit
            take = fill if fits else space
            row.append((doc, take))
            space -= take
            self.cropped += length - take
            self.drawn += length
        return row

    def plan(self) -> list[list[tuple[int, int]]]:
        """This rank's rows of the next global batch, as (document, tokens taken) lists; every rank packs
        all world * batch_size rows (only the document lengths, no tokens) and keeps its own."""
        rows = [self._pack_row() for _ in range(self.world * self.batch_size)]
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def draw(self) -> np.ndarray:
        out = np.empty((self.batch_size, self.row), np.int64)
        for r, row in enumerate(self.plan()):
            pos = 0
            for doc, take in row:
                s, start, _ = self._locate(doc)
                out[r, pos:pos + take] = self.shards[s][start:start + take]
                pos += take
        return out

    @property
    def cropped_fraction(self) -> float:
        return self.cropped / self.drawn if self.drawn else 0.0

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain values and one int64 tensor (the buffered documents, in the order they were drawn)."""
        buffered = [doc for _, _, doc, _ in sorted(self._buffer, key=lambda e: -e[1])]
        return {"mode": self.mode, "seed": self.seed, "n_docs": self.n_docs, "epoch": self.epoch,
                "cursor": self.cursor, "buffer": torch.tensor(buffered, dtype=torch.int64),
                "cropped": self.cropped, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; ValueError if it belongs to a split with another number of documents."""
        _check_mode(state, self.mode)
        if int(state["n_docs"]) != self.n_docs:
            raise ValueError(f"the saved document order is for a split of {int(state['n_docs']):,} documents, "
                             f"{self.name} has {self.n_docs:,}")
        buffered = torch.as_tensor(state["buffer"]).tolist()
        if not 0 <= int(state["cursor"]) <= self.n_docs or any(not 0 <= d < self.n_docs for d in buffered):
            raise ValueError(f"the saved document order does not fit {self.name}")
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self.cropped, self.drawn = int(state["cropped"]), int(state["drawn"])
        self._buffer, self._order = [], 0
        for doc in buffered:
            self._add(doc)


def _check_mode(state: dict, mode: str) -> None:
    if state.get("mode") != mode:
        raise ValueError(f"a {state.get('mode')} batching state cannot restore {mode} batching")


SAMPLERS = {"windows": WindowSampler, "documents": DocumentSampler}
