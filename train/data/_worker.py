"""What a tokenizing process does with one unit of the input: read it, split its documents between train
and val, tokenize, and hand back token arrays and document starts (or, in the scan pass before a
tokenizer exists, the unit's character set, character counts or its share of the bpe sample).

The parent (train/data/tokens.py) runs these functions in spawned processes, or in itself for
``workers=1``. A spawned process imports only this module, numpy, pyarrow and the tokenizer libraries:
``gpt/__init__.py`` and ``gpt/errors.py`` import torch (about 0.5 GB per process), so ``light_imports``
loads ``gpt.tokenizer`` without them (see there). Bad input raises ``UnitError`` with a one-line message
(the parent re-raises it as ``DataError``).

A unit's payload is raw bytes of text or JSON-lines files (``("text" | "jsonl", [segment, ...])``, a
segment being ``(file index, path, byte offset, bytes, begins a document, ends it)``, or for JSON Lines
``(file index, path, byte offset, bytes, text field)``) or Arrow arrays of strings read by the parent
from parquet, CSV or a Hugging Face dataset (``("arrow", [(file index, first row, array), ...])``). One
text file is one document; one row is one document.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
import types

import numpy as np

# Characters per piece handed to the tokenizer: bounds the tokenizer's working memory (and tiktoken's
# time on long runs of non-space characters).
ENCODE_CHUNK = 1 << 16
_M64 = (1 << 64) - 1
_SAMPLE_SALT = 0x5851F42D4C957F2D
EOT = "<|endoftext|>"


class UnitError(ValueError):
    """Bad input met while reading or tokenizing a unit; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------
# Process set-up


def light_imports() -> None:
    """Let this fresh process import gpt's light modules (errors, files, optional, tokenizer, cli) without
    running ``gpt/__init__.py`` (the model, hence torch) or the ``kernels`` package (``gpt/errors.py`` imports
    it for one exception class, and it imports torch): a bare ``gpt`` package and a stand-in ``kernels``
    module holding only ``KernelsUnavailable``. Only for a process that imports nothing else of the
    package: a tokenizing worker, or the one python -m train.prepare hands its work to (train/data/_run.py).
    Nothing happens where gpt is already imported."""
    if "gpt" in sys.modules:
        return
    spec = importlib.util.find_spec("gpt")
    pkg = types.ModuleType("gpt")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    if "kernels" not in sys.modules:
        kernels = types.ModuleType("kernels")

        class KernelsUnavailable(RuntimeError):
            """The Triton kernels cannot run here (never raised in this process)."""

        kernels.KernelsUnavailable = KernelsUnavailable
        sys.modules["kernels"] = kernels
    sys.modules["gpt"] = pkg


def _exit_with_parent(parent: int) -> None:
    """End this process once its parent is gone: a pool's workers hold both ends of their task queue, so a
    parent killed with SIGKILL would otherwise leave them waiting on it forever."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def init_process(tokenizer: dict | None) -> None:
    """The initializer of a spawned worker: one thread per process for the tokenizer libraries, Ctrl-C left
    to the parent (which stops the pool), an exit when the parent dies, and the tokenizer rebuilt from its
    description."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()
    if tokenizer is not None:
        light_imports()
        from gpt.tokenizer import tokenizer_from_dict

        set_tokenizer(tokenizer_from_dict(tokenizer))


_STATE: dict = {}


def set_tokenizer(tok) -> None:
    """The tokenizer this process encodes with (None in the scan pass)."""
    _STATE.clear()
    if tok is None:
        return
    blank = tok.eot_id is None  # documents then end with a blank line, as they always have here
    sep = tok.encode("\n\n") if blank else [tok.eot_id]
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    _STATE.update(tok=tok, blank=blank, sep=np.asarray(sep, dtype=dtype), dtype=dtype,
                  sep_bytes=len(tok.decode(sep).encode("utf-8")), kind=tok.kind)


