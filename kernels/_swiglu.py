"""SwiGLU, silu(gate) * up: Triton kernels, launchers, custom ops, `swiglu` and `swiglu_packed`.

Elementwise over (rows, N) tiles addressed through row strides, so the two halves of a chunked
[gate | up] projection are read in place. The backward recomputes sigmoid(gate) instead of saving it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import TORCH_TO_TL_NAME, CompileSpec, check_tensor, signature, triton_compat

triton_compat()

# Elements per program (BLOCK_M x BLOCK_N): 16 per thread per tensor at 4 warps, which keeps
# 128-bit loads and leaves registers for the fp32 math of the backward.
TILE = 2048
MIN_BLOCK_N = 16
NUM_WARPS = 4


def _block_n(n_cols: int) -> int:
    return min(TILE, max(MIN_BLOCK_N, triton.next_power_of_2(n_cols)))


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) in fp32 without overflowing exp for large negative x."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr,
                       stride_gate_row, stride_up_row, stride_out_row,
                       n_rows, n_cols,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = gate * sigmoid(gate) * up, in fp32, stored in gate's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows[:, None]
    cols = cols[None, :]
    g = tl.load(gate_ptr + rows * stride_gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up_row + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * _sigmoid(g) * u
    tl.store(out_ptr + rows * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
                       stride_dy_row, stride_gate_row, stride_up_row, stride_dgate_row, stride_dup_row,
                       n_rows, n_cols,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """With s = sigmoid(gate): dup = dy * gate * s, dgate = dy * up * s * (1 + gate * (1 - s))."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows[:, None]
    cols = cols[None, :]
    dy = tl.load(dy_ptr + rows * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * stride_gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up_row + cols, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    du = dy * (g * s)
    dg = dy * u * (s * (1.0 + g * (1.0 - s)))
    tl.store(dgate_ptr + rows * stride_dgate_row + cols, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * stride_dup_row + cols, du.to(dup_ptr.dtype.element_ty), mask=mask)


# -- launchers ---------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., n_cols) -> (rows, n_cols) with unit column stride: a view when the leading dims merge
    (true for either half of a chunked [gate | up] projection)."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def _config(n_cols: int):
    block_n = _block_n(n_cols)
    return TILE // block_n, block_n


def _grid(n_rows: int, n_cols: int, block_m: int, block_n: int):
    return triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensor("swiglu: gate", gate)
    check_tensor("swiglu: up", up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; they must match")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")
    if gate.dim() == 0:
        raise ValueError("swiglu: inputs must have at least one dim")


def _split(gate_up: torch.Tensor):
    check_tensor("swiglu_packed: gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: gate_up's last dim must be even ([gate | up]), got {tuple(gate_up.shape)}")
    return gate_up.chunk(2, dim=-1)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., N), same dtype -> silu(gate) * up, contiguous, in their dtype."""
    _check(gate, up)
    n_cols = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2, o2 = _rows(gate, n_cols), _rows(up, n_cols), out.view(-1, n_cols)
    block_m, block_n = _config(n_cols)
    _swiglu_fwd_kernel[_grid(g2.shape[0], n_cols, block_m, block_n)](
        g2, u2, o2, g2.stride(0), u2.stride(0), o2.stride(0), g2.shape[0], n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS, num_stages=1)
    return out


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor | None = None,
                    dup: torch.Tensor | None = None):
    """dy, gate, up (..., N) -> dgate, dup (..., N) in gate's dtype, written into the given outputs
    (views whose leading dims merge, e.g. the halves of one [dgate | dup] buffer) or new tensors."""
    _check(gate, up)
    if dy.shape != gate.shape:
        raise ValueError(f"swiglu backward: dy shape {tuple(dy.shape)} != gate shape {tuple(gate.shape)}")
    n_cols = gate.shape[-1]
    if dgate is None:
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if dgate.numel() == 0:
        return dgate, dup
    dy2 = _rows(dy.to(gate.dtype), n_cols)
    g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)
    dg2, du2 = dgate.view(-1, n_cols), dup.view(-1, n_cols)
    block_m, block_n = _config(n_cols)
    _swiglu_bwd_kernel[_grid(g2.shape[0], n_cols, block_m, block_n)](
        dy2, g2, u2, dg2, du2, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
        g2.shape[0], n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS, num_stages=1)
    return dgate, dup


# -- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("tritongpt::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate, up)


@torch.library.custom_op("tritongpt::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dy, gate, up)


@torch.library.custom_op("tritongpt::swiglu_packed", mutates_args=())
def _swiglu_packed_op(gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(*_split(gate_up))


@torch.library.custom_op("tritongpt::swiglu_packed_backward", mutates_args=())
def _swiglu_packed_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    # Both gradients land in one [dgate | dup] buffer: no concatenation after the kernel.
    d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    swiglu_backward(dy, *_split(gate_up), *d_gate_up.chunk(2, dim=-1))
    return d_gate_up


def _half_shape(gate_up: torch.Tensor):
    return (*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@_swiglu_op.register_fake
def _(gate, up):
    _check(gate, up)  # bad inputs fail while tracing too, with the same message
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


@_swiglu_packed_op.register_fake
def _(gate_up):
    _split(gate_up)
    return torch.empty(_half_shape(gate_up), dtype=gate_up.dtype, device=gate_up.device)


@_swiglu_packed_backward_op.register_fake
def _(dy, gate_up):
    return torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dy, gate, up)


def _packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_packed_backward_op(dy, gate_up)


torch.library.register_autograd("tritongpt::swiglu", _backward, setup_context=_setup)
torch.library.register_autograd("tritongpt::swiglu_packed", _packed_backward, setup_context=_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the sigmoid in fp32; gate and up may be strided views (e.g. the halves
    of `proj.chunk(2, dim=-1)`). Same contract as kernels.reference.swiglu."""
    return _swiglu_op(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """swiglu(*gate_up.chunk(2, dim=-1)) for one (..., 2N) [gate | up] projection -> (..., N).

    Same forward as `swiglu` on the two halves; the backward writes d(gate_up) as one buffer, which
    saves the copy autograd makes to concatenate the halves' gradients after `chunk`: 4N of the 9N
    elements per row the unpacked backward reads and writes. Contract: kernels.reference.swiglu_packed.
    """
    return _swiglu_packed_op(gate_up)


# -- compile report ----------------------------------------------------------------------------------

def compile_specs(quick: bool = False) -> list[CompileSpec]:
    """Every (kernel, dtype, BLOCK_M x BLOCK_N, num_warps, num_stages) the launchers can choose, as
    Triton specializes them for aligned inputs (N and the row strides multiples of 16); plus the
    unaligned variant (e.g. the halves of an odd-width projection) at the narrowest and widest block
    (every block holds the same 16 elements per thread)."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    blocks = [MIN_BLOCK_N << i for i in range((TILE // MIN_BLOCK_N).bit_length())]
    if quick:
        dtypes, blocks = (torch.bfloat16,), [TILE]
    specs = []
    for dt in dtypes:
        x = TORCH_TO_TL_NAME[dt]
        kernels = [("_swiglu_fwd_kernel", _swiglu_fwd_kernel, {"gate_ptr": x, "up_ptr": x, "out_ptr": x}),
                   ("_swiglu_bwd_kernel", _swiglu_bwd_kernel,
                    {"dy_ptr": x, "gate_ptr": x, "up_ptr": x, "dgate_ptr": x, "dup_ptr": x})]
        for block_n in blocks:
            consts = {"BLOCK_M": TILE // block_n, "BLOCK_N": block_n}
            for divisible in (True, False) if block_n in (blocks[0], blocks[-1]) and not quick else (True,):
                label = f"x={x} BLOCK_M={TILE // block_n} BLOCK_N={block_n}{'' if divisible else ' unaligned'}"
                for name, fn, ptrs in kernels:
                    specs.append(CompileSpec(name, fn, signature(fn, ptrs, (), consts), consts, NUM_WARPS, 1,
                                             label).aligned(divisible, ("n_cols",)))
    return specs
