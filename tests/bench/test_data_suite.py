"""The `data` suite's parts: the generated corpus, the process-tree memory it reports, and one tiny run."""
import json
import sys

import numpy as np
import pytest

from bench import data_suite
from bench.common import RunContext

POOL = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4000)


def test_documents_have_web_page_lengths_and_the_asked_size():
    docs = [d for batch in data_suite.documents(POOL, 3 << 20, seed=1) for d in batch]
    lengths = np.array([len(d) for d in docs])
    assert 3 << 20 <= lengths.sum() < (3 << 20) + 100_000
    assert 1200 < np.median(lengths) < 3000 and 2000 < lengths.mean() < 5000  # median ~2 KB, mean ~3.3 KB
    assert all(d == d.strip() and d for d in docs)
    again = [d for batch in data_suite.documents(POOL, 3 << 20, seed=1) for d in batch]
    assert again == docs  # seeded


@pytest.mark.parametrize("fmt", data_suite.FORMATS)
def test_write_corpus_in_each_format_holds_the_documents(tmp_path, fmt):
    path, n_docs, n_bytes = data_suite.write_corpus(tmp_path, fmt, 1, POOL)
    if fmt == "jsonl":
        rows = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        assert len(rows) == n_docs and sum(map(len, rows)) == n_bytes
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).column("text").to_pylist()
        assert len(rows) == n_docs and sum(map(len, rows)) == n_bytes
    else:
        files = sorted(path.glob("*.txt"))
        assert len(files) == n_docs and sum(f.stat().st_size for f in files) == n_bytes
    assert n_bytes >= 1 << 20


def test_tree_memory_counts_the_children():
    """A child that holds 200 MB: the parent's tree peak includes it (PSS and RSS), within what the
    interpreter itself adds."""
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'b = bytearray(200 << 20); import time; time.sleep(1.5)'])")
    r = data_suite.run_measured([sys.executable, "-c", code], interval=0.05)
    assert r["returncode"] == 0
    assert 200 << 20 <= r["peak_pss"] <= r["peak_rss"] < 400 << 20


def test_print_tables_handles_both_record_kinds(capsys):
    ctx = RunContext(device=None, quick=True, dtype=None, kernels=["torch"])
    data_suite.print_tables([
        {"test": "prepare", "format": "jsonl", "input_mb": 1, "documents": 10, "workers": 2, "seconds": 1.0,
         "tokens": 1000, "tokens_per_s": 1000.0, "peak_pss_mb": 100.0, "peak_rss_mb": 150.0,
         "disk_bytes_per_token": 2.01, "disk_overhead_pct": 0.5, "shards": 2},
        {"test": "loader", "batching": "documents", "block_size": 256, "batches_per_s": 50.0,
         "tokens_per_s": 100000.0, "cropped_pct": 20.0}], ctx)
    out = capsys.readouterr().out
    assert "data preparation" in out and "loader" in out and "cropped %" in out


def test_the_nanogpt_baseline_gives_the_same_tokens_as_train_prepare(quick_run):
    """The baseline tokenizes the same documents into the same number of GPT-2 ids (each document plus
    its end-of-text token) as `python -m train.prepare`, so the two wall times compare the same work: the
    records of bench/run.py's quick run with --data-baseline (tests/jobs.py)."""
    pytest.importorskip("tiktoken")
    pytest.importorskip("datasets")
    _, doc, _ = quick_run
    assert not [n for n in doc["notes"] if n.startswith(("data", "suite data"))], doc["notes"]
    records = doc["results"]["data"]
    [base] = [r for r in records if r["test"] == "baseline"]
    [ours] = [r for r in records if r["test"] == "prepare" and r["workers"] == 2]
    assert (base["format"], base["input_mb"], base["workers"]) == ("jsonl", 1, 2) == (
        ours["format"], ours["input_mb"], ours["workers"])
    assert base["tokens"] == ours["tokens"] > ours["documents"] == base["documents"]
    assert base["cache_mb"] > 0 and base["disk_bytes_per_token"] > ours["disk_bytes_per_token"]
    assert ours["speedup_vs_nanogpt"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"])
