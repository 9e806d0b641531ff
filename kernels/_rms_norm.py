"""RMSNorm, optionally fused with the residual add: Triton kernels, launchers, custom ops, `rms_norm`.

Forward: one program per row, the whole row in registers, one read of each input, fp32 statistics;
saves the fp32 reciprocal RMS per row. Backward: each program walks a contiguous band of rows,
recomputes the normalized row from the saved input and rstd, writes dX per row and keeps its share
of dW in fp32 registers; the per-program partial sums are reduced once at the end (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import TORCH_TO_TL_NAME, CompileSpec, check_tensor, signature, sm_count, triton_compat

triton_compat()

# The row lives in registers: at 16384 columns over 16 warps, 32 values per thread per live row.
# `python -m kernels.report` shows no spills up to here on sm_80/sm_90, but only for the vectorized
# variant Triton compiles when D, the row strides and the pointers are multiples of 16 (bytes for
# pointers); unaligned rows cost a register per element and spill above 8192 columns. So wider rows
# must have D % 16 == 0, and their inputs are copied to aligned storage when they are offset views.
MAX_D = 16384
MAX_UNALIGNED_D = 8192
MIN_BLOCK_D = 16
# From this width the backward reads the row twice (the second time from L1/L2) instead of keeping
# it live across the row reduction next to the dW accumulator, which spilled. With Triton 3.6 one variant
# still spills 8 B on sm_80 (fp32 x and weight, with dh): its cross-warp reduction keeps a register live from
# one row to the next, at the 128-register cap of 16 warps; Triton 3.8 compiles it without.
RELOAD_FROM_BLOCK_D = 16384


def _num_warps(block_d: int) -> int:
    # About 16 elements per thread per row: enough for 128-bit loads, few registers, good occupancy.
    return min(16, max(1, block_d // 512))


def _reload_row(block_d: int) -> bool:
    return block_d >= RELOAD_FROM_BLOCK_D


def _block_d(n_cols: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(n_cols))


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,
                         stride_x_row, stride_res_row, stride_y_row, stride_h_row,
                         n_cols, eps,
                         BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ res, rounded to x's dtype); rstd = 1 / sqrt(mean(h^2) + eps); y = h * rstd * w."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res_row + cols, mask=mask, other=0.0)
        # The stored residual stream is in x's dtype, and the norm is taken of exactly that value.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h_row + cols, x, mask=mask)
    # w is loaded before the statistics, not after: with Triton 3.6 (ptxas 12.8) its addresses otherwise stay live
    # across the calls of the sqrt/div slow paths and spill 8-16 B at 8192-16384 columns.
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    # eps may arrive as an fp64 scalar (torch.compile): the cast keeps the row math in fp32.
    # sqrt_rn/div_rn round once each, like torch.rsqrt; the approximate forms are off by ulps.
    rstd = tl.div_rn(1.0, tl.sqrt_rn((mean_sq + eps).to(tl.float32)))
    tl.store(rstd_ptr + row, rstd)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, h_ptr, w_ptr, rstd_ptr, dh_ptr, dx_ptr, dw_partial_ptr,
                         stride_dy_row, stride_h_row, stride_dh_row, stride_dx_row,
                         n_rows, n_cols, rows_per_program,
                         BLOCK_D: tl.constexpr, HAS_DH: tl.constexpr, RELOAD_ROW: tl.constexpr):
    """With xhat = h * rstd and g = dy * w: dx = rstd * (g - xhat * mean(g * xhat)) (+ dh, the
    gradient of the residual-stream output); dw_partial[program] = sum over its rows of dy * xhat."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy_ptrs = dy_ptr + row * stride_dy_row + cols
        h_ptrs = h_ptr + row * stride_h_row + cols
        rstd = tl.load(rstd_ptr + row)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        xhat = tl.load(h_ptrs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32) * rstd
        w = tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        c = tl.sum(dy * w * xhat, axis=0) / n_cols
        if RELOAD_ROW:
            # Wide rows: rather than keep dy, xhat and w live across the reduction next to the dW
            # accumulator (which spills at 16384 columns), read them again from L1/L2.
            dy = tl.load(dy_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            xhat = tl.load(h_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32) * rstd
            w = tl.load(w_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        dw += dy * xhat
        dx = (dy * w - xhat * c) * rstd
        if HAS_DH:
            dx += tl.load(dh_ptr + row * stride_dh_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


# -- launchers ---------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., n_cols) -> (rows, n_cols) with unit column stride: a view when the leading dims merge.
    Rows wider than MAX_UNALIGNED_D are also given an aligned start and row stride (see MAX_D)."""
    t = t.reshape(-1, n_cols)
    if t.shape[0] == 0:
        return t
    if t.stride(1) != 1:
        return t.contiguous()
    if n_cols > MAX_UNALIGNED_D and (t.stride(0) % 16 or t.data_ptr() % 16):
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _kernel_weight(weight: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    # The kernels are compiled for weights in x's dtype or fp32 (the AMP case); any other weight
    # dtype is widened to fp32 first, which is exact and costs D elements.
    return weight if weight.dtype in (x_dtype, torch.float32) else weight.float()


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_tensor("rms_norm: x", x)
    check_tensor("rms_norm: weight", weight, ndim=1)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x's last dim must equal weight's size {weight.shape[0]}, got x shape "
                         f"{tuple(x.shape)}")
    D = x.shape[-1]
    if not 1 <= D <= MAX_D:
        raise ValueError(f"rms_norm: hidden size {D} is outside the supported 1..{MAX_D}")
    if D > MAX_UNALIGNED_D and D % 16:
        raise ValueError(f"rms_norm: hidden sizes above {MAX_UNALIGNED_D} must be multiples of 16, got {D} "
                         f"(the wide-row kernels are compiled for 16-element alignment)")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        check_tensor("rms_norm: residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual is on {residual.device} but x is on {x.device}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x, residual (..., D), weight (D,) -> y (..., D) in x's dtype, h (..., D) in x's dtype (None
    without residual), rstd (rows,) fp32. Outputs are contiguous."""
    _check_inputs(x, weight, residual)
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    h = None
    if residual is not None:
        if residual.dtype not in (x.dtype, torch.float32):
            residual = residual.float()  # exact; the kernels take a residual in x's dtype or fp32
        r2 = _rows(residual, n_cols)
        h = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows > 0:
        block_d = _block_d(n_cols)
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, r2 if h is not None else x2, _kernel_weight(weight, x.dtype), y, h if h is not None else y, rstd,
            x2.stride(0), r2.stride(0) if h is not None else 0, y.stride(0), h.stride(0) if h is not None else 0,
            n_cols, eps,
            BLOCK_D=block_d, HAS_RESIDUAL=h is not None, num_warps=_num_warps(block_d), num_stages=1)
    y = y.view(x.shape)
    return y, (h.view(x.shape) if h is not None else None), rstd


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(1, min(n_rows, 8))  # the interpreter: any split is as fast as another
    # A few resident programs per SM hide load latency; more would only add dW partial rows.
    return max(1, min(n_rows, 4 * sm_count(device)))


def rms_norm_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      dh: torch.Tensor | None = None):
    """dy, h, dh (..., D) in h's dtype, weight (D,), rstd (rows,) fp32 -> dx (..., D) in h's dtype
    (including dh, the gradient that reached the residual-stream output), dweight (D,) in weight's dtype."""
    n_cols = h.shape[-1]
    for name, t in (("dy", dy), ("dh", dh)):
        if t is not None and t.shape != h.shape:
            raise ValueError(f"rms_norm backward: {name} shape {tuple(t.shape)} != input shape {tuple(h.shape)}")
    dy2, h2 = _rows(dy.to(h.dtype), n_cols), _rows(h, n_cols)
    dh2 = _rows(dh.to(h.dtype), n_cols) if dh is not None else None
    n_rows = h2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=h.dtype, device=h.device)
    if n_rows == 0:
        return dx.view(h.shape), torch.zeros_like(weight)
    programs = _backward_programs(n_rows, h.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=h.device)
    block_d = _block_d(n_cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, h2, _kernel_weight(weight, h.dtype), rstd, dh2 if dh2 is not None else dy2, dx, dw_partial,
        dy2.stride(0), h2.stride(0), dh2.stride(0) if dh2 is not None else 0, dx.stride(0),
        n_rows, n_cols, rows_per_program,
        BLOCK_D=block_d, HAS_DH=dh2 is not None, RELOAD_ROW=_reload_row(block_d),
        num_warps=_num_warps(block_d), num_stages=1)
    return dx.view(h.shape), dw_partial.sum(0).to(weight.dtype)


