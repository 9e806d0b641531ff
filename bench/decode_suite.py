"""`decode` suite: generation tokens/sec, per-token latency and the fraction of the memory roofline, eager vs
compiled (gpt/generation/compiled.py) vs compiled with int8 weights.

Generation is gpt.generation.generate_stream, greedy (temperature 0: no sampling noise), from a random
16-token prompt, with the weights in bf16 (how `python -m gpt.sample` serves them) and bf16 compute.
Modes, each at batch 1 and 8 (a quick run with the default presets compiles only the first preset, at
batch 1: `compiled_runs`):
- eager: the eager decoder with its KV cache (plus, at batch 1, recomputing the window every step);
- compiled: prefill and the decode step compiled with static shapes (CUDA graphs on a GPU);
- compiled+int8: the same after gpt.quantize.quantize_int8 (weight-only int8 linear layers and head).
The roofline fraction is the time the bytes a step must read (every weight once, each layer's K and V up to
the current context) would take at the measured copy bandwidth, over the measured step time; the
compile time (the first prefill and step calls) is reported apart from the timed tokens. The
`shakespeare_cpu` model is configs/shakespeare_cpu.toml's (character vocabulary of 75), untrained.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from gpt import GPT, create_model
from gpt.config import PRESETS
from gpt.generation import compiled, generate_stream
from gpt.quantize import Int8Linear, quantize_int8, weight_nbytes
from gpt.runtime import dtype_name

from . import roofline
from .common import RunContext, format_table, log, progress
from .timing import sync

PROMPT_LEN = 16
BATCHES = (1, 8)
RECIPE = "shakespeare_cpu"          # the CPU recipe's model, by its config file
RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_cpu.toml"
RECIPE_VOCAB = 75                   # characters of the default Shakespeare corpus
MODELS = (RECIPE, *PRESETS)


def default_presets(ctx: RunContext) -> list[str]:
    if ctx.presets:
        return ctx.presets
    return list(PRESETS) if ctx.device.type == "cuda" else [RECIPE, "tiny", "small"]


def build(preset: str, kernels: str) -> GPT:
    torch.manual_seed(0)
    if preset == RECIPE:
        from train.config import resolve_config
        return GPT(resolve_config({}, str(RECIPE_CONFIG)).model_config(RECIPE_VOCAB), kernels=kernels)
    return create_model(preset, kernels=kernels)


def _model(preset: str, kernels: str, ctx: RunContext):
    model = build(preset, kernels).to(ctx.device).eval().cast_weights_(torch.bfloat16)
    return model, torch.bfloat16, "bfloat16 weights and compute"


def _token_times(model, idx: torch.Tensor, new_tokens: int, use_cache: bool, dtype, device,
                 compile: bool = False) -> list[float]:
    """Seconds from the previous token (or the start) to each generated token; [0] includes the prefill."""
    times = []
    sync(device)
    prev = time.perf_counter()
    for _ in generate_stream(model, idx, new_tokens, temperature=0.0, use_cache=use_cache, dtype=dtype,
                             compile=compile):
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
               no_cache: bool = True, mode: str = "eager") -> list[dict]:
    """tokens/s, per-token latency and roofline fraction of greedy generation at each batch size, with the KV
    cache and (no_cache, eager only, batch 1) recomputing the window at every step. mode: eager | compiled;
    compiled rows carry compile_s, the seconds of the calls that compiled."""
    records = []
    vocab = model.config.vocab_size
    compile = mode != "eager"
    new_tokens = min(new_tokens, model.config.block_size - PROMPT_LEN)   # no re-prefill inside the timing
    for batch in batches:
        idx = torch.randint(0, vocab, (batch, PROMPT_LEN), device=ctx.device)
        for use_cache in (True, False) if (no_cache and not compile and batch == 1) else (True,):
            progress(f"[decode] {preset} {mode} batch={batch} cache={use_cache} {new_tokens} tokens")
            since = len(compiled.compile_log)
            _token_times(model, idx, 2, use_cache, dtype, ctx.device, compile)  # warm-up (and compilation)
            compile_s = sum(e.seconds for e in compiled.compile_log[since:])
            times = _token_times(model, idx, new_tokens, use_cache, dtype, ctx.device, compile)
            steps = times[1:] or times
            total = sum(times)
            rec = {"suite": "decode", "kind": "measured", "test": "generate", "preset": preset, "mode": mode,
                   "batch": batch, "kv_cache": use_cache, "prompt": PROMPT_LEN, "new_tokens": new_tokens,
                   "tokens_per_s": batch * new_tokens / total,
                   "first_token_ms": times[0] * 1e3,
                   "per_token_ms": statistics.median(steps) * 1e3,
                   "per_token_p20_ms": _quantile(steps, 0.2) * 1e3, "per_token_p80_ms": _quantile(steps, 0.8) * 1e3}
            if compile:
                rec["compile_s"] = compile_s
            if use_cache:
                rec.update(_bandwidth(model, batch, PROMPT_LEN + new_tokens // 2, rec["per_token_ms"] / 1e3, ctx))
            records.append(rec)
    return records


def _int8_generation(preset: str, model, dtype, ctx: RunContext, new_tokens: int, kernels: str,
                     batches=BATCHES) -> list[dict]:
    """Compiled generation of the same weights as int8 linear layers (quantized in place: the float rows are
    measured first); a failure is a note and leaves the float rows."""
    try:
        return generation(preset, quantize_int8(model), dtype, ctx, new_tokens, batches=batches,
                          mode="compiled+int8")
    except Exception as e:
        ctx.note(f"decode {preset} kernels={kernels} int8 skipped: {type(e).__name__}: {str(e).strip()[:200]}")
        return []


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
            if use_cache:
                rec.update(_bandwidth(model, 1, context, per_token, ctx))
            records.append(rec)
    return records


def compiled_runs(presets: list[str], ctx: RunContext) -> tuple[list[str], tuple[int, ...]]:
    """Which presets and batch sizes the compiled modes run. Each compiles a decoder, about a minute on
    a 2-core CPU with an empty compile cache (docs/results/2026-12-04-cpu-2core.md): a quick run with
    the default presets compiles only the first, at batch 1; --full or --preset compiles every one."""
    if ctx.quick and not ctx.presets:
        return presets[:1], (1,)
    return presets, BATCHES


def run(ctx: RunContext) -> list[dict]:
    new_tokens = ctx.new_tokens or (32 if ctx.quick else 256)
    presets = default_presets(ctx)
    compiled_presets, compiled_batches = compiled_runs(presets, ctx)
    records = []
    for preset in presets:
        for kernels in ctx.kernels:
            try:
                model, dtype, precision = _model(preset, kernels, ctx)
                recs = generation(preset, model, dtype, ctx, new_tokens)
                # The context sweep on the largest preset run (it is the one where context matters most).
                if preset == presets[-1]:
                    recs += context_sweep(preset, model, dtype, ctx)
                if ctx.compile and preset in compiled_presets:
                    recs += generation(preset, model, dtype, ctx, new_tokens, batches=compiled_batches,
                                       mode="compiled")
                    recs += _int8_generation(preset, model, dtype, ctx, new_tokens, kernels, compiled_batches)
            except Exception as e:  # out of memory, or a kernel being written: note it, run the other presets
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                ctx.note(f"decode {preset} kernels={kernels} skipped: {type(e).__name__}: {str(e).strip()[:200]}")
                continue
            for r in recs:
                r["precision"] = precision
                r["kernels"] = kernels
            records += recs
    return records


GEN_COLUMNS = [("preset", "preset"), ("kernels", "kernels"), ("mode", "mode"), ("batch", "batch"),
               ("kv_cache", "KV cache"), ("new_tokens", "new tokens"), ("tokens_per_s", "tokens/s"),
               ("per_token_ms", "ms/step"), ("per_token_p20_ms", "p20"), ("per_token_p80_ms", "p80"),
               ("first_token_ms", "1st token ms"), ("gbps", "GB/s"), ("pct_copy_bw", "% roofline"),
               ("compile_s", "compile s")]
CTX_COLUMNS = [("preset", "preset"), ("kernels", "kernels"), ("context", "context"), ("kv_cache", "KV cache"), ("per_token_ms", "ms/token"),
               ("tokens_per_s", "tokens/s"), ("gbps", "GB/s"), ("pct_copy_bw", "% copy BW")]


def print_tables(records: list[dict], ctx: RunContext) -> None:
    gen = [r for r in records if r["test"] == "generate"]
    precision = gen[0]["precision"] if gen else ""
    log(format_table(f"decode: greedy generation, prompt {PROMPT_LEN} tokens (MEASURED; {precision}; % roofline = "
                     f"bytes a step reads / measured copy bandwidth / step time)", gen, GEN_COLUMNS))
    sweep = [r for r in records if r["test"] == "context"]
    if sweep:
        log("")
        log(format_table("decode vs context length, batch 1 (MEASURED)", sweep, CTX_COLUMNS))
