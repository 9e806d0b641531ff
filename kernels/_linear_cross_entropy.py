"""The output head and its cross-entropy in one op: Triton kernels, launchers, custom ops, `linear_cross_entropy`.

The (N, V) logits x @ W^T never reach global memory. Forward: one program per block of rows walks the
vocabulary in tiles, each tile's logits made by tl.dot over the width in fp32, keeping an online
log-sum-exp and picking out the target logit; it stores the per-row LSE (saved for the backward) and
loss (+ z_loss * lse^2 with a z-loss). Backward: the logit tiles are made again and turned into
G = (softmax * (1 + 2 z_loss lse) - onehot(target)) * row_scale;
dX = G @ W by programs over (row block, width block), dW = G^T @ X by programs over (vocabulary block,
width block), each accumulating in fp32 in registers and storing once: no atomics, the same bits every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import (TORCH_TO_TL_NAME, CompileSpec, check_tensor, interpreting, signature, triton_compat,
                       unit_last_stride)
from .reference import LOSS_REDUCTIONS

triton_compat()

# One config per kernel for every dtype and shape. Tiles of 64 x 64 with a 64-wide step over the width
# keep two operand tiles per stage in shared memory (16 KB in bf16) and the fp32 accumulator at 32
# registers per thread over 4 warps; the backward kernels hold two such accumulators (the logit tile and
# dX or dW) and spilled 8-24 B on sm_80 at 4 warps (kernels.report), so they take 8. The interpreter takes the smallest tiles tl.dot allows, so the
# tests (vocabularies of a few hundred, widths under 100) cover block tails in every direction.
BLOCK_M, BLOCK_V, BLOCK_K, BLOCK_D = 64, 64, 64, 64
NUM_WARPS, NUM_WARPS_BWD, NUM_STAGES = 4, 8, 2
INTERPRETER_BLOCK = 16


def _blocks() -> tuple[int, int, int, int]:
    if interpreting():
        return (INTERPRETER_BLOCK,) * 4
    return BLOCK_M, BLOCK_V, BLOCK_K, BLOCK_D


def _upcast(dtype: torch.dtype) -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1) returns wrong results for tl.dot on bf16 operands, so there the
    # tiles are cast to fp32 first; compiled for a GPU the dot runs in bf16 on the tensor cores.
    return interpreting() and dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products (tl.dot defaults to TF32 on GPUs), like PyTorch's fp32 matmul.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _logit_tile(x_ptr, w_ptr, rows, cols, stride_x_row, stride_w_row, n_rows, n_vocab, n_embd,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 logits x[rows] @ w[cols]^T, the width taken BLOCK_K at a time; w's tiles
    are cast to x's dtype (the matmul runs in x's dtype, as nn.Linear's under autocast)."""
    DTYPE = x_ptr.dtype.element_ty
    row_ok = rows < n_rows
    col_ok = cols < n_vocab
    x_base = x_ptr + rows[:, None].to(tl.int64) * stride_x_row
    w_base = w_ptr + cols[:, None].to(tl.int64) * stride_w_row
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, n_embd, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_embd
        xt = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(DTYPE)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lce_fwd_kernel(x_ptr, w_ptr, t_ptr, lse_ptr, loss_ptr,
                    stride_x_row, stride_w_row,
                    n_rows, n_vocab, n_embd, ignore_index, z_loss,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """lse = log sum_v exp(x w_v^T) (natural log); loss = lse - x w_t^T + z_loss lse^2 for t = target, 0 where t
    is ignored."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        s = _logit_tile(x_ptr, w_ptr, rows, cols, stride_x_row, stride_w_row, n_rows, n_vocab, n_embd,
                        BLOCK_M, BLOCK_V, BLOCK_K, UPCAST, DOT_PRECISION)
        s = tl.where((cols < n_vocab)[None, :], s, float("-inf"))
        # Every tile holds at least one real column, so m_new is finite and exp(m - m_new) is 0 on the first.
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
        target_logit += tl.sum(tl.where(cols[None, :] == t[:, None], s, 0.0), 1)
    lse = m + tl.log(l)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    # z_loss may arrive as an fp64 scalar (torch.compile): the cast keeps the row math in fp32.
    loss = (lse - target_logit + z_loss * lse * lse).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(t != ignore_index, loss, 0.0), mask=row_ok)


@triton.jit
def _logit_grad_tile(s, cols, t, lse, scale, z_loss, n_vocab):
    """G = (exp(s - lse) (1 + 2 z_loss lse) - [col == target]) * scale for one fp32 logit tile (d lse^2 / d s =
    2 lse softmax); 0 in columns past the vocabulary. Ignored rows and rows past the end have scale 0."""
    p = tl.exp(s - lse[:, None]) * (1.0 + 2.0 * z_loss * lse).to(tl.float32)[:, None]
    g = (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)) * scale[:, None]
    return tl.where((cols < n_vocab)[None, :], g, 0.0)


@triton.jit
def _lce_bwd_dx_kernel(x_ptr, w_ptr, t_ptr, lse_ptr, scale_ptr, dx_ptr,
                       stride_x_row, stride_w_row, stride_dx_row,
                       n_rows, n_vocab, n_embd, z_loss,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dx[rows, dcols] = sum over the vocabulary of G[rows, v] w[v, dcols], G in x's dtype, fp32 accumulator."""
    DTYPE = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = dcols < n_embd
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        s = _logit_tile(x_ptr, w_ptr, rows, cols, stride_x_row, stride_w_row, n_rows, n_vocab, n_embd,
                        BLOCK_M, BLOCK_V, BLOCK_K, UPCAST, DOT_PRECISION)
        g = _logit_grad_tile(s, cols, t, lse, scale, z_loss, n_vocab).to(DTYPE)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w_row + dcols[None, :],
                    mask=(cols < n_vocab)[:, None] & d_ok[None, :], other=0.0).to(DTYPE)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + rows[:, None] * stride_dx_row + dcols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _lce_bwd_dw_kernel(x_ptr, w_ptr, t_ptr, lse_ptr, scale_ptr, dw_ptr,
                       stride_x_row, stride_w_row, stride_dw_row,
                       n_rows, n_vocab, n_embd, z_loss,
                       BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dw[cols, dcols] = sum over the rows of G[n, cols]^T x[n, dcols], G in x's dtype, fp32 accumulator."""
    DTYPE = x_ptr.dtype.element_ty
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < n_embd
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        s = _logit_tile(x_ptr, w_ptr, rows, cols, stride_x_row, stride_w_row, n_rows, n_vocab, n_embd,
                        BLOCK_M, BLOCK_V, BLOCK_K, UPCAST, DOT_PRECISION)
        g = _logit_grad_tile(s, cols, t, lse, scale, z_loss, n_vocab).to(DTYPE)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x_row + dcols[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + cols[:, None] * stride_dw_row + dcols[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=(cols < n_vocab)[:, None] & d_ok[None, :])


# -- launchers ---------------------------------------------------------------------------------------

def _check_inputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check_tensor("linear_cross_entropy: x", x, ndim=2)
    check_tensor("linear_cross_entropy: weight", weight, ndim=2)
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("linear_cross_entropy: targets must be an int64 (or int32) tensor of token ids")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x (N, D) and weight (V, D) must share D, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be (N,) = ({x.shape[0]},), got {tuple(targets.shape)}")
    for name, t in (("weight", weight), ("targets", targets)):
        if t.device != x.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but x is on {x.device}")


def _consts(dtype: torch.dtype) -> dict:
    return dict(UPCAST=_upcast(dtype), DOT_PRECISION=_dot_precision(dtype))


def linear_cross_entropy_forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 z_loss: float = 0.0):
    """x (N, D), weight (V, D), targets (N,) -> losses (N,) fp32 (0 where ignored, + z_loss lse^2 elsewhere),
    lse (N,) fp32."""
    _check_inputs(x, weight, targets)
    x, weight, targets = unit_last_stride(x), unit_last_stride(weight), targets.contiguous()
    (n_rows, n_embd), n_vocab = x.shape, weight.shape[0]
    lse = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    losses = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return losses, lse
    block_m, block_v, block_k, _ = _blocks()
    _lce_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x, weight, targets, lse, losses, x.stride(0), weight.stride(0), n_rows, n_vocab, n_embd, ignore_index,
        float(z_loss), BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, **_consts(x.dtype),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return losses, lse


def linear_cross_entropy_backward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                                  row_scale: torch.Tensor, z_loss: float = 0.0):
    """d(sum_n row_scale[n] * loss[n]) for x (N, D), weight (V, D), targets (N,), the forward's lse (N,) fp32,
    row_scale (N,) fp32 (0 on ignored rows) and the forward's z_loss -> dx (N, D) in x's dtype, dweight (V, D)
    in weight's dtype."""
    x, weight, targets = unit_last_stride(x), unit_last_stride(weight), targets.contiguous()
    row_scale = row_scale.to(torch.float32).contiguous()
    (n_rows, n_embd), n_vocab = x.shape, weight.shape[0]
    dx = torch.empty((n_rows, n_embd), dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    if n_rows == 0:
        return dx, dw.zero_()
    block_m, block_v, block_k, block_d = _blocks()
    args = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, BLOCK_D=block_d, **_consts(x.dtype),
                num_warps=NUM_WARPS_BWD, num_stages=NUM_STAGES)
    _lce_bwd_dx_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(n_embd, block_d))](
        x, weight, targets, lse, row_scale, dx, x.stride(0), weight.stride(0), dx.stride(0),
        n_rows, n_vocab, n_embd, float(z_loss), **args)
    _lce_bwd_dw_kernel[(triton.cdiv(n_vocab, block_v), triton.cdiv(n_embd, block_d))](
        x, weight, targets, lse, row_scale, dw, x.stride(0), weight.stride(0), dw.stride(0),
        n_rows, n_vocab, n_embd, float(z_loss), **args)
    return dx, dw


