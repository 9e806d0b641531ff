"""`decode` suite: generation tokens/sec and per-token latency, with and without the KV cache.

Generation is gpt.generate.generate_stream, greedy (temperature 0: no sampling noise), from a random
16-token prompt. CPU: fp32 weights with autocast to the device's default dtype (the product path,
`model.generate(dtype=...)`). CUDA: weights cast to bf16 (how a model is served), and the
memory-bandwidth utilization of a cached decode step: (weights + KV cache read per step) / per-token
latency / measured copy bandwidth. Each preset also gets batch-1 KV-cache rows of the same model with
int8 weight-only linear layers (gpt/quantize.py; kernels column `<mode>+int8`).
"""
from __future__ import annotations

import statistics
import time

import torch

from gpt import create_model
from gpt.config import PRESETS
from gpt.generate import generate_stream
from gpt.quantize import Int8Linear, quantize_int8, weight_nbytes
from gpt.runtime import dtype_name, resolve_dtype

from . import roofline
from .common import RunContext, format_table, log, progress
from .timing import sync

PROMPT_LEN = 16
BATCHES = (1, 8)


def default_presets(ctx: RunContext) -> list[str]:
    if ctx.presets:
        return ctx.presets
    return list(PRESETS) if ctx.device.type == "cuda" else ["tiny", "small"]


def _model(preset: str, kernels: str, ctx: RunContext):
    torch.manual_seed(0)
    model = create_model(preset, kernels=kernels).to(ctx.device).eval()
    if ctx.device.type == "cuda":
        model = model.to(torch.bfloat16)
        return model, None, "bfloat16 weights"
    dtype = resolve_dtype("auto", ctx.device)
    return model, dtype, f"fp32 weights, autocast {dtype_name(dtype)}"


def _token_times(model, idx: torch.Tensor, new_tokens: int, use_cache: bool, dtype, device) -> list[float]:
    """Seconds from the previous token (or the start) to each generated token; [0] includes the prefill."""
    times = []
    sync(device)
    prev = time.perf_counter()
    for _ in generate_stream(model, idx, new_tokens, temperature=0.0, use_cache=use_cache, dtype=dtype):
        sync(device)
        now = time.perf_counter()
        times.append(now - prev)
        prev = now
    return times


def _bandwidth(model, batch: int, context: int, seconds_per_step: float, ctx: RunContext) -> dict:
    c = model.config
    itemsize = next(model.parameters()).element_size()
    weights = model.num_params() * itemsize
    if any(isinstance(m, Int8Linear) for m in model.modules()):   # int8 linears (and head); one embedding row
        weights = weight_nbytes(model) - model.wte.weight.nbytes
    nbytes = roofline.decode_step_bytes(weights, 1, c.n_layer, batch, c.n_kv_head, context, c.head_dim, itemsize)
    gbps = nbytes / seconds_per_step / 1e9
    return {"bytes_per_step": nbytes, "gbps": gbps, "pct_copy_bw": 100 * gbps / ctx.calibration["copy_gbps"]}


