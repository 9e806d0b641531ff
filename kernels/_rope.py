"""Rotary position embedding (rotate-half): Triton kernel, launcher, custom ops, `rope` and `rope_qk`.

One kernel rotates q and, in the same launch, k (which may have fewer heads: GQA/MQA). The grid is
(time blocks, groups of q and k heads, batch): each program rotates BLOCK_T positions of a few
heads with one cos/sin tile. Inputs are addressed through their (batch, head, time) strides, so a
(B, T, H, D) -> (B, H, T, D) transposed view is read in place. The backward is the same kernel with sin negated (the rotation
by -angle is the transpose of the rotation by angle).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import TORCH_TO_TL_NAME, CompileSpec, check_tensor, signature, triton_compat, unit_last_stride

triton_compat()

MAX_HEAD_DIM = 512
MAX_GRID = 65535  # CUDA's limit on grid axes 1 and 2 (heads, batch)
MIN_BLOCK_HALF = 8
# Elements of one half-rotation tile (BLOCK_T x BLOCK_HALF) per program: 8 per thread per half at
# 4 warps, so the two halves, cos and sin stay in a few dozen registers.
TILE = 1024
NUM_WARPS = 4
# Heads rotated per program with one cos/sin tile: the fp32 tables would otherwise be read from L2
# once per head, twice the bytes of a bf16 head; four heads cut that to half while leaving
# (T / BLOCK_T) * ceil(heads / 4) * B programs to fill the GPU.
HEADS_PER_PROGRAM = 4


def _block_half(half: int) -> int:
    return max(MIN_BLOCK_HALF, triton.next_power_of_2(half))


def _block_t(block_half: int) -> int:
    return max(1, TILE // block_half)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
                 stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t,
                 stride_qo_b, stride_qo_h, stride_qo_t, stride_ko_b, stride_ko_h, stride_ko_t,
                 stride_cos_t, stride_sin_t,
                 n_q_heads, n_heads, heads_per_program, seq_len, half,
                 BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """With x1, x2 the two halves of a head vector at position t:
    out = cat(x1 * cos[t] - x2 * sin[t], x2 * cos[t] + x1 * sin[t]), in fp32, stored in x's dtype.
    Heads 0 .. n_q_heads-1 are q's, n_q_heads .. n_heads-1 are k's; a program rotates BLOCK_T
    positions of `heads_per_program` consecutive heads, reusing its cos/sin tile for all of them."""
    pid_t = tl.program_id(0)
    head_start = tl.program_id(1).to(tl.int64) * heads_per_program
    batch = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_HALF)
    mask = (t < seq_len)[:, None] & (d < half)[None, :]
    t64 = t.to(tl.int64)[:, None]
    cos = tl.load(cos_ptr + t64 * stride_cos_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t64 * stride_sin_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    for head in range(head_start, tl.minimum(head_start + heads_per_program, n_heads)):
        if head < n_q_heads:
            h = head
            x_ptrs = q_ptr + batch * stride_q_b + h * stride_q_h + t64 * stride_q_t + d[None, :]
            out_ptrs = q_out_ptr + batch * stride_qo_b + h * stride_qo_h + t64 * stride_qo_t + d[None, :]
        else:
            h = head - n_q_heads
            x_ptrs = k_ptr + batch * stride_k_b + h * stride_k_h + t64 * stride_k_t + d[None, :]
            out_ptrs = k_out_ptr + batch * stride_ko_b + h * stride_ko_h + t64 * stride_ko_t + d[None, :]
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (x1 * cos - x2 * sin).to(out_ptrs.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + half, (x2 * cos + x1 * sin).to(out_ptrs.dtype.element_ty), mask=mask)


# -- launcher ----------------------------------------------------------------------------------------

def _check(name: str, x: torch.Tensor) -> None:
    check_tensor(f"rope: {name}", x, ndim=4)
    D = x.shape[-1]
    if D % 2 or not 2 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"rope: {name}'s head dim must be even and in 2..{MAX_HEAD_DIM}, got shape {tuple(x.shape)}")


def _check_table(name: str, t: torch.Tensor, T: int, half: int, device: torch.device) -> None:
    check_tensor(f"rope: {name}", t, ndim=2)
    if tuple(t.shape) != (T, half):
        raise ValueError(f"rope: {name} must be (T, D//2) = ({T}, {half}), got {tuple(t.shape)}; "
                         f"for KV-cache decode pass the rows of the positions being rotated")
    if t.device != device:
        raise ValueError(f"rope: {name} is on {t.device} but the input is on {device}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _check("q" if k is not None else "x", q)
    B, H, T, D = q.shape
    if k is not None:
        _check("k", k)
        if k.dtype != q.dtype:
            raise TypeError(f"rope: q is {q.dtype} but k is {k.dtype}; they must match")
        if k.device != q.device:
            raise ValueError(f"rope: q is on {q.device} but k is on {k.device}")
        if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
            raise ValueError(f"rope: k shape {tuple(k.shape)} must match q shape {tuple(q.shape)} except in heads")
    if B > MAX_GRID or H + (k.shape[1] if k is not None else 0) > MAX_GRID:
        raise ValueError(f"rope: batch {B} and total heads must each be at most {MAX_GRID} (CUDA grid limit)")
    _check_table("cos", cos, T, D // 2, q.device)
    _check_table("sin", sin, T, D // 2, q.device)


def _kernel_table(t: torch.Tensor) -> torch.Tensor:
    # The kernel reads fp32 tables (the model caches them so): casting a (T, D/2) table is exact and cheap.
    t = t.float()
    return t if t.stride(1) == 1 else t.contiguous()


def rope_forward(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, H, T, D), k (B, Hkv, T, D) or None, cos/sin (T, D//2) -> rotated q and k (None if k is
    None), contiguous, in the inputs' dtype. Any (batch, head, time) strides are read in place."""
    _check_inputs(q, k, cos, sin)
    B, H, T, D = q.shape
    n_k_heads = k.shape[1] if k is not None else 0
    cos, sin = _kernel_table(cos), _kernel_table(sin)
    q = unit_last_stride(q)
    q_out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if k is not None:
        k = unit_last_stride(k)
        k_out = torch.empty(tuple(k.shape), dtype=k.dtype, device=k.device)
    else:
        k, k_out = q, q_out  # never addressed: the grid has no k heads
    block_half = _block_half(D // 2)
    block_t = _block_t(block_half)
    n_heads = H + n_k_heads
    heads_per_program = min(HEADS_PER_PROGRAM, max(n_heads, 1))
    grid = (triton.cdiv(T, block_t), triton.cdiv(n_heads, heads_per_program), B)
    if min(grid) > 0:
        _rope_kernel[grid](
            q, k, q_out, k_out, cos, sin,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            cos.stride(0), sin.stride(0),
            H, n_heads, heads_per_program, T, D // 2,
            BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=NUM_WARPS, num_stages=1)
    return q_out, (k_out if k_out is not q_out else None)


# -- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("tritongpt::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_forward(x, None, cos, sin)[0]


@torch.library.custom_op("tritongpt::rope_qk", mutates_args=())
def _rope_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_forward(q, k, cos, sin)


@_rope_op.register_fake
def _(x, cos, sin):
    _check_inputs(x, None, cos, sin)  # bad inputs fail while tracing too, with the same message
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_rope_qk_op.register_fake
def _(q, k, cos, sin):
    _check_inputs(q, k, cos, sin)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


def _setup(ctx, inputs, output):
    cos, sin = inputs[-2], inputs[-1]
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope_op(dy, cos, -sin), None, None


def _rope_qk_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_qk_op(dq, dk, cos, -sin)
    return dq, dk, None, None


torch.library.register_autograd("tritongpt::rope", _rope_backward, setup_context=_setup)
torch.library.register_autograd("tritongpt::rope_qk", _rope_qk_backward, setup_context=_setup)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (B, H, T, D) with cos/sin (T, D//2); returns a contiguous (B, H, T, D).

    x may be a strided view (e.g. (B, T, H, D).transpose(1, 2)); it is read in place. cos/sin are
    constants (no gradient). Same contract as kernels.reference.rope.
    """
    return _rope_op(x, cos, sin)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(rope(q, cos, sin), rope(k, cos, sin)) in one launch; k may have fewer heads than q (GQA)."""
    return _rope_qk_op(q, k, cos, sin)


# -- compile report ----------------------------------------------------------------------------------

def compile_specs(quick: bool = False) -> list[CompileSpec]:
    """Every (dtype, BLOCK_HALF, BLOCK_T, num_warps, num_stages) the launcher can choose, each both as
    Triton specializes it for aligned inputs (D/2 and the strides multiples of 16) and unaligned."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    halves = [MIN_BLOCK_HALF << i for i in range((MAX_HEAD_DIM // 2 // MIN_BLOCK_HALF).bit_length())]
    if quick:
        dtypes, halves = (torch.bfloat16,), [64]
    specs = []
    for dt in dtypes:
        x = TORCH_TO_TL_NAME[dt]
        ptrs = {"q_ptr": x, "k_ptr": x, "q_out_ptr": x, "k_out_ptr": x, "cos_ptr": "fp32", "sin_ptr": "fp32"}
        for block_half in halves:
            consts = {"BLOCK_T": _block_t(block_half), "BLOCK_HALF": block_half}
            for divisible in (True,) if quick else (True, False):
                specs.append(CompileSpec(
                    "_rope_kernel", _rope_kernel, signature(_rope_kernel, ptrs, (), consts), consts, NUM_WARPS, 1,
                    f"x={x} BLOCK_T={consts['BLOCK_T']} BLOCK_HALF={block_half}{'' if divisible else ' unaligned'}"
                ).aligned(divisible, ("half",)))
    return specs