# -- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("tritongpt::linear_cross_entropy", mutates_args=())
def _lce_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            ignore_index: int, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_forward(x, weight, targets, ignore_index, z_loss)


@torch.library.custom_op("tritongpt::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     row_scale: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_backward(x, weight, targets, lse, row_scale, z_loss)


@_lce_op.register_fake
def _(x, weight, targets, ignore_index, z_loss):
    _check_inputs(x, weight, targets)  # bad inputs fail while tracing too, with the same message
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


@_lce_backward_op.register_fake
def _(x, weight, targets, lse, row_scale, z_loss):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, targets, ignore_index, z_loss = inputs
    ctx.save_for_backward(x, weight, targets, output[1])
    ctx.ignore_index, ctx.z_loss = ignore_index, z_loss


def _backward(ctx, dlosses, dlse):
    x, weight, targets, lse = ctx.saved_tensors
    # An ignored row's loss is the constant 0: whatever gradient reaches it, its logits get none.
    row_scale = torch.where(targets != ctx.ignore_index, dlosses.float(), 0.0)
    dx, dw = _lce_backward_op(x, weight, targets, lse, row_scale, ctx.z_loss)
    return dx, dw, None, None, None


torch.library.register_autograd("tritongpt::linear_cross_entropy", _backward, setup_context=_setup)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the logits x @ weight.T (never materialized) against targets: x (N, D), weight (V, D),
    targets (N,) int64 -> the fp32 loss, (N,) for reduction "none". "mean" is over the non-ignored targets and
    is 0 (zero gradients) when all are ignored; z_loss adds z_loss * lse^2 per non-ignored row. Same contract
    as kernels.reference.linear_cross_entropy.
    Under autocast x is cast to the autocast dtype and the matmuls run in it; the weight's tiles are cast
    inside the kernels (no low-precision copy of it), and its gradient comes back in its own dtype."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    losses, _ = torch.ops.tritongpt.linear_cross_entropy(x, weight, targets, int(ignore_index), float(z_loss))
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


# -- compile report ----------------------------------------------------------------------------------

def compile_specs(quick: bool = False) -> list[CompileSpec]:
    """The three kernels for fp16 and bf16 x with the weight in that dtype or fp32 (the autocast case), at
    the one block config the launchers use; quick: bf16 x with an fp32 weight. Every one is a tl.dot kernel,
    so the report expects tensor-core instructions. fp32 x is left out: exact fp32 products take no tensor
    cores and spill at these tiles (sm_80: 288-4232 B, measured), so gpt/ops.py sends fp32 on CUDA to the
    PyTorch path; the kernels still run it correctly (the interpreter tests do)."""
    combos = [(torch.bfloat16, torch.float32)] if quick else [
        (torch.float16, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32)]
    specs = []
    for x_dt, w_dt in combos:
        x, w = TORCH_TO_TL_NAME[x_dt], TORCH_TO_TL_NAME[w_dt]
        label = f"x={x} w={w} BM={BLOCK_M} BV={BLOCK_V} BK={BLOCK_K}"
        common = {"BLOCK_M": BLOCK_M, "BLOCK_V": BLOCK_V, "BLOCK_K": BLOCK_K, "UPCAST": False,
                  "DOT_PRECISION": _dot_precision(x_dt)}
        fwd_ptrs = {"x_ptr": x, "w_ptr": w, "t_ptr": "i64", "lse_ptr": "fp32", "loss_ptr": "fp32"}
        specs.append(CompileSpec("_lce_fwd_kernel", _lce_fwd_kernel,
                                 signature(_lce_fwd_kernel, fwd_ptrs, ("z_loss",), common), common, NUM_WARPS,
                                 NUM_STAGES, label, expects_mma=True))
        bwd = dict(common, BLOCK_D=BLOCK_D)
        for fn, out in ((_lce_bwd_dx_kernel, ("dx_ptr", x)), (_lce_bwd_dw_kernel, ("dw_ptr", w))):
            ptrs = {"x_ptr": x, "w_ptr": w, "t_ptr": "i64", "lse_ptr": "fp32", "scale_ptr": "fp32", out[0]: out[1]}
            specs.append(CompileSpec(fn.__name__, fn, signature(fn, ptrs, ("z_loss",), bwd), bwd, NUM_WARPS_BWD,
                                     NUM_STAGES, f"{label} BD={BLOCK_D}", expects_mma=True))
    return specs

