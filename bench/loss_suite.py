"""`loss` suite: the output head and its cross-entropy, fused and unfused, alone and inside a training step.

Head + loss alone: forward + backward of the cross-entropy of x @ W^T at the GPT-2 vocabulary (50,257),
width 768 and N rows (16,384 with --full, 256 quick; --loss-shape ROWS,WIDTH,VOCAB), x (N, D) and W (V, D)
fp32 with their gradients, under autocast in --dtype, by default the dtype training's --dtype auto picks
(bf16 on CUDA and on CPUs with native bf16; float32 on other CPUs, where bf16 is
emulated and its large-K matmuls crawl):
  fused      gpt.ops' linear_cross_entropy per --kernels: the Triton kernel on CUDA, the chunked
             PyTorch path elsewhere (and on CUDA with --kernels torch)
  unfused    F.cross_entropy(F.linear(x, W).float(), t): the model's loss with --fused-loss off
  compiled   torch.compile of unfused
  torch_lce  F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions()): PyTorch's chunked op,
             where the installed torch has it

Training step: the `small` preset (--preset: the first one named) with the head's vocabulary,
--fused-loss on and off, random token ids, what train/loop.py does for one micro-batch (forward under
autocast, backward, clipping at 1.0, AdamW, zero_grad). --full: 32 x 512 = 16,384 tokens per
micro-batch where the unfused step is predicted to fit in this machine's available memory (on a CPU two
short unfused probe runs at 2,048 and 4,096 tokens give the slope), else 16 x 512 = 8,192, said in a
note; quick: 2 x 256 on a CPU, 32 x 512 on CUDA. --batch-size/--seq-len override.

Every measurement runs in a fresh process (`python -m bench.loss_suite --worker SPEC`), so that one
variant's memory cannot hide in another's. Peak memory is what the measured work adds to the process: on
a CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before it (taken after
glibc's malloc_trim, so that heap pages freed earlier and reused count again), on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before it. Head: the timed calls, measured
from after the inputs and the warm-up calls (the compiled variant's first call compiles), gradients
dropped. Training step: everything after the imports, so the model, its gradients and AdamW's state
count. Times are medians of the timed calls after the warm-up ones.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt import create_model, ops
from gpt.config import PRESETS
from gpt.runtime import DTYPES, autocast, cpu_has_native_bf16, dtype_name, resolve_dtype
from train.config import TrainConfig
from train.optim import make_optimizer

from .common import RunContext, format_table, log, progress
from .timing import sync, wall_times

REPO = Path(__file__).resolve().parent.parent
VOCAB, WIDTH = 50257, 768                   # the GPT-2 vocabulary; GPT-2 small's width
HEAD_ROWS = {"quick": 256, "full": 16384}
TRAIN_PRESET = "small"
FULL_SHAPES = ((32, 512), (16, 512))        # (batch, seq) of the training step, the first that fits
QUICK_SHAPE, QUICK_CPU_SHAPE = (32, 512), (2, 256)
PROBE_SHAPES = ((4, 512), (8, 512))         # full, on a CPU: unfused steps that predict the step's memory
MEMORY_MARGIN = 0.85                        # use at most this share of MemAvailable
TARGET_MEMORY_RATIO = 0.5                   # the target: the fused step's peak at most half the unfused one's


def has_torch_lce() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


# -- memory of this process ---------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise OSError(f"/proc/self/status has no {field}")


def _release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc malloc_trim), so that memory freed before a window
    and reused inside it is counted there; False where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """What the work between start() and peak_bytes() adds to this process at its peak (see the module
    docstring); `kind` says how it was measured."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "CUDA max allocated above the allocation before"
            return self
        trimmed = _release_free_heap()
        self.base = _status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = "CPU peak RSS (VmHWM, reset) above the RSS before" + ("" if trimmed else ", heap not trimmed")
            self.reset = True
        except OSError:
            self.kind = "CPU peak RSS since the process started (no reset possible) above the RSS before"
            self.reset = False
        return self

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = _status_bytes("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        return peak - self.base


# -- the worker: one measurement in this process ------------------------------------------------------

def unfused_loss(x, weight, targets):
    """The model's loss with the fused head off: the logits in the matmul dtype, the cross-entropy in fp32."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1)


def torch_lce_loss(x, weight, targets):
    return F.linear_cross_entropy(x, weight, targets, ignore_index=-1, options=torch.nn.LinearCrossEntropyOptions())


def head_fn(variant: str, kernels: str, device: torch.device):
    if variant == "fused":
        return ops.select(kernels, device).linear_cross_entropy
    if variant == "unfused":
        return unfused_loss
    if variant == "compiled":
        return torch.compile(unfused_loss)
    if variant == "torch_lce":
        return torch_lce_loss
    raise ValueError(f"unknown head variant {variant!r}")


def head_worker(spec: dict) -> dict:
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    n, d, v = spec["rows"], spec["width"], spec["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    w = (0.02 * torch.randn(v, d, generator=gen)).to(device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen).to(device)
    fn = head_fn(spec["variant"], spec["kernels"], device)
    losses = []

    def step():
        x.grad = w.grad = None
        with autocast(device, dtype):
            loss = fn(x, w, t)
        loss.backward()
        losses.append(loss.item())

    first = wall_times(step, spec["warmup"], device)
    x.grad = w.grad = None
    mem = PeakMemory(device).start()  # after the warm-up: a compiled variant's compilation is not its memory
    times = wall_times(step, spec["steps"], device)
    peak = mem.peak_bytes()
    grad_norm = (x.grad.double().square().sum() + w.grad.double().square().sum()).sqrt().item()
    return {"peak_mb": peak / 2 ** 20, "memory_kind": mem.kind, "first_call_s": first[0],
            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "steps_timed": len(times), "loss": losses[0], "grad_norm": grad_norm}


def train_worker(spec: dict) -> dict:
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    batch, seq = spec["batch"], spec["seq"]
    mem = PeakMemory(device).start()
    torch.manual_seed(0)
    model = create_model(spec["preset"], vocab_size=spec["vocab"], kernels=spec["kernels"],
                         fused_loss=spec["fused_loss"]).to(device)
    optimizer = make_optimizer(model, TrainConfig(preset=spec["preset"]), device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, spec["vocab"], (batch, seq), generator=gen).to(device)
    y = torch.randint(0, spec["vocab"], (batch, seq), generator=gen).to(device)
    losses = []

    def step():
        with autocast(device, dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    try:
        first = wall_times(step, spec["warmup"], device)
        times = wall_times(step, spec["steps"], device)
    except torch.cuda.OutOfMemoryError:
        return {"skipped": "CUDA out of memory at this batch and sequence"}
    median = statistics.median(times)
    return {"peak_mb": mem.peak_bytes() / 2 ** 20, "memory_kind": mem.kind,
            "process_rss_before_mb": mem.base / 2 ** 20 if device.type == "cpu" else None,
            "fused_in_use": model.fused_loss_in_use(), "params": model.num_params(), "warmup_s": sum(first),
            "step_ms": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
            "steps_timed": len(times), "tokens_per_s": batch * seq / median, "losses": losses}


# The keys of a worker's spec, by its "test" (what head_worker and train_worker read).
WORKER_KEYS = {"head": ("device", "dtype", "threads", "vocab", "variant", "kernels", "rows", "width", "warmup", "steps"),
               "train": ("device", "dtype", "threads", "vocab", "preset", "kernels", "fused_loss", "batch", "seq",
                         "warmup", "steps")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loss_suite", description="one measurement of the loss suite, "
                                "in this process; its result as one JSON line")
    p.add_argument("--worker", required=True, help="the measurement as a JSON object: \"test\" (head or train) and "
                   "the keys that test takes (bench/loss_suite.py WORKER_KEYS)")
    return p


def parse_spec(text: str) -> dict:
    """The --worker JSON, checked: a one-line SystemExit naming what is wrong and what it takes."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --worker is not valid JSON ({e})")
    test = spec.get("test") if isinstance(spec, dict) else None
    if test not in WORKER_KEYS:
        raise SystemExit(f"error: --worker needs \"test\": one of {', '.join(WORKER_KEYS)}; got {test!r}")
    missing = [k for k in WORKER_KEYS[test] if k not in spec]
    if missing:
        raise SystemExit(f"error: --worker {test} spec lacks {', '.join(missing)}; it takes "
                         f"{', '.join(WORKER_KEYS[test])}")
    return spec


