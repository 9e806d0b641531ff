"""The one place that chooses between the Triton kernels and the PyTorch path.

kernels="torch":  PyTorch ops with the semantics of kernels/reference.py, SDPA for attention.
kernels="triton": the hand-written kernels in kernels/ (CUDA, or CPU under TRITON_INTERPRET=1).
kernels="auto":   Triton when the tensors are on CUDA and Triton imports, else the PyTorch path.

The choice is a run-time option, not part of the model's architecture: the model resolves it once per
device (`GPT(config, kernels=...)`, again when moved) into an `Ops` table, and nothing of it is saved in
a checkpoint. Both tables have the same signatures and layouts (kernels/__init__.py).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from kernels import KernelsUnavailable, reference
from kernels._runtime import triton_unavailable_reason

from .errors import ConfigError, GPTWarning

KERNEL_MODES = ("auto", "triton", "torch")


def _decode_attention(q, k, v, scale: float | None):
    """One query per head against the whole cache, as two batched matmuls. The query heads of a
    GQA group attend to the same K/V head, so they ride along as extra rows: (B, Hkv, g, D)."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, Hkv, H // Hkv, D)
    p = torch.softmax((qg @ k.transpose(-1, -2)).float() * scale, dim=-1).to(v.dtype)  # (B, Hkv, g, Tk)
    return (p @ v).reshape(B, H, 1, D)


# Causal self-attention on the CPU up to this many positions runs as matmuls over blocks of query rows
# (causal_matmul_attention) instead of SDPA's CPU flash kernel: measured on a 2-core AVX-512 CPU, the
# CPU recipe's training step (B=16, H=2, T=256, D=64, bf16, compiled) takes ~15% less time.
CPU_MATMUL_ATTENTION_MAX_T = 512
_QUERY_BLOCK = 128


def _attention_blocks(q, block: int):
    """The query blocks of causal_matmul_attention: (start, end, future), future (n, n) True where a key of
    the block's own diagonal tile comes after the query (keys before `start` are seen by every row)."""
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    return [(s, min(s + block, T), pos[None, s:s + block] > pos[s:s + block, None]) for s in range(0, T, block)]


