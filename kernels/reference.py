"""Pure-PyTorch reference of every op: the ground truth the Triton kernels are tested against.

Each function has the signature of the public op in `kernels`. Row-wise ops compute in fp32
(float64 stays float64) and return the input dtype. To get a high-precision reference, pass
float64 tensors: nothing here downcasts them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """y = h * rsqrt(mean(h^2) + eps) * weight, with h = x (+ residual).

    Returns y, or (y, h) when `residual` is given (h is the new residual stream, in x's dtype).
    """
    if residual is not None:
        h = (x.to(_compute_dtype(x.dtype)) + residual.to(_compute_dtype(x.dtype))).to(x.dtype)
    else:
        h = x
    hf = h.to(_compute_dtype(h.dtype))
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(hf.dtype)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32."""
    ct = _compute_dtype(gate.dtype)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (B, H, T, D), cos/sin (T, D//2).

    With x1, x2 = x[..., :D//2], x[..., D//2:]: cat(x1*cos - x2*sin, x2*cos + x1*sin).
    """
    ct = _compute_dtype(x.dtype)
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].to(ct), x[..., d2:].to(ct)
    c, s = cos.to(ct), sin.to(ct)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """Bool mask (Tq, Tk), True where allowed; aligned to the end: query i sees keys <= tk - tq + i."""
    i = torch.arange(tq, device=device).unsqueeze(1)
    j = torch.arange(tk, device=device).unsqueeze(0)
    return j <= (tk - tq) + i


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """Softmax attention with GQA. q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H % Hkv == 0.

    Each K/V head serves H // Hkv consecutive query heads. Matmuls run in the input dtype
    (so a low-precision call shows PyTorch's own rounding error); softmax runs in fp32.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"attention: query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)).to(_compute_dtype(q.dtype)) * scale  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    # A query row with no visible key (Tq > Tk, causal) gets zeros rather than NaN.
    p = torch.nan_to_num(p, nan=0.0).to(q.dtype)
    return torch.matmul(p, v)


def attention_lse(q: torch.Tensor, k: torch.Tensor, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Natural-log log-sum-exp of the scaled scores per query row, (B, H, Tq), in fp32/fp64."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ct = _compute_dtype(q.dtype)
    k = k.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Causal GQA attention of q (B, H, Tq, D) over a preallocated cache k/v (B, Hkv, L, D) whose batch row b
    holds kv_len[b] valid keys (kv_len (B,) integer, clamped to [0, L]): query i sees keys
    j <= kv_len[b] - Tq + i, i.e. `attention(causal=True)` on the first kv_len[b] keys of row b. Keys past
    kv_len[b] never reach the result (NaN or inf there are ignored); a query that sees no key gives 0.
    Computed in fp32 (float64 stays float64), returned in q's dtype.
    """
    B, H, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"decode_attention: query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ct = _compute_dtype(q.dtype)
    n = kv_len.to(device=q.device, dtype=torch.long).clamp(0, L).view(B, 1, 1, 1)
    j = torch.arange(L, device=q.device).view(1, 1, 1, L)
    valid = (j < n).transpose(-2, -1)  # (B, 1, L, 1): the keys that exist; zero the rest so NaN cannot leak
    k = torch.where(valid, k.to(ct), 0.0).repeat_interleave(H // Hkv, dim=1)
    v = torch.where(valid, v.to(ct), 0.0).repeat_interleave(H // Hkv, dim=1)
    visible = j <= n - Tq + torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)  # (B, 1, Tq, L), implies j < n
    scores = torch.matmul(q.to(ct), k.transpose(-2, -1)) * scale
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # a query with no visible key: 0, not NaN
    return torch.matmul(p, v).to(q.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(rope(q, cos, sin), rope(k, cos, sin)): RoPE of queries and keys, which may differ in head count."""
    return rope(q, cos, sin), rope(k, cos, sin)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """swiglu of the two halves of one [gate | up] projection (..., 2N) -> (..., N)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


LOSS_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T against targets. x (N, D), weight (V, D), targets (N,) int64.

    `F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)` except that
    "mean" divides by max(1, non-ignored targets): a batch whose targets are all ignored has loss 0 and
    zero gradients (F.cross_entropy gives NaN). "none" gives (N,) losses, 0 where ignored. z_loss: each
    non-ignored row's loss also gets z_loss * lse^2, lse = logsumexp of its logits (PaLM's z-loss, which
    keeps the log-normalizer near 0). The matmul runs in the input dtype (so a low-precision call shows
    PyTorch's own rounding); the softmax and the loss in fp32 (float64 stays float64), returned in fp32/fp64.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    logits = (x @ weight.transpose(0, 1)).to(_compute_dtype(x.dtype))  # (N, V)
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if z_loss:
        losses = losses + torch.where(targets != ignore_index, z_loss * torch.logsumexp(logits, dim=-1).square(), 0.0)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
