"""Bytes and FLOPs of every op, and roofline estimates from them: the one place these formulas live.

Both the measured benchmarks (GB/s, TFLOP/s, % of the measured peaks) and the static estimates for
GPUs we do not have (H100, A100) use the functions here, so the two are always counted the same way.

Counting rules
- Row-wise ops (RMSNorm, RoPE, SwiGLU) are memory-bound: the forward reads each input once and writes
  each output once; the backward reads what it needs (the saved input and grad_out) and writes one
  gradient per differentiable input. Small per-row or per-program side tensors (RMSNorm's fp32 rstd,
  dW partial sums) are under 0.1% of the traffic at the sizes we benchmark and are not counted.
  Their FLOPs are not counted either (a handful per element, far below any machine's balance point).
- Attention: 4*B*H*Tq*Tk*D FLOPs forward (QK^T and PV, 2 FLOPs per multiply-add), halved for causal
  when Tq == Tk; backward = 2.5x forward (five matmuls instead of two). Bytes: q, k, v read and o
  written once (forward); q, k, v, o, dO read and dq, dk, dv written once (backward).
"""
from __future__ import annotations

from dataclasses import dataclass

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Cost:
    """Bytes moved to/from main memory and FLOPs of one call (flops=0: not counted, memory-bound)."""
    bytes: int
    flops: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def _pick(direction: str, fwd: Cost, bwd: Cost) -> Cost:
    if direction == "fwd":
        return fwd
    if direction == "bwd":
        return bwd
    if direction == "fwd+bwd":
        return fwd + bwd
    raise ValueError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")


def rms_norm_cost(rows: int, dim: int, itemsize: int, residual: bool = False, direction: str = "fwd",
                  weight_itemsize: int | None = None) -> Cost:
    """RMSNorm of a (rows, dim) input with a (dim,) weight; residual=True is the fused h = x + residual.

    fwd: read x (and residual), w; write y (and h).
    bwd: read dy, h, w (and dh, the grad of the residual-stream output); write dx, dw. With the fused
    residual, dx is also the residual's gradient (the same tensor, written once).
    """
    n, w = rows * dim * itemsize, dim * (weight_itemsize or itemsize)
    streams = 2 if residual else 1
    fwd = Cost(2 * streams * n + w)
    bwd = Cost((3 + (1 if residual else 0)) * n + 2 * w)
    return _pick(direction, fwd, bwd)


def rope_cost(batch: int, heads: int, seq: int, head_dim: int, itemsize: int, direction: str = "fwd",
              table_itemsize: int = 4) -> Cost:
    """RoPE of x (B, H, T, D) with cos/sin tables (T, D/2) (fp32 in the model).

    fwd: read x, cos, sin; write y. bwd (RoPE with sin negated): read dy, cos, sin; write dx.
    """
    x = batch * heads * seq * head_dim * itemsize
    tables = 2 * seq * (head_dim // 2) * table_itemsize
    one = Cost(2 * x + tables)
    return _pick(direction, one, one)


def swiglu_cost(rows: int, hidden: int, itemsize: int, direction: str = "fwd") -> Cost:
    """silu(gate) * up on (rows, hidden) each. fwd: read gate, up; write out. bwd: read dy, gate, up;
    write dgate, dup."""
    n = rows * hidden * itemsize
    return _pick(direction, Cost(3 * n), Cost(5 * n))


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = True,
                    direction: str = "fwd") -> int:
    """4*B*H*Tq*Tk*D forward, halved for causal self-attention (Tq == Tk); backward 2.5x forward."""
    fwd = 4 * batch * heads * q_len * kv_len * head_dim
    if causal and q_len == kv_len:
        fwd //= 2
    bwd = fwd * 5 // 2
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def attention_cost(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, head_dim: int, itemsize: int,
                   causal: bool = True, direction: str = "fwd") -> Cost:
    """Attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D). Decode attention is Tq = 1."""
    q = batch * heads * q_len * head_dim * itemsize
    kv = batch * kv_heads * kv_len * head_dim * itemsize
    fwd = Cost(2 * q + 2 * kv, attention_flops(batch, heads, q_len, kv_len, head_dim, causal, "fwd"))
    # read q, k, v, o, dO; write dq, dk, dv
    bwd = Cost(3 * q + 2 * kv + q + 2 * kv, attention_flops(batch, heads, q_len, kv_len, head_dim, causal, "bwd"))
    return _pick(direction, fwd, bwd)


def decode_step_bytes(num_params: int, weight_itemsize: int, n_layer: int, batch: int, kv_heads: int,
                      context: int, head_dim: int, cache_itemsize: int) -> int:
    """Bytes one decode step must read: every weight once, plus each layer's K and V cache up to `context`."""
    return num_params * weight_itemsize + 2 * n_layer * batch * kv_heads * context * head_dim * cache_itemsize


# -- GPUs we estimate for (no measurement: datasheet numbers) ---------------------------------------------

@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bytes_per_s: float  # datasheet HBM bandwidth
    bf16_flops: float       # dense bf16 tensor-core peak, FLOP/s


GPUS = {
    "H100": GPUSpec("H100 SXM", 3.35e12, 989e12),
    "A100": GPUSpec("A100 SXM 80GB", 2.0e12, 312e12),
}


def roofline_time(cost: Cost, bytes_per_s: float, flops_per_s: float) -> tuple[float, str]:
    """(seconds, 'memory' | 'compute'): the slower of moving the bytes and doing the FLOPs at peak."""
    t_mem = cost.bytes / bytes_per_s
    t_compute = cost.flops / flops_per_s
    return (t_mem, "memory") if t_mem >= t_compute else (t_compute, "compute")


def estimate(cost: Cost, gpu: GPUSpec) -> dict:
    """ESTIMATED best-case time and throughput of `cost` on `gpu` (the roofline, not a measurement)."""
    seconds, bound = roofline_time(cost, gpu.hbm_bytes_per_s, gpu.bf16_flops)
    return {"gpu": gpu.name, "time_us": seconds * 1e6, "bound": bound,
            "gbps": cost.bytes / seconds / 1e9,
            "tflops": cost.flops / seconds / 1e12 if cost.flops else None,
            "kind": "estimated"}


def throughput(cost: Cost, seconds: float) -> dict:
    """GB/s and TFLOP/s (None where FLOPs are not counted) of a measured time."""
    return {"gbps": cost.bytes / seconds / 1e9, "tflops": cost.flops / seconds / 1e12 if cost.flops else None}
