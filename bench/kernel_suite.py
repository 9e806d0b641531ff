"""`kernels` suite: every op over a size sweep, per provider, as time, GB/s or TFLOP/s and % of the roofline.

Providers: `triton` (ours: `kernels.<op>`, when the run times the Triton kernels, see --kernels), `torch`
(kernels.reference, eager), `compile` (torch.compile of the reference), `sdpa` (attention only: the
model's PyTorch path, gpt.ops.sdpa_attention: F.scaled_dot_product_attention, or on a CPU blocked
matmuls for causal self-attention of up to 512 positions).
The roofline is this device's measured copy bandwidth and measured matmul peak (bench/timing.py), and
bytes/FLOPs come from bench/roofline.py, the same formulas as the static GPU estimates.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch

import kernels
from gpt.model import rope_table
from gpt.ops import sdpa_attention
from kernels import reference

from . import roofline
from .common import RunContext, format_table, log, progress
from .timing import rotation_copies, time_fn

EPS = 1e-6
# The eager reference attention materializes B*H*Tq*Tk fp32 scores; past this it is skipped, not OOM-killed.
MAX_SCORE_BYTES = 2 ** 31


@dataclass(frozen=True)
class Geometry:
    """Shapes the sweep sizes map to. size = tokens: rows of the row-wise ops, sequence length of attention."""
    dim: int = 4096           # width of RMSNorm rows; RoPE uses dim // head_dim heads
    hidden: int = 4096        # width of SwiGLU rows (the MLP's hidden size)
    heads: int = 16           # attention query heads
    kv_heads: int = 4         # attention K/V heads (GQA 4:1, like the presets)
    head_dim: int = 64        # every preset's head_dim
    attn_tokens: int = 16384  # attention batch = attn_tokens // seq, clamped to [min_batch, max_batch]
    min_batch: int = 1
    max_batch: int | None = None
    decode_batch: int = 8     # decode attention batch (one query token per sequence)

    def attn_batch(self, seq: int) -> int:
        batch = max(self.min_batch, self.attn_tokens // seq)
        return min(batch, self.max_batch) if self.max_batch else batch


GPU_GEOMETRY = Geometry()
CPU_GEOMETRY = Geometry(attn_tokens=1)


# -- the ops: shapes, costs, inputs, providers ------------------------------------------------------------

def _rms_norm_residual(x, w, r):
    return reference.rms_norm(x, w, EPS, residual=r)


def _rms_norm(x, w):
    return reference.rms_norm(x, w, EPS)


def _attention(q, k, v):
    return reference.attention(q, k, v, causal=True)


def _sdpa(q, k, v):
    return sdpa_attention(q, k, v, causal=True)


# op name -> our kernel (from the kernels package's table of public ops), in the benchmark's positional signature
_TRITON_ENTRY = {
    "rms_norm": lambda: lambda x, w: kernels.rms_norm(x, w, EPS),
    "rms_norm_residual": lambda: lambda x, w, r: kernels.rms_norm(x, w, EPS, residual=r),
    "rope": lambda: kernels.rope,
    "swiglu": lambda: kernels.swiglu,
    "attention": lambda: lambda q, k, v: kernels.attention(q, k, v, causal=True),
    "decode_attention": lambda: lambda q, k, v: kernels.attention(q, k, v, causal=True),
}


@dataclass(frozen=True)
class Op:
    name: str
    label: str
    directions: tuple[str, ...]
    metric: str                                   # headline: "gbps" or "tflops"
    reference: Callable                           # eager PyTorch, positional args
    shape: Callable[[int, Geometry], dict]        # size -> named dims
    cost: Callable[[dict, int, str], roofline.Cost]  # (shape, itemsize, direction) -> bytes/FLOPs
    inputs: Callable[[dict, torch.device, torch.dtype], list[torch.Tensor]]
    differentiable: tuple[int, ...] = ()         # argument positions that get gradients
    n_outputs: int = 1                            # outputs shaped like the first argument
    sdpa: Callable | None = None


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def _rope_inputs(s, device, dtype):
    cos, sin = rope_table(s["T"], s["D"], 10000.0, device=device)
    return [_randn(s["B"], s["H"], s["T"], s["D"], device=device, dtype=dtype), cos, sin]


OPS: dict[str, Op] = {op.name: op for op in [
    Op("rms_norm", "RMSNorm", ("fwd", "fwd+bwd"), "gbps", _rms_norm,
       shape=lambda n, g: {"rows": n, "dim": g.dim},
       cost=lambda s, e, d: roofline.rms_norm_cost(s["rows"], s["dim"], e, direction=d),
       inputs=lambda s, dev, dt: [_randn(s["rows"], s["dim"], device=dev, dtype=dt),
                                  1 + 0.1 * _randn(s["dim"], device=dev, dtype=dt)],
       differentiable=(0, 1)),
    Op("rms_norm_residual", "RMSNorm+residual", ("fwd", "fwd+bwd"), "gbps", _rms_norm_residual,
       shape=lambda n, g: {"rows": n, "dim": g.dim},
       cost=lambda s, e, d: roofline.rms_norm_cost(s["rows"], s["dim"], e, residual=True, direction=d),
       inputs=lambda s, dev, dt: [_randn(s["rows"], s["dim"], device=dev, dtype=dt),
                                  1 + 0.1 * _randn(s["dim"], device=dev, dtype=dt),
                                  _randn(s["rows"], s["dim"], device=dev, dtype=dt)],
       differentiable=(0, 1, 2), n_outputs=2),
    Op("rope", "RoPE", ("fwd", "fwd+bwd"), "gbps", reference.rope,
       shape=lambda n, g: {"B": 1, "H": g.dim // g.head_dim, "T": n, "D": g.head_dim},
       cost=lambda s, e, d: roofline.rope_cost(s["B"], s["H"], s["T"], s["D"], e, direction=d),
       inputs=_rope_inputs, differentiable=(0,)),
    Op("swiglu", "SwiGLU", ("fwd", "fwd+bwd"), "gbps", reference.swiglu,
       shape=lambda n, g: {"rows": n, "hidden": g.hidden},
       cost=lambda s, e, d: roofline.swiglu_cost(s["rows"], s["hidden"], e, direction=d),
       inputs=lambda s, dev, dt: [_randn(s["rows"], s["hidden"], device=dev, dtype=dt),
                                  _randn(s["rows"], s["hidden"], device=dev, dtype=dt)],
       differentiable=(0, 1)),
    Op("attention", "attention (causal)", ("fwd", "fwd+bwd"), "tflops", _attention,
       shape=lambda n, g: {"B": g.attn_batch(n), "H": g.heads, "Hkv": g.kv_heads, "Tq": n, "Tk": n, "D": g.head_dim},
       cost=lambda s, e, d: roofline.attention_cost(s["B"], s["H"], s["Hkv"], s["Tq"], s["Tk"], s["D"], e,
                                                    causal=True, direction=d),
       inputs=lambda s, dev, dt: [_randn(s["B"], s["H"], s["Tq"], s["D"], device=dev, dtype=dt),
                                  _randn(s["B"], s["Hkv"], s["Tk"], s["D"], device=dev, dtype=dt),
                                  _randn(s["B"], s["Hkv"], s["Tk"], s["D"], device=dev, dtype=dt)],
       differentiable=(0, 1, 2), sdpa=_sdpa),
    Op("decode_attention", "decode attention (1 query)", ("fwd",), "gbps", _attention,
       shape=lambda n, g: {"B": g.decode_batch, "H": g.heads, "Hkv": g.kv_heads, "Tq": 1, "Tk": n, "D": g.head_dim},
       cost=lambda s, e, d: roofline.attention_cost(s["B"], s["H"], s["Hkv"], 1, s["Tk"], s["D"], e,
                                                    causal=True, direction=d),
       inputs=lambda s, dev, dt: [_randn(s["B"], s["H"], 1, s["D"], device=dev, dtype=dt),
                                  _randn(s["B"], s["Hkv"], s["Tk"], s["D"], device=dev, dtype=dt),
                                  _randn(s["B"], s["Hkv"], s["Tk"], s["D"], device=dev, dtype=dt)],
       sdpa=_sdpa),
]}


def op_cost(op: Op, size: int, itemsize: int, direction: str, geometry: Geometry = GPU_GEOMETRY):
    """(shape, Cost) of `op` at sweep size `size`."""
    shape = op.shape(size, geometry)
    return shape, op.cost(shape, itemsize, direction)


def default_sizes(device: torch.device, quick: bool) -> tuple[list[int], list[int]]:
    """(row-wise sizes = rows, attention sizes = sequence lengths)."""
    if device.type == "cuda":
        if quick:
            return [1024, 4096, 16384], [512, 2048, 8192]
        return [2 ** i for i in range(9, 16)], [2 ** i for i in range(8, 15)]
    if quick:
        return [256, 1024], [256, 1024]
    return [256, 1024, 4096], [256, 512, 1024, 2048]


# -- measurement ------------------------------------------------------------------------------------------

def providers(op: Op, ctx: RunContext) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    if "triton" in ctx.kernels:
        try:
            out["triton"] = _TRITON_ENTRY[op.name]()
        except Exception as e:  # a kernel module being written, or broken: say so, time the rest
            ctx.note(f"triton provider for {op.name} unavailable ({type(e).__name__}: {e})")
    out["torch"] = op.reference
    if ctx.compile:
        out["compile"] = torch.compile(op.reference, dynamic=False)
    if op.sdpa is not None:
        out["sdpa"] = op.sdpa
    return out


def _call(fn: Callable, args_sets: list[list[torch.Tensor]], grads_sets, direction: str, differentiable):
    """A zero-argument closure running one fwd (or fwd+bwd) call, cycling through input copies."""
    counter = itertools.count()
    if direction == "fwd":
        def run():
            args = args_sets[next(counter) % len(args_sets)]
            with torch.no_grad():
                return fn(*args)
        return run

    def run():
        i = next(counter) % len(args_sets)
        args = args_sets[i]
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outs, [args[j] for j in differentiable], grads_sets[i])
    return run


def _inputs(op: Op, shape: dict, ctx: RunContext, direction: str, copies: int):
    args_sets, grads_sets = [], []
    for _ in range(copies):
        args = op.inputs(shape, ctx.device, ctx.dtype)
        if direction != "fwd":
            for j in op.differentiable:
                args[j].requires_grad_(True)
            grads_sets.append([torch.randn_like(args[0]) for _ in range(op.n_outputs)])
        args_sets.append(args)
    return args_sets, grads_sets


def measure(op: Op, direction: str, size: int, provider: str, fn: Callable, ctx: RunContext,
            geometry: Geometry) -> dict:
    itemsize = torch.empty((), dtype=ctx.dtype).element_size()
    shape, cost = op_cost(op, size, itemsize, direction, geometry)
    rec = {"suite": "kernels", "kind": "measured", "op": op.name, "label": op.label, "direction": direction,
           "provider": provider, "size": size, "shape": shape, "dtype": str(ctx.dtype).replace("torch.", ""),
           "bytes": cost.bytes, "flops": cost.flops or None}
    if provider in ("torch", "compile") and "attention" in op.name:
        score_bytes = 4 * shape["B"] * shape["H"] * shape["Tq"] * shape["Tk"]
        if score_bytes > MAX_SCORE_BYTES:
            rec["skipped"] = f"the reference materializes {score_bytes / 2 ** 30:.1f} GiB of scores"
            return rec
    copies = rotation_copies(cost.bytes, ctx.device)
    try:
        args_sets, grads_sets = _inputs(op, shape, ctx, direction, copies)
        run = _call(fn, args_sets, grads_sets, direction, op.differentiable)
        t0 = time.perf_counter()
        run()  # first call: compiles (torch.compile, Triton JIT); reported, not timed
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        rec["first_call_s"] = time.perf_counter() - t0
        timing = time_fn(run, ctx.device, ctx.quick)
    except Exception as e:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        return rec
    rec.update(timing.to_dict())
    rec["input_copies"] = copies
    rec.update(roofline.throughput(cost, timing.median_s))
    cal = ctx.calibration
    roof_s, bound = roofline.roofline_time(cost, cal["copy_gbps"] * 1e9, cal["matmul_tflops"] * 1e12)
    rec["bound"] = bound
    rec["pct_roofline"] = 100 * roof_s / timing.median_s
    return rec


def run(ctx: RunContext) -> list[dict]:
    if "triton" not in ctx.kernels:
        ctx.note("Triton kernel numbers need a CUDA GPU: on this machine the kernels suite times only the "
                 "PyTorch providers (eager reference, torch.compile of it, SDPA for attention). "
                 "See the static suite for compiled-kernel resources and ESTIMATED GPU rooflines.")
        if ctx.quick and ctx.compile:
            ctx.note("kernels --quick on CPU: torch.compile timed at the largest size only (--full: every size)")
    geometry = GPU_GEOMETRY if ctx.device.type == "cuda" else CPU_GEOMETRY
    row_sizes, attn_sizes = (ctx.sizes, ctx.sizes) if ctx.sizes else default_sizes(ctx.device, ctx.quick)
    try:  # one compiled function per op sees every size and both directions: allow the recompiles
        torch._dynamo.config.recompile_limit = 64
    except AttributeError:
        torch._dynamo.config.cache_size_limit = 64
    records = []
    for op in OPS.values():
        sizes = attn_sizes if "attention" in op.name else row_sizes
        timed = providers(op, ctx)
        for direction in op.directions:
            for size in sizes:
                for provider, fn in timed.items():
                    if provider == "compile" and ctx.quick and ctx.device.type == "cpu" and size != max(sizes):
                        continue  # each size is a fresh compile: seconds apiece on a small CPU
                    progress(f"[kernels] {op.name} {direction} size={size} {provider}")
                    rec = measure(op, direction, size, provider, fn, ctx, geometry)
                    if "error" in rec:
                        ctx.note(f"{op.name} {direction} size={size} {provider} failed: {rec['error']}")
                    records.append(rec)
    return records


COLUMNS = [("label", "op"), ("direction", "pass"), ("size", "size"), ("provider", "provider"),
           ("median_ms", "median ms"), ("p20_ms", "p20 ms"), ("p80_ms", "p80 ms"), ("gbps", "GB/s"),
           ("tflops", "TFLOP/s"), ("pct_roofline", "% roofline"), ("bound", "bound"), ("first_call_s", "1st call s")]


def print_tables(records: list[dict], ctx: RunContext) -> None:
    cal = ctx.calibration
    title = (f"kernels (MEASURED on {cal.get('device_name', ctx.device.type)}, {records[0]['dtype'] if records else ''}; "
             f"size = rows for row-wise ops, sequence length for attention; % roofline vs measured "
             f"{cal.get('copy_gbps', 0):.1f} GB/s copy and {cal.get('matmul_tflops', 0):.2f} TFLOP/s matmul)")
    ok = [r for r in records if "median_ms" in r]
    log(format_table(title, ok, COLUMNS))