def _encode(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text, in the shard dtype; the texts are cut at safe points (_safe_cuts) first,
    which changes no id."""
    tok, dtype = _STATE["tok"], _STATE["dtype"]
    out = []
    if tok.kind == "char":
        for t in texts:
            try:
                out.append(tok.encode_array(t).astype(dtype))
            except ValueError as e:  # only a given tokenizer (a model's own) can meet a character it lacks
                raise UnitError(f"the model's own tokenizer cannot encode this text ({e}): train on text written in "
                                f"the characters it knows") from None
        return out
    pieces, owner = [], []
    for i, t in enumerate(texts):
        for p in _safe_cuts(t, ENCODE_CHUNK):
            pieces.append(p)
            owner.append(i)
    enc = getattr(tok, "_enc", None)  # GPT2Tokenizer's tiktoken Encoding
    if enc is not None and hasattr(enc, "encode_to_numpy"):
        ids = []
        for p in pieces:
            try:
                ids.append(enc.encode_to_numpy(p, allowed_special={EOT}))
            except UnicodeEncodeError:  # a lone surrogate (tiktoken's encode repairs it)
                ids.append(np.asarray(tok.encode(p), dtype=np.uint32))
    elif hasattr(tok, "encode_batch"):
        ids = [np.asarray(x, dtype=np.int64) for x in tok.encode_batch(pieces)] if pieces else []
    else:
        ids = [np.asarray(tok.encode(p), dtype=np.int64) for p in pieces]
    grouped: list[list[np.ndarray]] = [[] for _ in texts]
    for i, a in zip(owner, ids):
        grouped[i].append(a.astype(dtype, copy=False))
    for parts in grouped:
        out.append(parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, dtype))
    return out


# ----------------------------------------------------------------------------------------------
# Cutting text where tokenization does not notice


def _safe_cuts(text: str, size: int):
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


def _char_before(buf: bytes, i: int) -> str | None:
    """The character that ends just before byte ``i`` of ``buf`` (None if it is not valid UTF-8)."""
    j = i - 1
    while j > 0 and j > i - 4 and 0x80 <= buf[j] < 0xC0:
        j -= 1
    try:
        ch = buf[j:i].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return ch if len(ch) == 1 else None


def _char_at(buf: bytes, i: int) -> str | None:
    """The character that starts at byte ``i`` of ``buf`` (None if it is not valid UTF-8 or not all there)."""
    b = buf[i]
    n = 1 if b < 0x80 else 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 0
    if n == 0 or i + n > len(buf):
        return None
    try:
        return buf[i:i + n].decode("utf-8")
    except UnicodeDecodeError:
        return None


def safe_newline(buf: bytes, i: int) -> bool:
    """Whether the newline at byte ``i`` of ``buf`` is a safe cut (_safe_cuts' rule, in bytes): a character
    that is not a space on each side of it."""
    if i <= 0 or i + 1 >= len(buf):
        return False
    before, after = _char_before(buf, i), _char_at(buf, i + 1)
    return before is not None and after is not None and not before.isspace() and not after.isspace()


# ----------------------------------------------------------------------------------------------
# Document keys, for the split by documents and the bpe sample


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def doc_hash(a: int, b: int) -> int:
    """A 64-bit hash of a document's stable key: (file index, 0) for a text file; for a row (file index, the
    byte offset of its line) in JSON Lines, (file index, row) in parquet and CSV, (0, row) in a dataset."""
    return _splitmix64(_splitmix64(a) ^ b)


def _fraction(h: int) -> float:
    return (h >> 11) * 2.0 ** -53


def is_val(h: int, val_fraction: float) -> bool:
    return _fraction(h) < val_fraction


def in_sample(h: int, p: float) -> bool:
    return _fraction(_splitmix64(h ^ _SAMPLE_SALT)) < p


# ----------------------------------------------------------------------------------------------
# Reading a unit's documents: (key a, key b, text, begins a document, ends it)


def _decode_text(path: str, offset: int, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnitError(f"{path} is not UTF-8 text ({e.reason} at byte {offset + e.start:,}): convert it to "
                        f"UTF-8") from None
    if "\r" in text:  # universal newlines, as text files have always been read here
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _line_number(path: str, offset: int, index: int) -> int:
    """The 1-based line number of line ``index`` of the segment that starts at byte ``offset`` of ``path``."""
    n = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n + index + 1


def _jsonl_rows_slow(path: str, offset: int, data: bytes, field: str) -> list[tuple[int, str]]:
    """Each line parsed by Python's json, to name the first bad line exactly (file:line)."""
    rows = []
    start = 0
    for i, line in enumerate(data.split(b"\n")):
        line_start, start = start, start + len(line) + 1
        if not line.strip():
            continue
        where = lambda: f"{path}:{_line_number(path, offset, i)}"  # noqa: E731
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            raise UnitError(f"{where()}: not UTF-8 ({e.reason}): convert the file to UTF-8") from None
        except ValueError as e:
            raise UnitError(f"{where()}: not valid JSON ({e.msg}, column {e.colno}): fix or remove the line "
                            f"(every line of a JSON Lines file is one JSON object)") from None
        if not isinstance(obj, dict):
            raise UnitError(f"{where()}: a JSON {type(obj).__name__}, not an object: every line of a JSON Lines "
                            f"file is one JSON object")
        if field not in obj:
            raise UnitError(f"{where()}: no field {field!r}; the line has {', '.join(map(repr, obj)) or 'none'} "
                            f"(choose the text field with --text-field)")
        value = obj[field]
        if value is not None and not isinstance(value, str):
            raise UnitError(f"{where()}: field {field!r} holds {type(value).__name__}, not text (choose a text "
                            f"field with --text-field)")
        rows.append((line_start, value or ""))
    return rows


_BLANK = np.zeros(256, bool)
_BLANK[list(b" \t\r\n")] = True


def _line_starts(data: bytes) -> np.ndarray:
    """The byte offsets in ``data`` of the lines that are not blank."""
    b = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(b == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(b)]])
    nonempty = ends > starts
    filled = np.zeros(len(starts), bool)
    if nonempty.any():  # whether each line holds a byte that is not white space
        filled[nonempty] = np.logical_or.reduceat(~_BLANK[b], starts[nonempty])
    return starts[filled]