def generation(preset: str, model, dtype, ctx: RunContext, new_tokens: int, batches=BATCHES,
               no_cache: bool = True) -> list[dict]:
    """tokens/s and per-token latency of greedy generation at each batch size, with the KV cache and
    (no_cache) recomputing the window at every step."""
    records = []
    vocab = model.config.vocab_size
    for batch in batches:
        idx = torch.randint(0, vocab, (batch, PROMPT_LEN), device=ctx.device)
        for use_cache in (True, False) if no_cache else (True,):
            progress(f"[decode] {preset} batch={batch} cache={use_cache} {new_tokens} tokens")
            _token_times(model, idx, 2, use_cache, dtype, ctx.device)  # warm-up
            times = _token_times(model, idx, new_tokens, use_cache, dtype, ctx.device)
            steps = times[1:] or times
            total = sum(times)
            rec = {"suite": "decode", "kind": "measured", "test": "generate", "preset": preset, "batch": batch,
                   "kv_cache": use_cache, "prompt": PROMPT_LEN, "new_tokens": new_tokens,
                   "tokens_per_s": batch * new_tokens / total,
                   "first_token_ms": times[0] * 1e3,
                   "per_token_ms": statistics.median(steps) * 1e3,
                   "per_token_p20_ms": _quantile(steps, 0.2) * 1e3, "per_token_p80_ms": _quantile(steps, 0.8) * 1e3}
            if ctx.device.type == "cuda" and use_cache:
                rec.update(_bandwidth(model, batch, PROMPT_LEN + new_tokens // 2, rec["per_token_ms"] / 1e3, ctx))
            records.append(rec)
    return records


def _int8_generation(preset: str, model, dtype, ctx: RunContext, new_tokens: int, kernels: str) -> list[dict]:
    """Batch-1 cached generation of the same weights as int8 linear layers (quantized in place: the float
    rows are measured first); a failure is a note and leaves the float rows."""
    try:
        records = generation(preset, quantize_int8(model), dtype, ctx, new_tokens, batches=(1,), no_cache=False)
    except Exception as e:
        ctx.note(f"decode {preset} kernels={kernels} int8 skipped: {type(e).__name__}: {str(e).strip()[:200]}")
        return []
    for r in records:
        r["quantize"] = "int8"
    return records


def _quantile(xs: list[float], q: float) -> float:
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=10, method="inclusive")[round(q * 10) - 1]


def default_contexts(block_size: int, steps: int, ctx: RunContext) -> list[int]:
    if ctx.contexts:
        return [c for c in ctx.contexts if c + steps < block_size]
    candidates = [64, 256] if ctx.quick else [32, 64, 128, 256, 512, 1024]
    return [c for c in candidates if c + steps < block_size]


def context_sweep(preset: str, model, dtype, ctx: RunContext) -> list[dict]:
    """Batch-1 per-token latency at a given context length: cached step vs recomputing the window."""
    steps = 4 if ctx.quick else 8
    records = []
    for context in default_contexts(model.config.block_size, steps, ctx):
        idx = torch.randint(0, model.config.vocab_size, (1, context), device=ctx.device)
        for use_cache in (True, False):
            progress(f"[decode] {preset} context={context} cache={use_cache}")
            times = _token_times(model, idx, steps + 1, use_cache, dtype, ctx.device)[1:]
            per_token = statistics.median(times)
            rec = {"suite": "decode", "kind": "measured", "test": "context", "preset": preset, "batch": 1,
                   "kv_cache": use_cache, "context": context, "steps_timed": steps,
                   "per_token_ms": per_token * 1e3, "tokens_per_s": 1 / per_token}
            if ctx.device.type == "cuda" and use_cache:
                rec.update(_bandwidth(model, 1, context, per_token, ctx))
            records.append(rec)
    return records


def run(ctx: RunContext) -> list[dict]:
    new_tokens = ctx.new_tokens or (32 if ctx.quick else 256)
    presets = default_presets(ctx)
    records = []
    for preset in presets:
        for kernels in ctx.kernels:
            try:
                model, dtype, precision = _model(preset, kernels, ctx)
                recs = generation(preset, model, dtype, ctx, new_tokens)
                # The context sweep on the largest preset run (it is the one where context matters most).
                if preset == presets[-1]:
                    recs += context_sweep(preset, model, dtype, ctx)
                recs += _int8_generation(preset, model, dtype, ctx, new_tokens, kernels)
            except Exception as e:  # out of memory, or a kernel being written: note it, run the other presets
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                ctx.note(f"decode {preset} kernels={kernels} skipped: {type(e).__name__}: {str(e).strip()[:200]}")
                continue
            for r in recs:
                r["precision"] = precision
                r["kernels"] = kernels + ("+int8" if r.get("quantize") else "")
            records += recs
    return records


GEN_COLUMNS = [("preset", "preset"), ("kernels", "kernels"), ("batch", "batch"), ("kv_cache", "KV cache"), ("new_tokens", "new tokens"),
               ("tokens_per_s", "tokens/s"), ("per_token_ms", "ms/token"), ("per_token_p20_ms", "p20"),
               ("per_token_p80_ms", "p80"), ("first_token_ms", "1st token ms"), ("gbps", "GB/s"),
               ("pct_copy_bw", "% copy BW")]
CTX_COLUMNS = [("preset", "preset"), ("kernels", "kernels"), ("context", "context"), ("kv_cache", "KV cache"), ("per_token_ms", "ms/token"),
               ("tokens_per_s", "tokens/s"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy BW")]


def print_tables(records: list[dict], ctx: RunContext) -> None:
    gen = [r for r in records if r["test"] == "generate"]
    precision = gen[0]["precision"] if gen else ""
    log(format_table(f"decode: greedy generation, prompt {PROMPT_LEN} tokens (MEASURED; {precision})",
                     gen, GEN_COLUMNS))
    sweep = [r for r in records if r["test"] == "context"]
    if sweep:
        log("")
        log(format_table("decode vs context length, batch 1 (MEASURED)", sweep, CTX_COLUMNS))