def worker_main(argv: list[str]) -> int:
    spec = parse_spec(build_parser().parse_args(argv).worker)
    torch.set_num_threads(spec["threads"])
    result = (head_worker if spec["test"] == "head" else train_worker)(spec)
    print(json.dumps(result), flush=True)
    return 0


# -- the suite -------------------------------------------------------------------------------------------

def launch(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh process; its result, or {"error": ...} when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "bench.loss_suite", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode < 0:
        oom = " (out of memory: the kernel's OOM killer?)" if proc.returncode == -9 else ""
        return {"error": f"killed by signal {-proc.returncode}{oom}"}
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def predict_peak_mb(probes: list[tuple[int, float]], tokens: int) -> float:
    """The step's peak at `tokens` from (tokens, peak MB) probes, by the straight line through the two
    largest: the weights and optimizer state are constant, activations and logits grow with tokens."""
    (t0, m0), (t1, m1) = sorted(probes)[-2:]
    return m1 + (m1 - m0) / (t1 - t0) * (tokens - t1)


def pick_shape(candidates, probes: list[tuple[int, float]], rss_before_mb: float,
               available_mb: float) -> tuple[tuple[int, int] | None, list[float]]:
    """The first (batch, seq) whose predicted unfused process peak (the RSS before plus the step's peak)
    fits in MEMORY_MARGIN of the available memory, and every candidate's prediction in MB."""
    predicted = [rss_before_mb + predict_peak_mb(probes, b * s) for b, s in candidates]
    for shape, need in zip(candidates, predicted):
        if need <= MEMORY_MARGIN * available_mb:
            return shape, predicted
    return None, predicted


def head_runs(ctx: RunContext, dtype: torch.dtype) -> list[dict]:
    runs = [{"variant": "fused", "kernels": k} for k in ctx.kernels]
    if "triton" in ctx.kernels and dtype == torch.float32:
        ctx.note("loss: fused (triton) in float32 on CUDA is the chunked PyTorch path (gpt/ops.py); "
                 "--dtype bfloat16 measures the kernel")
    runs.append({"variant": "unfused", "kernels": None})
    if ctx.compile:
        runs.append({"variant": "compiled", "kernels": None})
    else:
        ctx.note("loss: the torch.compile variant not measured (--no-compile)")
    if has_torch_lce():
        runs.append({"variant": "torch_lce", "kernels": None})
    else:
        ctx.note(f"loss: torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions")
    return runs


def train_preset(ctx: RunContext) -> str:
    named = [p for p in ctx.presets or [] if p in PRESETS]
    if ctx.presets and (not named or len(ctx.presets) > 1):
        ctx.note(f"loss: the training step takes one model preset: {named[0] if named else TRAIN_PRESET}")
    return named[0] if named else TRAIN_PRESET


def train_shape(ctx: RunContext, base: dict, timeout: float, records: list[dict]) -> tuple[int, int] | None:
    """(batch, seq) of the training steps (see the module docstring); probe records go into `records`."""
    candidates = FULL_SHAPES
    default = (QUICK_CPU_SHAPE if ctx.device.type == "cpu" else QUICK_SHAPE) if ctx.quick else candidates[0]
    block = PRESETS[base["preset"]]["block_size"]
    if ctx.batch_size or ctx.seq_len:
        return ctx.batch_size or default[0], min(ctx.seq_len or default[1], block)
    if ctx.quick:
        return default
    available = mem_available_bytes()
    if ctx.device.type != "cpu" or available is None:
        return candidates[0]
    probes = []
    for batch, seq in PROBE_SHAPES:
        progress(f"[loss] probe: unfused {base['preset']} step at {batch} x {seq} tokens")
        r = launch({**base, "test": "train", "fused_loss": "off", "kernels": ctx.kernels[0], "batch": batch,
                    "seq": seq, "warmup": 1, "steps": 1}, timeout)
        records.append({"test": "probe", "kind": "measured", "fused_loss": "off", "batch": batch, "seq": seq,
                        "tokens": batch * seq, **{k: r.get(k) for k in ("peak_mb", "error", "process_rss_before_mb")}})
        if "peak_mb" not in r:
            ctx.note(f"loss: the memory probe failed ({r.get('error')}); training step at "
                     f"{candidates[-1][0]} x {candidates[-1][1]} tokens")
            return candidates[-1]
        probes.append((batch * seq, r["peak_mb"]))
    shape, predicted = pick_shape(candidates, probes, r["process_rss_before_mb"], available / 2 ** 20)
    said = ", ".join(f"{b * s:,} tokens {p / 1024:.1f} GiB" for (b, s), p in zip(candidates, predicted))
    if shape is None:
        ctx.note(f"loss: no training step measured: the unfused step is predicted not to fit in "
                 f"{MEMORY_MARGIN:.0%} of the {available / 2 ** 30:.1f} GiB available ({said})")
    elif shape != candidates[0]:
        ctx.note(f"loss: training step at {shape[0] * shape[1]:,} tokens per micro-batch, not "
                 f"{candidates[0][0] * candidates[0][1]:,}: the unfused step is predicted not to fit in "
                 f"{MEMORY_MARGIN:.0%} of the {available / 2 ** 30:.1f} GiB available ({said})")
    return shape


def run(ctx: RunContext, shape: tuple[int, int, int] | None = None, dtype_arg: str | None = None) -> list[dict]:
    """shape: (rows, width, vocab) of the head alone (--loss-shape); the vocabulary is also the training
    step's. dtype_arg: --dtype, else what training's --dtype auto picks on this device."""
    n, width, vocab = shape or (HEAD_ROWS["quick" if ctx.quick else "full"], WIDTH, VOCAB)
    torch_dtype = DTYPES[dtype_arg] if dtype_arg else resolve_dtype("auto", ctx.device)
    dtype = dtype_name(torch_dtype)
    base = {"device": str(ctx.device), "dtype": dtype, "threads": torch.get_num_threads(), "vocab": vocab,
            "preset": train_preset(ctx)}
    # Several times the longest run expected at --full on a 2-core CPU (bf16 emulated: ~5 min per call).
    timeout = 900 if ctx.quick else 4 * 3600
    # On a CPU a --full call takes minutes: 3 timed calls; on CUDA they take milliseconds.
    warmup, steps = 1, 3 if ctx.quick or ctx.device.type == "cpu" else 10
    if ctx.device.type == "cpu" and not cpu_has_native_bf16():
        if torch_dtype == torch.bfloat16:
            ctx.note("loss: this CPU has no native bf16 (AVX-512 BF16 / AMX): bf16 autocast is emulated, and its "
                     "matmuls with the vocabulary as the inner dimension crawl (0.4 GFLOP/s seen on a 2-core AVX2 "
                     "CPU); training's --dtype auto takes float32 here")
        elif dtype_arg is None:
            ctx.note("loss: float32, as training's --dtype auto on this CPU (no native bf16: bf16 would be "
                     "emulated); --dtype bfloat16 forces it")
    records: list[dict] = []

    for r in head_runs(ctx, torch_dtype):
        label = r["variant"] + (f" ({r['kernels']})" if r["kernels"] else "")
        progress(f"[loss] head+loss fwd+bwd: {label}, {n:,} rows x {width} -> {vocab:,}, {dtype}")
        spec = {**base, "test": "head", **r, "rows": n, "width": width,
                "warmup": warmup + (r["variant"] == "compiled"), "steps": steps}
        rec = {"test": "head", "kind": "measured", "variant": r["variant"], "kernels": r["kernels"],
               "rows": n, "width": width, "vocab": vocab, "dtype": dtype, **launch(spec, timeout)}
        if "error" in rec:
            ctx.note(f"loss: head {label} failed: {rec['error']}")
        records.append(rec)

    shape = train_shape(ctx, base, timeout, records)
    if shape is not None:
        batch, seq = shape
        for k in ctx.kernels:
            for fused in ("on", "off"):
                progress(f"[loss] training step: {base['preset']}, vocab {vocab:,}, fused_loss={fused}, kernels={k}, "
                         f"{batch} x {seq} tokens, {dtype}")
                spec = {**base, "test": "train", "kernels": k, "fused_loss": fused, "batch": batch, "seq": seq,
                        "warmup": warmup, "steps": steps}
                rec = {"test": "train", "kind": "measured", "preset": base["preset"], "vocab": vocab, "kernels": k,
                       "fused_loss": fused, "dtype": dtype, "batch": batch, "seq": seq, "tokens": batch * seq,
                       **launch(spec, timeout)}
                if "error" in rec or "skipped" in rec:
                    ctx.note(f"loss: training step fused_loss={fused} kernels={k}: "
                             f"{rec.get('error') or rec.get('skipped')}")
                records.append(rec)
    return derive(records)


def derive(records: list[dict]) -> list[dict]:
    """Ratios against the unfused baseline: head variants against `unfused`, training steps against
    fused_loss=off with the same kernels; the issue's targets on the training step."""
    head = [r for r in records if r["test"] == "head" and "peak_mb" in r]
    ref = next((r for r in head if r["variant"] == "unfused"), None)
    for r in head:
        if ref is not None:
            r["memory_vs_unfused"] = r["peak_mb"] / ref["peak_mb"]
            r["speedup_vs_unfused"] = ref["median_ms"] / r["median_ms"]
            r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
    steps = [r for r in records if r["test"] == "train" and "peak_mb" in r]
    for r in steps:
        off = next((o for o in steps if o["kernels"] == r["kernels"] and o["fused_loss"] == "off"), None)
        if off is None:
            continue
        r["memory_vs_off"] = r["peak_mb"] / off["peak_mb"]
        r["tokens_per_s_vs_off"] = r["tokens_per_s"] / off["tokens_per_s"]
        r["first_loss_rel_diff"] = abs(r["losses"][0] - off["losses"][0]) / abs(off["losses"][0])
        if r["fused_loss"] == "on":
            r["memory_target_met"] = r["memory_vs_off"] <= TARGET_MEMORY_RATIO
            r["speed_target_met"] = r["tokens_per_s_vs_off"] >= 1.0
    return records


def summary(records: list[dict]) -> dict:
    """The loss suite's part of the run's final JSON line."""
    s = {}
    head = [r for r in records if r["test"] == "head" and "peak_mb" in r]
    if head:
        s["loss_head"] = {r["variant"] + (f" {r['kernels']}" if r["kernels"] else ""):
                          f"{r['median_ms']:.1f} ms, {r['peak_mb']:.0f} MB (measured)" for r in head}
    steps = [r for r in records if r["test"] == "train" and "peak_mb" in r]
    if steps:
        s["loss_train_step"] = {f"{r['preset']} fused_loss={r['fused_loss']} {r['kernels']} {r['tokens']} tokens":
                                f"{r['tokens_per_s']:.0f} tokens/s, {r['peak_mb']:.0f} MB (measured)" for r in steps}
    return s


def _precision(dtype: str) -> str:
    return "float32 (no autocast)" if dtype == "float32" else f"{dtype} autocast"


def print_tables(records: list[dict], ctx: RunContext) -> None:
    head = [r for r in records if r["test"] == "head"]
    if head:
        r0 = head[0]
        kind = "; ".join(dict.fromkeys(r["memory_kind"] for r in head if "memory_kind" in r))
        log(format_table(f"loss: head + cross-entropy fwd+bwd alone, {r0['rows']:,} rows x {r0['width']} -> "
                         f"vocab {r0['vocab']:,}, {_precision(r0['dtype'])} (MEASURED; memory: {kind})", head, [
                             ("variant", "variant"), ("kernels", "kernels"), ("median_ms", "median ms"),
                             ("speedup_vs_unfused", "x unfused speed"), ("peak_mb", "peak MB"),
                             ("memory_vs_unfused", "x unfused memory"), ("first_call_s", "first call s"),
                             ("loss", "loss"), ("grad_norm", "grad norm"), ("error", "error")]))
    probes = [r for r in records if r["test"] == "probe"]
    if probes:
        log("")
        log(format_table("loss: memory probes, unfused training step (MEASURED; they set the step's size)", probes, [
            ("batch", "batch"), ("seq", "seq"), ("tokens", "tokens"), ("peak_mb", "peak MB"),
            ("process_rss_before_mb", "RSS before MB"), ("error", "error")]))
    steps = [{**r, "first_loss": r["losses"][0] if r.get("losses") else None,
              "last_loss": r["losses"][-1] if r.get("losses") else None} for r in records if r["test"] == "train"]
    if steps:
        kind = "; ".join(dict.fromkeys(r["memory_kind"] for r in steps if "memory_kind" in r))
        log("")
        log(format_table(f"loss: full training step of {steps[0]['preset']}, vocab {steps[0]['vocab']:,}, "
                         f"random tokens, {_precision(steps[0]['dtype'])} (MEASURED; memory: {kind})", steps, [
                             ("fused_loss", "fused_loss"), ("kernels", "kernels"), ("batch", "batch"), ("seq", "seq"),
                             ("step_ms", "step ms"), ("tokens_per_s", "tokens/s"),
                             ("tokens_per_s_vs_off", "x off tokens/s"), ("peak_mb", "peak MB"),
                             ("memory_vs_off", "x off memory"), ("first_loss", "first loss"),
                             ("last_loss", "last loss"), ("error", "error"), ("skipped", "skipped")]))
        for r in steps:
            if "memory_target_met" in r:
                log(f"target, kernels={r['kernels']}: fused step peak {r['memory_vs_off']:.2f} x unfused "
                    f"(<= {TARGET_MEMORY_RATIO}): {'met' if r['memory_target_met'] else 'NOT met'}; tokens/s "
                    f"{r['tokens_per_s_vs_off']:.2f} x unfused (>= 1): {'met' if r['speed_target_met'] else 'NOT met'}"
                    f" (MEASURED)")


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