def _jsonl_rows(path: str, offset: int, data: bytes, field: str) -> list[tuple[int, str]]:
    """(offset in ``data``, text field) of every line of ``data`` (whole lines of a JSON Lines file), parsed
    by pyarrow; on anything unusual (a parse error, a missing or null value) by Python's json, which names
    the line."""
    if not data.strip():
        return []
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        table = pj.read_json(
            pa.py_buffer(data),
            read_options=pj.ReadOptions(use_threads=False, block_size=min(len(data) + 1, (1 << 31) - 1)),
            parse_options=pj.ParseOptions(explicit_schema=pa.schema([(field, pa.string())]),
                                          unexpected_field_behavior="ignore"))
        column = table.column(field)
        starts = _line_starts(data)
        if column.null_count == 0 and len(starts) == len(column):
            return list(zip(starts.tolist(), column.to_pylist()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
        pass
    return _jsonl_rows_slow(path, offset, data, field)


def _pieces(unit: int, payload) -> list[tuple[int, int, str, bool, bool]]:
    """The unit's documents, or parts of them: (key a, key b, text, begins a document, ends it)."""
    kind, body = payload
    out = []
    if kind == "text":
        for file_index, path, offset, data, begins, ends in body:
            out.append((file_index, 0, _decode_text(path, offset, data), begins, ends))
    elif kind == "jsonl":
        for file_index, path, offset, data, field in body:
            for start, text in _jsonl_rows(path, offset, data, field):
                out.append((file_index, offset + start, text, True, True))
    elif kind == "arrow":
        for file_index, row0, array in body:
            for i, text in enumerate(array.to_pylist()):
                out.append((file_index, row0 + i, text or "", True, True))
    else:
        raise ValueError(f"unknown unit kind {kind!r}")
    return out


# ----------------------------------------------------------------------------------------------
# The passes


class _Split:
    """One split's share of a unit, as a list of operations: a document starts, text, a separator."""

    def __init__(self):
        self.ops: list = []
        self.texts: list[str] = []

    def start(self):
        self.ops.append(("start",))

    def text(self, t: str):
        if t:
            self.ops.append(("text", len(self.texts)))
            self.texts.append(t)

    def sep(self):
        self.ops.append(("sep",))


def _utf8_len(t: str) -> int:
    return len(t) if t.isascii() else len(t.encode("utf-8"))


def _assemble(split: _Split, ids: list[np.ndarray]) -> dict:
    sep, dtype = _STATE["sep"], _STATE["dtype"]
    arrays, starts, pos, n_bytes = [], [], 0, 0
    for op in split.ops:
        if op[0] == "start":
            starts.append(pos)
        elif op[0] == "text":
            a = ids[op[1]]
            arrays.append(a)
            pos += len(a)
            n_bytes += _utf8_len(split.texts[op[1]])
        else:
            arrays.append(sep)
            pos += len(sep)
            n_bytes += _STATE["sep_bytes"]
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
    starts_a = np.asarray([s for s in starts if s < pos], dtype=np.int64)  # a document with no token: none
    return {"tokens": tokens, "starts": starts_a, "n_bytes": n_bytes}


def _assign(unit: int, pieces, split: tuple) -> tuple[_Split, _Split]:
    """Each piece's text to train or val, with document starts and separators (see the train.data docstring).

    ("documents", val_fraction): a document is val when the hash of its key says so; every document ends
    with the separator. ("position", char offset, doc offset, cut, last train doc, last doc): the text before
    character ``cut`` of the whole corpus is train, the rest val, and the separator follows every document
    of a split but its last, exactly as the corpus used to be split and joined."""
    train, val = _Split(), _Split()
    blank = _STATE["blank"]
    if split[0] == "documents":
        vf = split[1]
        for a, b, text, begins, ends in pieces:
            out = val if is_val(doc_hash(a, b), vf) else train
            if begins:
                out.start()
            if ends and blank:
                text = text.rstrip("\n")
            out.text(text)
            if ends:
                out.sep()
        return train, val
    _, g, d, cut, train_last, doc_last = split
    for _, _, text, begins, ends in pieces:
        n = len(text)
        k = min(max(cut - g, 0), n)
        head, tail = text[:k], text[k:]
        if begins and (g < cut or (n == 0 and g <= cut)):
            train.start()
        train_sep = ends and g + n <= cut and d != train_last
        if train_sep and blank:
            head = head.rstrip("\n")
        train.text(head)
        if train_sep:
            train.sep()
        if g + n > cut and (begins or g <= cut):
            val.start()
        val_sep = ends and g + n > cut and d != doc_last
        if val_sep and blank:
            tail = tail.rstrip("\n")
        val.text(tail)
        if val_sep:
            val.sep()
        g += n
        d += ends
    return train, val


def tokenize_unit(task: tuple) -> dict:
    """(unit index, payload, split) -> {"train": {tokens, starts, n_bytes}, "val": {...}, "docs": n}."""
    unit, payload, split = task
    pieces = _pieces(unit, payload)
    train, val = _assign(unit, pieces, split)
    ids = _encode(train.texts + val.texts)
    return {"unit": unit, "train": _assemble(train, ids[:len(train.texts)]),
            "val": _assemble(val, ids[len(train.texts):]), "docs": sum(p[4] for p in pieces)}


def scan_unit(task: tuple) -> dict:
    """The pass before the tokenizer exists. (unit index, payload, wants) with wants a dict of:
    "chars": each piece's (characters, ends a document), for the split by position; "charset": the
    code points the unit uses (char tokenizer); "sample": (val_fraction, p): the texts of the train
    documents in the bpe sample (each with probability p)."""
    unit, payload, wants = task
    pieces = _pieces(unit, payload)
    out: dict = {"unit": unit, "docs": sum(p[4] for p in pieces)}
    if wants.get("chars"):
        out["chars"] = [(len(p[2]), bool(p[4])) for p in pieces]
    if wants.get("charset"):
        seen = np.zeros(0, np.int64)
        for p in pieces:
            t = p[2]
            codes = np.frombuffer(t.encode("ascii"), np.uint8) if t.isascii() else \
                np.frombuffer(t.encode("utf-32-le"), np.uint32)
            if codes.size:
                counts = np.bincount(codes)
                seen = np.union1d(seen, np.flatnonzero(counts))
        out["charset"] = seen
    if wants.get("sample"):
        vf, p = wants["sample"]
        texts = []
        for a, b, text, _, _ in pieces:
            h = doc_hash(a, b)
            if not is_val(h, vf) and in_sample(h, p):
                texts.append(text)
        out["sample"] = texts
    return out
