"""`train` suite: tokens/sec, MFU and peak memory of a full training step per preset and mode.

A step is what train/loop.py does for one micro-batch: forward under autocast, backward, gradient
clipping at 1.0, AdamW (train.optim.make_optimizer: fused on CUDA, foreach on CPU), zero_grad. Data are
random token ids at the preset's vocabulary. MFU = model.flops_per_token(T) x tokens/s / peak, with
the peak from gpt.runtime.peak_flops (datasheet table on known GPUs, a measured matmul on CPU).
"""
from __future__ import annotations

import statistics

import torch

from gpt import create_model
from gpt.config import PRESETS
from gpt.runtime import autocast, dtype_name, peak_flops
from kernels._runtime import triton_unavailable_reason
from train.config import TRAIN_PRESETS, TrainConfig
from train.optim import make_optimizer

from .common import RunContext, format_table, log, progress
from .timing import peak_memory, wall_times

# CPU batch x sequence in --quick (the preset defaults take seconds to minutes per step on a laptop CPU).
CPU_QUICK_SHAPES = {"tiny": (8, 256), "small": (4, 256), "medium": (2, 256), "large": (1, 256)}


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the device peak."""
    return flops_per_token * tokens_per_s / peak


def default_presets(ctx: RunContext) -> list[str]:
    if ctx.presets:
        return ctx.presets
    if ctx.device.type == "cuda":
        return list(PRESETS)
    ctx.note("train on CPU: presets tiny and small (medium and large take minutes per step on a CPU; "
             "pass --preset medium to run them)")
    return ["tiny", "small"]


def step_shape(preset: str, ctx: RunContext) -> tuple[int, int]:
    """(batch, sequence) for one step: --batch-size/--seq-len, else quick CPU shapes, else preset defaults."""
    default = (TRAIN_PRESETS[preset].get("batch_size", 32), PRESETS[preset]["block_size"])
    if ctx.device.type == "cpu" and ctx.quick:
        default = CPU_QUICK_SHAPES[preset]
    batch = ctx.batch_size or default[0]
    seq = min(ctx.seq_len or default[1], PRESETS[preset]["block_size"])
    return batch, seq


def modes(preset: str, ctx: RunContext) -> list[dict]:
    """(kernels, compile, dtype) combinations to time for `preset` on this device."""
    if ctx.device.type == "cuda":
        dtypes = [torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16]
    else:
        dtypes = [torch.float32, torch.bfloat16]
    compiles = [False]
    if ctx.compile and not (ctx.quick and ctx.device.type == "cpu" and preset != "tiny"):
        compiles.append(True)
    return [{"kernels": k, "compile": c, "dtype": d} for d in dtypes for k in ctx.kernels for c in compiles]


def measure(preset: str, mode: dict, batch: int, seq: int, ctx: RunContext) -> dict:
    device, dtype = ctx.device, mode["dtype"]
    rec = {"suite": "train", "kind": "measured", "preset": preset, "kernels": mode["kernels"],
           "compile": mode["compile"], "dtype": dtype_name(dtype), "batch": batch, "seq": seq,
           "tokens_per_step": batch * seq}
    torch.manual_seed(0)
    model = create_model(preset, kernels=mode["kernels"]).to(device)
    rec["params"] = model.num_params()
    rec["flops_per_token"] = model.flops_per_token(seq)
    optimizer = make_optimizer(model, TrainConfig(preset=preset), device)
    step_model = torch.compile(model) if mode["compile"] else model
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, seq), device=device)
    y = torch.randint(0, vocab, (batch, seq), device=device)
    losses = []

    def step():
        with autocast(device, dtype):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    warmup = 2 if mode["compile"] else 1
    timed = 3 if (ctx.quick or device.type == "cpu") else 10
    try:
        with peak_memory(device) as mem:
            first = wall_times(step, warmup, device)
            times = wall_times(step, timed, device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        rec["skipped"] = "out of memory at this batch and sequence"
        return rec
    rec.update(mem)
    median = statistics.median(times)
    rec.update(warmup_s=first, step_ms=median * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
               steps_timed=timed, tokens_per_s=batch * seq / median, final_loss=losses[-1])
    peak, source = peak_flops(device, dtype)
    rec.update(peak_tflops=peak / 1e12, peak_source=source, mfu=mfu(rec["flops_per_token"], rec["tokens_per_s"], peak))
    return rec


def run(ctx: RunContext) -> list[dict]:
    if "triton" not in ctx.kernels:
        reason = triton_unavailable_reason(ctx.device) or "not asked for: --kernels"
        ctx.note(f"train: kernels=triton not timed on {ctx.device.type} ({reason})")
        if ctx.quick and ctx.compile:
            ctx.note("train --quick on CPU: torch.compile timed for tiny only (use --full for every preset)")
    records = []
    for preset in default_presets(ctx):
        batch, seq = step_shape(preset, ctx)
        for mode in modes(preset, ctx):
            label = f"{preset} kernels={mode['kernels']} compile={mode['compile']} {dtype_name(mode['dtype'])}"
            progress(f"[train] {label} batch={batch} seq={seq}")
            try:
                rec = measure(preset, mode, batch, seq, ctx)
            except Exception as e:  # one broken mode (e.g. a kernel being written) must not end the run
                rec = {"suite": "train", "kind": "measured", "preset": preset, "kernels": mode["kernels"],
                       "compile": mode["compile"], "dtype": dtype_name(mode["dtype"]), "batch": batch, "seq": seq,
                       "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]}
                ctx.note(f"train {label} failed: {rec['error']}")
            records.append(rec)
    if any(r.get("mfu", 0) > 1 for r in records) and ctx.device.type != "cuda":
        ctx.note("train: an MFU above 100% means the CPU matmul peak was measured while the machine was busier "
                 "than during the step; re-run on an otherwise idle machine")
    return records


COLUMNS = [("preset", "preset"), ("kernels", "kernels"), ("compile", "compile"), ("dtype", "dtype"),
           ("batch", "batch"), ("seq", "seq"), ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"),
           ("mfu_pct", "MFU %"), ("peak_tflops", "peak TFLOP/s"), ("peak_memory_mb", "peak MB")]


def print_tables(records: list[dict], ctx: RunContext) -> None:
    rows = [{**r, "mfu_pct": 100 * r["mfu"]} for r in records if "tokens_per_s" in r]
    mem = "; ".join(dict.fromkeys(r["memory_kind"] for r in rows))
    src = "; ".join(dict.fromkeys(r["peak_source"] for r in rows))
    log(format_table(f"train: full step fwd+bwd+AdamW, random tokens (MEASURED; MFU peak: {src}; memory: {mem})",
                     rows, COLUMNS))