def _block_rows(x, start: int, end: int, hkv: int):
    """x (B, H, T, D) -> its query rows start:end as (B, Hkv, g * (end - start), D), the g query heads of a
    K/V head stacked (a copy where the layout needs one)."""
    B, H, _, D = x.shape
    return x.reshape(B, hkv, H // hkv, x.shape[2], D)[:, :, :, start:end].reshape(B, hkv, -1, D)


def _masked_scores(qb, kb, start: int, future, scale: float, g: int):
    """fp32 scores (B, Hkv, g * n, end) of the query block qb (its n rows from `start`) against the keys kb
    up to its end, the keys after each query at -inf. The scale goes on q (n x D), not on the scores."""
    B, hkv, r, end = qb.shape[0], qb.shape[1], qb.shape[2], kb.shape[2]
    s = ((qb * scale) @ kb.transpose(-1, -2)).float().view(B, hkv, g, r // g, end)
    s[..., start:].masked_fill_(future, float("-inf"))
    return s.view(B, hkv, r, end)


class _CausalMatmulAttention(torch.autograd.Function):
    """causal_matmul_attention with FlashAttention's memory: the forward keeps q, k, v, the output and one
    fp32 log-sum-exp per query row; the backward makes each block's probabilities again from them (one
    more q k^T per block) instead of keeping every (rows, keys) fp32 softmax, a sixth of what the `small`
    preset's training step kept for its backward at T = 512."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, block: int):
        B, H, T, D = q.shape
        hkv = k.shape[1]
        g = H // hkv
        # Stored (B, T, H, D): the model's (B, T, H * D) view of it for the output projection is then free,
        # and that projection keeps the same memory for its backward that this op keeps for its own.
        out_bthd = torch.empty((B, T, H, D), dtype=v.dtype, device=q.device)
        out = out_bthd.permute(0, 2, 1, 3).view(B, hkv, g, T, D)
        lse = torch.empty((B, hkv, g, T), dtype=torch.float32, device=q.device)
        for start, end, future in _attention_blocks(q, block):
            s = _masked_scores(_block_rows(q, start, end, hkv), k[:, :, :end], start, future, scale, g)
            lse[:, :, :, start:end] = torch.logsumexp(s, dim=-1).view(B, hkv, g, end - start)
            p = torch.softmax(s, dim=-1).to(v.dtype)
            out[:, :, :, start:end] = (p @ v[:, :, :end]).view(B, hkv, g, end - start, D)
        out = out.view(B, H, T, D)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, (B, H, T, D), hkv = ctx.scale, q.shape, k.shape[1]
        g, mm = H // hkv, q.dtype
        dout = dout.to(out.dtype)
        delta = (dout.float() * out.float()).sum(-1).view(B, hkv, g, T)     # rowsum(dO * O)
        dq = torch.empty((B, hkv, g, T, D), dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for start, end, future in _attention_blocks(q, ctx.block):
            qb, kb, vb = _block_rows(q, start, end, hkv), k[:, :, :end], v[:, :, :end]
            dob = _block_rows(dout, start, end, hkv)
            rows = lse[:, :, :, start:end].reshape(B, hkv, -1, 1)
            p = _masked_scores(qb, kb, start, future, scale, g).sub_(rows).exp_()   # (B, Hkv, g*n, end) fp32
            dv[:, :, :end] += (p.to(mm).transpose(-1, -2) @ dob).float()
            dp = (dob @ vb.transpose(-1, -2)).float()
            ds = p.mul_(dp.sub_(delta[:, :, :, start:end].reshape(B, hkv, -1, 1))).to(mm)   # dS / scale
            dq[:, :, :, start:end] = ((ds @ kb) * scale).view(B, hkv, g, end - start, D)
            dk[:, :, :end] += (ds.transpose(-1, -2) @ qb).float().mul_(scale)
        return dq.view(B, H, T, D), dk.to(k.dtype), dv.to(v.dtype), None, None


def causal_matmul_attention(q, k, v, scale: float | None = None, block: int = _QUERY_BLOCK):
    """Causal self-attention (Tq == Tk) as explicit matmuls and an fp32 softmax, the query rows taken
    in blocks of `block` that each read only the keys up to their own last row: about (n+1)/2n of
    the full T x T product for n blocks, where SDPA's CPU kernel does the masked half at low speed.
    GQA: the query heads of a group ride along as extra rows of their K/V head. Autograd keeps O(T)
    per head (_CausalMatmulAttention). The matmuls run in q's dtype, or autocast's where it is on."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    # v is often a view into the fused q|k|v projection's output: a copy of it lets that buffer go.
    with torch.autocast(q.device.type, enabled=False):
        return _CausalMatmulAttention.apply(q, k, v.contiguous(), float(scale), block)


def sdpa_attention(q, k, v, causal: bool = True, scale: float | None = None):
    """kernels.attention semantics on F.scaled_dot_product_attention (flash/efficient/CPU-fused
    backends), or on blocked matmuls for short causal self-attention on the CPU."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == 1:
        # Decode. A query at the end sees every key, so no mask. Measured on CPU: SDPA on the strided
        # view of a preallocated KV cache takes ~100x longer than on contiguous K/V; matmuls don't care.
        return _decode_attention(q, k, v, scale)
    if causal and Tq == Tk and Tq <= CPU_MATMUL_ATTENTION_MAX_T and q.device.type == "cpu":
        return causal_matmul_attention(q, k, v, scale)
    if not k.is_contiguous() or not v.is_contiguous():
        k, v = k.contiguous(), v.contiguous()
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # Chunked prefill into a KV cache: SDPA's is_causal aligns to the start, we need the end.
    mask = reference.causal_mask(Tq, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def torch_decode_attention(q, k, v, kv_len, scale: float | None = None):
    """kernels.decode_attention semantics in PyTorch: q (B, H, Tq, D), the last Tq positions of each row's
    kv_len[b] valid keys in a preallocated cache k/v (B, Hkv, L, D); keys at kv_len or later are masked
    (the values there must be finite: they are multiplied by a zero weight).
    GQA heads ride along as rows, as in _decode_attention. Static shapes: it compiles into one graph."""
    B, H, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    rows = (H // Hkv) * Tq                               # row r: query head r // Tq of the group, position r % Tq
    qg = q.reshape(B, Hkv, rows, D)
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # (B, Hkv, rows, L)
    q_pos = kv_len.view(B, 1, 1, 1) - Tq + (torch.arange(rows, device=q.device) % Tq).view(1, 1, rows, 1)
    masked = torch.arange(L, device=q.device).view(1, 1, 1, L) > q_pos
    p = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
    p = p.masked_fill(masked.all(dim=-1, keepdim=True), 0.0)  # a query that sees no key: 0, not NaN
    return (p.to(v.dtype) @ v).reshape(B, H, Tq, D)


def torch_rms_norm(x, weight, eps: float = 1e-6, residual=None):
    """kernels.rms_norm semantics on F.rms_norm (PyTorch's fused kernel, fp32 math for low precision)."""
    h = x if residual is None else x + residual
    if h.dtype != weight.dtype:
        weight = weight.to(h.dtype)
    y = F.rms_norm(h, (h.shape[-1],), weight, eps)
    return y if residual is None else (y, h)


def torch_rope(x, cos, sin):
    """kernels.rope semantics in x's dtype: on CPU, bf16 <-> fp32 round trips cost more than the math."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def torch_rope_qk(q, k, cos, sin):
    return torch_rope(q, cos, sin), torch_rope(k, cos, sin)


def torch_swiglu(gate, up):
    """silu(gate) * up in the input dtype (the reference upcasts; PyTorch's silu already uses fp32 math)."""
    return F.silu(gate) * up


class _SwiGLUPacked(torch.autograd.Function):
    """swiglu_packed keeping only its input for the backward, which makes sigmoid(gate) again: autograd
    of silu(gate) * up would also keep silu(gate), a third more of the MLP's saved activations."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return torch_swiglu(*gate_up.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dy = dy.float()
        d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
        return torch.cat((d_gate, dy * silu), dim=-1).to(gate_up.dtype)


def torch_swiglu_packed(gate_up):
    """kernels.swiglu_packed semantics: silu(gate) * up of [gate | up] in the input dtype."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SwiGLUPacked.apply(gate_up)
    return torch_swiglu(*gate_up.chunk(2, dim=-1))


# -- the output head and its loss in one op ----------------------------------------------------------

# The PyTorch path never holds the (N, V) logits: rows go through in chunks whose fp32 logit tile (and the
# softmax/gradient tile made from it in place) stays within this budget. 64 MiB: 333 rows at the GPT-2
# vocabulary, the whole batch of a char model; large enough for the CPU matmuls to run at full speed.
LOSS_CHUNK_BYTES = 64 << 20


def loss_chunk_rows(vocab_size: int, budget: int = LOSS_CHUNK_BYTES) -> int:
    """Rows per chunk of torch_linear_cross_entropy: one fp32 (rows, vocab) tile within `budget` bytes."""
    return max(1, budget // (4 * vocab_size))


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply in here: autocast's where it is on, else the inputs' common dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _softmax_parts(logits, targets, valid):
    """In place: the fp32 logit tile (rows, V) -> exp(logits - rowmax). Returns (that tile, its row sums, the
    log-sum-exp, the target logits), with no other tile-sized temporary (torch.logsumexp would make one)."""
    target_logit = logits.gather(1, targets.where(valid, 0)[:, None])[:, 0]
    m = logits.amax(dim=-1)
    p = logits.sub_(m[:, None]).exp_()
    s = p.sum(dim=-1)
    return p, s, m + s.log(), target_logit


def _logit_grad(p, s, lse, targets, valid, scale, z_loss: float):
    """In place: exp(logits - rowmax) (rows, V) with its row sums s -> d loss_row / d logits = softmax (1 +
    2 z_loss lse) - onehot(target) (d lse^2 / d logits = 2 lse softmax), times scale (a number or a (rows,)
    tensor), zero on ignored rows: one pass over the tile and one element per row."""
    row = valid.to(p.dtype) * scale
    g = p.mul_((row * (1.0 + 2.0 * z_loss * lse) / s)[:, None])
    g[torch.arange(g.shape[0], device=g.device), targets.where(valid, 0)] -= row
    return g


def _accumulate_grads(g, xc, w, dx_rows, dw):
    """dx_rows = g @ w and dw += g^T @ xc (fp32). Where the matmuls are fp32 they write into dx_rows and dw
    directly: a fresh (V, D) product per chunk would cost a page-faulted allocation and two more passes over
    the weight's size each time."""
    if g.dtype == dx_rows.dtype:
        torch.matmul(g, w, out=dx_rows)
    else:
        dx_rows.copy_(g @ w)
    if g.dtype == dw.dtype:
        dw.addmm_(g.t(), xc)
    else:
        dw += (g.t() @ xc).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """kernels.reference.linear_cross_entropy in chunks of rows. Forward: per chunk the logits (in the
    matmul dtype, then fp32), their log-sum-exp and the target logit (the loss + z_loss lse^2). With
    reduction mean/sum and a gradient wanted, the gradients are made in the same pass (no second logit
    matmul) and the backward only scales them; with "none" (a gradient per row) the backward recomputes
    each chunk's logits. dW is accumulated in fp32 across chunks."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, reduction, chunk_rows, z_loss):
        mm = _matmul_dtype(x, weight)
        n = x.shape[0]
        valid = targets != ignore_index
        denom = valid.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else None
        grads_now = reduction != "none" and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(mm)
            losses = torch.empty(n, dtype=torch.float32, device=x.device)
            dx = torch.empty(x.shape, dtype=torch.float32, device=x.device) if grads_now else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads_now else None
            for s in range(0, n, chunk_rows):
                xc, tc, vc = x[s:s + chunk_rows].to(mm), targets[s:s + chunk_rows], valid[s:s + chunk_rows]
                p, total, lse, target_logit = _softmax_parts((xc @ w.t()).float(), tc, vc)     # (rows, V)
                losses[s:s + chunk_rows] = torch.where(vc, lse - target_logit + z_loss * lse.square(), 0.0)
                if grads_now:
                    g = _logit_grad(p, total, lse, tc, vc, 1.0 / denom if denom is not None else 1.0, z_loss)
                    _accumulate_grads(g.to(mm), xc, w, dx[s:s + chunk_rows], dw)
        ctx.reduction, ctx.ignore_index, ctx.chunk_rows, ctx.mm = reduction, ignore_index, chunk_rows, mm
        ctx.z_loss = z_loss
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        if grads_now:
            ctx.save_for_backward(dx, dw)
        else:
            ctx.save_for_backward(x, weight, targets)
        ctx.grads_now = grads_now
        if reduction == "none":
            return losses
        return losses.sum() / denom if denom is not None else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads_now:
            dx, dw = ctx.saved_tensors
            grad_out = grad_out.float()
            return (dx * grad_out).to(ctx.x_dtype), (dw * grad_out).to(ctx.w_dtype), None, None, None, None, None
        x, weight, targets = ctx.saved_tensors
        mm, rows = ctx.mm, ctx.chunk_rows
        valid = targets != ctx.ignore_index
        dx = torch.empty(x.shape, dtype=ctx.x_dtype, device=x.device)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(mm)
            for s in range(0, x.shape[0], rows):
                xc, tc, vc = x[s:s + rows].to(mm), targets[s:s + rows], valid[s:s + rows]
                p, total, lse, _ = _softmax_parts((xc @ w.t()).float(), tc, vc)
                g = _logit_grad(p, total, lse, tc, vc, grad_out[s:s + rows].float(), ctx.z_loss)
                _accumulate_grads(g.to(mm), xc, w, dx[s:s + rows], dw)
        return dx, dw.to(ctx.w_dtype), None, None, None, None, None


def torch_linear_cross_entropy(x, weight, targets, ignore_index: int = -1, reduction: str = "mean",
                               z_loss: float = 0.0, chunk_rows: int | None = None):
    """kernels.linear_cross_entropy semantics in PyTorch, the logits never whole: x (N, D), weight (V, D),
    targets (N,) -> the loss in fp32 ((N,) for reduction "none"), z_loss * lse^2 added per non-ignored row.
    chunk_rows: rows per chunk (default loss_chunk_rows(V)); the result does not depend on it beyond float
    rounding."""
    if reduction not in reference.LOSS_REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {reference.LOSS_REDUCTIONS}, "
                         f"got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy: need x (N, D), weight (V, D), targets (N,); got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    rows = chunk_rows or loss_chunk_rows(weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, max(1, rows), float(z_loss))


# The fused head is worth it where the logits are a large part of a step's memory: a vocabulary of at least
# this many tokens and this many times the width (GPT-2's 50,257 tokens at width 512: on; the 8,192-token
# BPE and char vocabularies: off, so those runs keep their numerics and the logits that forward returns).
FUSED_LOSS_MODES = ("auto", "on", "off")
FUSED_LOSS_MIN_VOCAB = 16384
FUSED_LOSS_MIN_VOCAB_PER_WIDTH = 8


def check_fused_loss_mode(mode: str) -> str:
    if mode not in FUSED_LOSS_MODES:
        raise ConfigError(f"unknown fused_loss mode {mode!r}; use one of {', '.join(FUSED_LOSS_MODES)}")
    return mode


def resolve_fused_loss(mode: str, vocab_size: int, n_embd: int) -> bool:
    """Whether the loss goes through the fused head (linear_cross_entropy) for `mode` and this model shape."""
    if check_fused_loss_mode(mode) != "auto":
        return mode == "on"
    return vocab_size >= FUSED_LOSS_MIN_VOCAB and vocab_size >= FUSED_LOSS_MIN_VOCAB_PER_WIDTH * n_embd


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, GPTWarning, stacklevel=3)


@dataclass(frozen=True)
class Ops:
    """The hot ops the model calls, under the names and signatures of `kernels.OPS`."""
    name: str                 # "triton" or "torch"
    rms_norm: Callable
    rope: Callable
    rope_qk: Callable
    swiglu: Callable
    swiglu_packed: Callable
    attention: Callable
    decode_attention: Callable   # (q, k_cache, v_cache, kv_len, scale=None), for a static KV cache
    linear_cross_entropy: Callable  # (x, weight, targets, ignore_index=-1, reduction="mean", z_loss=0.0): head + loss


# PyTorch's own fused ops for the row-wise math, SDPA for attention. Same semantics as
# kernels/reference.py; intermediate rounding may differ in bf16/fp16.
TORCH_OPS = Ops("torch", rms_norm=torch_rms_norm, rope=torch_rope, rope_qk=torch_rope_qk, swiglu=torch_swiglu,
                swiglu_packed=torch_swiglu_packed, attention=sdpa_attention, decode_attention=torch_decode_attention,
                linear_cross_entropy=torch_linear_cross_entropy)


def _triton_attention(q, k, v, causal=True, scale=None):
    if q.dtype == torch.float32 and q.is_cuda:
        # The flash kernels are fp16/bf16 only on GPUs (fp32 tiles spill and miss the tensor cores);
        # fp32 runs (--dtype float32) take SDPA for attention and keep the Triton row-wise ops.
        _warn_once("kernels='triton': fp32 attention on CUDA uses SDPA; train with --dtype bfloat16 "
                   "(the default) to use the Triton flash attention")
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    return kernels.attention(q, k, v, causal=causal, scale=scale)


def _triton_decode_attention(q, k, v, kv_len, scale=None):
    if q.dtype == torch.float32 and q.is_cuda:   # as _triton_attention: the flash kernels are fp16/bf16 on GPUs
        return torch_decode_attention(q, k, v, kv_len, scale)
    return kernels.decode_attention(q, k, v, kv_len, scale=scale)


def _triton_linear_cross_entropy(x, weight, targets, ignore_index: int = -1, reduction: str = "mean",
                                 z_loss: float = 0.0):
    autocast_on = torch.is_autocast_enabled(x.device.type)
    if x.is_cuda and (torch.get_autocast_dtype("cuda") if autocast_on else x.dtype) == torch.float32:
        # As for attention: exact fp32 tiles take no tensor cores and spill (kernels.report); fp32 runs chunk.
        return torch_linear_cross_entropy(x, weight, targets, ignore_index, reduction, z_loss)
    return kernels.linear_cross_entropy(x, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                        z_loss=z_loss)


@functools.cache
def triton_ops() -> Ops:
    """The Triton kernels (imported here, on first use: the PyTorch path never needs Triton)."""
    own = {"attention": _triton_attention, "decode_attention": _triton_decode_attention,
           "linear_cross_entropy": _triton_linear_cross_entropy}
    table = {f.name: getattr(kernels, f.name) for f in fields(Ops) if f.name != "name" and f.name not in own}
    return Ops("triton", **table, **own)


def check_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels mode {mode!r}; use one of {', '.join(KERNEL_MODES)}")
    return mode


def resolve(mode: str, device: torch.device | str) -> str:
    """'triton' or 'torch' for `mode` on `device`; 'triton' where it cannot run raises KernelsUnavailable."""
    device = torch.device(device)
    if check_mode(mode) == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if mode == "triton":
        if reason is not None:
            raise KernelsUnavailable(f"kernels='triton' cannot run here: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and reason is None else "torch"


def select(mode: str, device: torch.device | str) -> Ops:
    """The op table that `mode` means on `device`."""
    return triton_ops() if resolve(mode, device) == "triton" else TORCH_OPS

