"""`serve` suite: python -m gpt.serve under load on the loopback address, at 1, 4 and 16 concurrent clients.

For each model, one server per concurrency level C, started with C slots (`--slots C`), gets the same
requests (prompts cut from the Shakespeare corpus, `max_tokens` tokens each, temperature 0.8 with a seed
per request), C of them in flight at a time, each streamed (server-sent events) by its own client thread.
Level 1 is the one-at-a-time baseline: the same requests served one after another, by a one-slot engine.
Measured per level: aggregate tokens/s (every completion token over the wall time of the level), its
speedup over level 1, time to first token (request sent -> first text chunk; p50/p95) and per-token
latency (the gaps between a request's chunks; p50/p95).

Models: `shakespeare_cpu` (configs/shakespeare_cpu.toml's model with the corpus' character tokenizer) and
`small` (with a BPE tokenizer of its 8192 tokens trained on the corpus), both untrained: the throughput of
a model does not depend on its weights, and the answers are not judged here (tests/gpt/test_serve.py does
that). The servers decode eagerly (the server's default); --full adds a compiled-engine pass (`--compile`)
unless --no-compile. The client threads run in this process, on the same CPU as the server, which decodes
with its default torch threads (on a CPU one per core but one; the `threads` column).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import torch

from gpt import GPT, create_model
from gpt.config import preset_config
from gpt.tokenizer import BPETokenizer, CharTokenizer

from .common import RunContext, format_table, log, progress
from .decode_suite import RECIPE, RECIPE_CONFIG

LEVELS = (1, 4, 16)
REPO = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP, TARGET_TTFT_P95 = 4.0, 1.0     # the recipe model at 16 clients, on the 2-core CPU


def default_presets(ctx: RunContext) -> list[str]:
    return ctx.presets or [RECIPE, "small"]


def corpus() -> str:
    from train.data.sources import shakespeare_text
    return shakespeare_text(REPO / "data")[0]


def write_checkpoint(preset: str, text: str, out: Path) -> Path:
    """An untrained model of `preset` with a tokenizer from the corpus, saved as a checkpoint in out/."""
    torch.manual_seed(0)
    if preset == RECIPE:
        from train.config import resolve_config
        tok = CharTokenizer.from_text(text)
        model = GPT(resolve_config({}, str(RECIPE_CONFIG)).model_config(tok.vocab_size))
    else:
        tok = BPETokenizer.train(text[:2_000_000], preset_config(preset).vocab_size)
        model = create_model(preset, vocab_size=tok.vocab_size)
    path = out / f"{preset}.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tok.to_dict()},
               path)
    return path


def make_requests(text: str, n: int, max_tokens: int, prompt_chars=(32, 96)) -> list[dict]:
    """n completion requests: prompts cut from the text at spread-out places, lengths between the bounds."""
    lo, hi = prompt_chars
    out = []
    for i in range(n):
        start = (i * 7919 * 613) % (len(text) - hi)
        out.append({"prompt": text[start:start + lo + (i * 37) % (hi - lo + 1)], "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True}})
    return out


# -- the server ------------------------------------------------------------------------------------------

class ServerProcess:
    """python -m gpt.serve on 127.0.0.1 (any free port) in a child process."""

    def __init__(self, ckpt: Path, slots: int, device: torch.device, kernels: str, compile: bool,
                 max_tokens: int, timeout: float = 900):
        cmd = [sys.executable, "-m", "gpt.serve", "--ckpt", str(ckpt), "--host", "127.0.0.1", "--port", "0",
               "--slots", str(slots), "--device", str(device), "--kernels", kernels, "--max-tokens", str(max_tokens),
               "--max-queued", "1024", "--drain-timeout", "0", "--compile" if compile else "--no-compile"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.command = " ".join(cmd[1:])
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        self.url, self.threads = None, None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.command} did not start: {''.join(self.lines)[-2000:]}")
            self.lines.append(line)
            found = re.search(r" on (http://\S+?)/? \(", line)
            self.url = found.group(1) if found else None
            threads = re.search(r", (\d+) threads?$", line.strip())     # the "loaded ..." line
            self.threads = int(threads.group(1)) if threads else self.threads
        # The rest of stderr is drained on a thread, so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._drain.start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def stream_request(url: str, body: dict, timeout: float = 600) -> dict:
    """Send one streaming completion request; the client's view of it: time to the first text chunk, the
    gaps between chunks, the completion tokens (the usage chunk's count)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", payload, {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        times, tokens, finish = [], None, None
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']['message']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                times.append(time.perf_counter())
                finish = choice["finish_reason"] or finish
    finally:
        conn.close()
    end = time.perf_counter()
    return {"ttft": times[0] - t0 if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens if tokens is not None else len(times), "seconds": end - t0, "finish": finish}


def run_load(url: str, requests: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """Every request, `concurrency` in flight at once; (each request's result, wall seconds)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: stream_request(url, body), requests))
    return results, time.perf_counter() - t0


def _q(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * _q(ttft, 0.5), "ttft_p95_ms": 1e3 * _q(ttft, 0.95),
            "token_p50_ms": None if not gaps else 1e3 * _q(gaps, 0.5),
            "token_p95_ms": None if not gaps else 1e3 * _q(gaps, 0.95)}


def measure(ckpt: Path, preset: str, requests: list[dict], ctx: RunContext, levels=LEVELS,
            compile: bool = False) -> list[dict]:
    """One server per level (slots = clients = the level), the same requests at each; level 1 first (the
    one-at-a-time baseline every speedup divides by)."""
    kernels = ctx.kernels[-1] if ctx.kernels else "auto"
    max_tokens = max(r["max_tokens"] for r in requests)
    records, base = [], None
    for level in sorted(levels):
        progress(f"[serve] {preset} {'compiled' if compile else 'eager'}: {level} client(s), {level} slot(s), "
                 f"{len(requests)} requests x {max_tokens} tokens")
        server = ServerProcess(ckpt, level, ctx.device, kernels, compile, max_tokens)
        try:
            run_load(server.url, requests[:level], level)               # warm-up: first-use costs
            results, wall = run_load(server.url, requests, level)
        finally:
            rc = server.stop()
        rec = {"test": "serve", "kind": "measured", "preset": preset, "device": str(ctx.device), "kernels": kernels,
               "mode": "compiled" if compile else "eager", "clients": level, "slots": level,
               "server_threads": server.threads,
               "max_tokens": max_tokens, "server_exit": rc, **summarize(results, wall)}
        base = base or (rec["tokens_per_s"] if level == 1 else None)
        rec["speedup"] = rec["tokens_per_s"] / base if base else None
        records.append(rec)
    return records


def run(ctx: RunContext) -> list[dict]:
    n_requests = 32 if ctx.quick else 64
    max_tokens = ctx.new_tokens or (64 if ctx.quick else 128)
    text = corpus()
    modes = [False] + ([True] if ctx.compile and not ctx.quick else [])
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for preset in default_presets(ctx):
            ckpt = write_checkpoint(preset, text, Path(tmp))
            requests = make_requests(text, n_requests, max_tokens)
            for compile in modes:
                records += measure(ckpt, preset, requests, ctx, compile=compile)
    for rec in records:
        if rec["preset"] == RECIPE and rec["clients"] == max(LEVELS) and rec["mode"] == "eager":
            met = rec["speedup"] >= TARGET_SPEEDUP and rec["ttft_p95_ms"] < 1e3 * TARGET_TTFT_P95
            ctx.note(f"serve target ({RECIPE}, {rec['clients']} clients: >= {TARGET_SPEEDUP:g}x the one-at-a-time "
                     f"tokens/s, p95 time to first token < {TARGET_TTFT_P95:g} s): {'met' if met else 'NOT met'} "
                     f"({rec['speedup']:.2f}x, p95 TTFT {rec['ttft_p95_ms']:.0f} ms, {rec['device']})")
    return records


def print_tables(records: list[dict], ctx: RunContext) -> None:
    log(format_table("serve: python -m gpt.serve on 127.0.0.1, streamed requests (MEASURED; level 1 = one at a time)",
                     records, [("preset", "model"), ("mode", "engine"), ("device", "device"),
                               ("server_threads", "threads"), ("clients", "clients"),
                               ("slots", "slots"), ("requests", "requests"), ("max_tokens", "max tokens"),
                               ("tokens_per_s", "tokens/s"), ("speedup", "vs 1 at a time"),
                               ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p95_ms", "TTFT p95 ms"),
                               ("token_p50_ms", "per token p50 ms"), ("token_p95_ms", "per token p95 ms")]))