# -- custom ops: opaque to torch.compile (no graph break), autograd through register_autograd -------

@torch.library.custom_op("tritongpt::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = rms_norm_forward(x, weight, eps)
    return y, rstd


@torch.library.custom_op("tritongpt::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps, residual)


@torch.library.custom_op("tritongpt::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, h, weight, rstd, dh)


def _rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check_inputs(x, weight, None)  # bad inputs fail while tracing too, with the same message
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty((_rows_of(x),), dtype=torch.float32)


@_rms_norm_residual_op.register_fake
def _(x, weight, residual, eps):
    _check_inputs(x, weight, residual)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device),
            x.new_empty((_rows_of(x),), dtype=torch.float32))


@_rms_norm_backward_op.register_fake
def _(dy, h, weight, rstd, dh):
    return torch.empty(h.shape, dtype=h.dtype, device=h.device), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    # rms_norm: (x, weight, eps) -> (y, rstd); rms_norm_residual: (x, weight, residual, eps) -> (y, h, rstd).
    x, weight = inputs[0], inputs[1]
    h, rstd = (x, output[1]) if len(output) == 2 else (output[1], output[2])
    ctx.save_for_backward(h, weight, rstd)
    ctx.residual_dtype = inputs[2].dtype if len(output) == 3 else None


def _backward(ctx, dy, *rest):
    h, weight, rstd = ctx.saved_tensors
    dh = rest[0] if ctx.residual_dtype is not None else None
    dx, dweight = _rms_norm_backward_op(dy, h, weight, rstd, dh)
    if ctx.residual_dtype is None:
        return dx, dweight, None
    # h = x + residual: the same gradient reaches both, in each input's dtype.
    return dx, dweight, dx.to(ctx.residual_dtype), None


torch.library.register_autograd("tritongpt::rms_norm", _backward, setup_context=_setup)
torch.library.register_autograd("tritongpt::rms_norm_residual", _backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in fp32, returned in x's dtype.

    With `residual` (same shape as x): h = x + residual (in x's dtype) is normalized instead and
    (y, h) is returned; gradients reach x and residual. Same contract as kernels.reference.rms_norm.
    """
    if residual is None:
        return torch.ops.tritongpt.rms_norm(x, weight, float(eps))[0]
    y, h, _ = torch.ops.tritongpt.rms_norm_residual(x, weight, residual, float(eps))
    return y, h


# -- compile report ----------------------------------------------------------------------------------

def compile_specs(quick: bool = False) -> list[CompileSpec]:
    """Every (kernel, dtypes, BLOCK_D, num_warps, num_stages) the launchers can choose, as Triton
    specializes them for aligned tensors with D a multiple of 16; plus, at BLOCK_D = 8192 (the widest
    such launch, the most registers per thread), the unaligned variant (D or a stride not a multiple
    of 16, or an offset view) for every dtype combination. Weights come in x's dtype or fp32."""
    blocks = [MIN_BLOCK_D << i for i in range((MAX_D // MIN_BLOCK_D).bit_length())]
    x_dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if quick:
        blocks, x_dtypes = [1024, MAX_D], [torch.bfloat16]
    specs = []
    for x_dt in x_dtypes:
        x = TORCH_TO_TL_NAME[x_dt]
        w_names = [x] if quick or x_dt == torch.float32 else [x, "fp32"]
        res_names = [x] if quick or x_dt == torch.float32 else [x, "fp32"]
        for w in w_names:
            for block_d in blocks:
                for divisible in (True, False) if block_d == MAX_UNALIGNED_D and not quick else (True,):
                    kind = "" if divisible else " unaligned"
                    warps = _num_warps(block_d)
                    for r in [None] + res_names:
                        ptrs = {"x_ptr": x, "res_ptr": r or x, "w_ptr": w, "y_ptr": x, "h_ptr": x, "rstd_ptr": "fp32"}
                        consts = {"BLOCK_D": block_d, "HAS_RESIDUAL": r is not None}
                        specs.append(CompileSpec(
                            "_rms_norm_fwd_kernel", _rms_norm_fwd_kernel,
                            signature(_rms_norm_fwd_kernel, ptrs, ("eps",), consts), consts, warps, 1,
                            f"x={x} w={w} res={r or '-'} BLOCK_D={block_d}{kind}").aligned(divisible, ("n_cols",)))
                    for has_dh in (False, True):
                        ptrs = {"dy_ptr": x, "h_ptr": x, "w_ptr": w, "rstd_ptr": "fp32", "dh_ptr": x, "dx_ptr": x,
                                "dw_partial_ptr": "fp32"}
                        consts = {"BLOCK_D": block_d, "HAS_DH": has_dh, "RELOAD_ROW": _reload_row(block_d)}
                        specs.append(CompileSpec(
                            "_rms_norm_bwd_kernel", _rms_norm_bwd_kernel,
                            signature(_rms_norm_bwd_kernel, ptrs, (), consts), consts, warps, 1,
                            f"x={x} w={w} dh={'yes' if has_dh else 'no'} BLOCK_D={block_d}{kind}").aligned(
                            divisible, ("n_cols",)))
    return specs
