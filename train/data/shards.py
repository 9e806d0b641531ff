"""The on-disk token shard: a self-describing file of token ids and the offsets where documents start.

Layout (little-endian), written once and never modified:

    offset  size  field
    0       8     magic b"TGPTSHRD"
    8       4     format version (SHARD_VERSION)
    12      4     bytes per token: 2 (uint16, vocabularies up to 65,536) or 4 (uint32)
    16      8     n_tokens
    24      8     n_docs
    32      32    the tokenizer's fingerprint (sha256 of its description, `tokenizer_fingerprint`)
    64      n_tokens * itemsize   the token ids
    ...     n_docs * 8            uint64 offsets into the tokens where each document starts (the first is 0)

The manifest (``manifest.json`` next to the shards) holds each shard's sha256 over everything after the
header (`ShardWriter.sha256`), so a flipped bit is found by ``python -m train.prepare --verify``; opening
a shard checks the magic, the version, the tokenizer and that the file's size matches its header, which
finds a truncated or foreign file at once, without reading the tokens.

A shard is written to a temp file and renamed into place when complete (gpt/files.py): a file with a
shard's name is always a whole shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gpt.files import atomic_open

from ..errors import DataError

MAGIC = b"TGPTSHRD"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_BYTES = HEADER.size  # 64
assert HEADER_BYTES == 64

_REPREPARE = "delete it and run `python -m train.prepare` with the same data flags again"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of a tokenizer's description: two tokenizers with the same fingerprint encode alike."""
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Writes one shard atomically: ``add(tokens, doc_starts)`` any number of times, then ``close()``.

    ``doc_starts`` are offsets into the ``tokens`` of that call; they are shifted by the tokens already
    written. Nothing is visible at ``path`` until ``close()`` renames the finished file into place;
    ``abort()`` (or an exception inside ``with``) leaves ``path`` as it was.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, fingerprint: str):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"shard tokens are uint16 or uint32, not {self.dtype}")
        self.fingerprint = bytes.fromhex(fingerprint)
        self.n_tokens = 0
        self._starts: list[np.ndarray] = []
        self._hash = hashlib.sha256()
        self._ctx = atomic_open(self.path, "wb")
        self._f = self._ctx.__enter__()
        self._done = False
        self.sha256: str | None = None
        self._write(b"\0" * HEADER_BYTES)  # the header is written last, when the counts are known

    def _write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """End the temp file after a failed write: atomic_path removes it and, when the disk is full, raises
        DiskFullError (one line: the path and the space) instead of the OSError."""
        if self._done:
            raise e
        self._done = True
        if not self._ctx.__exit__(type(e), e, e.__traceback__):
            raise e

    def add(self, tokens: np.ndarray, doc_starts: Sequence[int] | np.ndarray = ()) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids outside {self.dtype}")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._write(data)
        self._hash.update(data)
        starts = np.asarray(doc_starts, dtype=np.int64)
        if starts.size:
            if starts.min() < 0 or starts.max() >= max(len(tokens), 1):
                raise ValueError("document starts must lie inside the tokens given with them")
            self._starts.append(starts.astype(np.uint64) + np.uint64(self.n_tokens))
        self.n_tokens += len(tokens)

    @property
    def n_docs(self) -> int:
        return sum(len(s) for s in self._starts)

    def close(self) -> "ShardInfo":
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.uint64)
        data = starts.astype("<u8").tobytes()
        self._write(data)
        self._hash.update(data)
        try:
            self._f.seek(0)
            self._f.write(HEADER.pack(MAGIC, SHARD_VERSION, self.dtype.itemsize, self.n_tokens, len(starts),
                                      self.fingerprint))
        except OSError as e:
            self._fail(e)
        self._done = True
        self._ctx.__exit__(None, None, None)  # fsync, chmod, rename (a full disk: DiskFullError)
        self.sha256 = self._hash.hexdigest()
        return ShardInfo(self.path.name, self.n_tokens, len(starts), self.sha256,
                         HEADER_BYTES + self.n_tokens * self.dtype.itemsize + 8 * len(starts))

    def abort(self) -> None:
        """Remove the temp file (nothing if the writer is already closed or failed)."""
        if self._done:
            return
        self._done = True
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.sha256 is None:
                self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the manifest lists it."""

    file: str
    tokens: int
    docs: int
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return dict(file=self.file, tokens=self.tokens, docs=self.docs, sha256=self.sha256, bytes=self.bytes)


@dataclass
class Shard:
    """An open shard: ``tokens`` (a read-only memmap) and ``doc_starts`` (int64 offsets into it)."""

    path: Path
    tokens: np.ndarray = field(repr=False)
    doc_starts: np.ndarray = field(repr=False)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


def open_shard(path: str | os.PathLike, fingerprint: str | None = None) -> Shard:
    """Open a shard, checking its header against its size (and the tokenizer, when given): a
    truncated, foreign or differently tokenized file is a DataError naming it and the fix."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror}): {_REPREPARE}") from None
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise DataError(f"{path} is not a token shard (bad header): {_REPREPARE}")
    _, version, itemsize, n_tokens, n_docs, fp = HEADER.unpack(head)
    if version != SHARD_VERSION:
        raise DataError(f"shard {path} has format version {version}, this package reads {SHARD_VERSION}: "
                        f"{_REPREPARE}")
    if itemsize not in (2, 4):
        raise DataError(f"shard {path} is corrupt (token size {itemsize}): {_REPREPARE}")
    want = HEADER_BYTES + n_tokens * itemsize + 8 * n_docs
    if size != want:
        raise DataError(f"shard {path} is truncated or corrupt: {size:,} bytes, its header says {want:,}: "
                        f"{_REPREPARE}")
    if fingerprint is not None and fp.hex() != fingerprint:
        raise DataError(f"shard {path} was tokenized with a different tokenizer than this run's: {_REPREPARE}")
    dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
    if n_tokens:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    else:
        tokens = np.zeros(0, dtype)
    if n_docs:
        starts = np.fromfile(path, dtype="<u8", count=n_docs, offset=HEADER_BYTES + n_tokens * itemsize)
        starts = starts.astype(np.int64)
    else:
        starts = np.zeros(0, np.int64)
    return Shard(path, tokens, starts, fp.hex())


def shard_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of everything after the header: the value the manifest records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class TokenSplit:
    """One split (train or val) of a prepared dataset: its shards in order.

    ``n_bytes`` is the UTF-8 size of the text the split was tokenized from (for bits per byte).
    Documents never cross shards. ``array()`` is the tokens as one array (the single shard's memmap,
    or a concatenation, for small splits only).
    """

    name: str
    shards: list[Shard]
    n_bytes: int = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return len(self)

    @property
    def n_docs(self) -> int:
        return sum(len(s.doc_starts) for s in self.shards)

    def array(self) -> np.ndarray:
        if len(self.shards) == 1:
            return self.shards[0].tokens
        if not self.shards:
            return np.zeros(0, np.uint16)
        return np.concatenate([s.tokens for s in self.shards])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.array()
        return a if dtype is None else a.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        """``array().astype(dtype)``: the split's tokens as one new array (small splits only)."""
        return self.array().astype(dtype)
