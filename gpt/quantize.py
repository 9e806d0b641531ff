"""int8 weight-only quantization for inference: `quantize_int8(model)`, `python -m gpt.sample --quantize int8`.

Batch-1 decoding reads every weight once per token, so it is bound by memory traffic. Each `nn.Linear`
of the blocks (attention c_attn/c_proj, MLP c_fc/c_proj) and, by default, the output head becomes an
`Int8Linear`: the weight as int8 (out x in) and one scale per output channel, symmetric,

    scale_j = max_i |W_ji| / 127,   q_ji = round(W_ji / scale_j) in [-127, 127],   y = (x @ q.T) * scale

so a weight is 1 byte instead of 2 (bf16) or 4 (fp32). The error of each weight is at most scale_j / 2,
hence |y_j - y_float_j| <= scale_j / 2 * sum_i |x_i| for every output channel (plus the rounding of the
compute dtype); tests/gpt/test_quantize.py checks that bound.

The matmul dequantizes inside the kernel where PyTorch has one: `torch.ops.aten._weight_int8pack_mm`
(x (M, K) in fp32/bf16/fp16, int8 weight (N, K), scales (N,) in x's dtype) on the CPU, for decoding
(at most 8 rows of bf16/fp16, 1 row of fp32: beyond that it is slower, see _PACK_MM_MAX_ROWS).
Elsewhere (prefill and evaluation, CUDA, MPS, an input that needs gradients) it is
`F.linear(x, q.to(x.dtype)) * scale`, which materialises the dequantized weight per call: the same
numbers and half the memory at rest, but more bytes moved per call, not fewer. (PyTorch's CUDA kernel
for `_weight_int8pack_mm` is, in its source, a plain fp32 loop with one thread per output, so it is not
used; nothing here has been timed on a GPU.) On the CPU int8 pays off with bf16 compute; with fp32
activations decoding is slower than with fp32 weights.

Embedding and head. The token embedding stays a float table: a lookup reads one row per token. With
tied weights the head is the same matrix, but the head reads all of it for every token, so by default
the head gets its own int8 copy (`head=True`): the embedding's float table is kept for the lookup, and
the copy costs vocab x n_embd bytes more than leaving the head float (memory), in exchange for reading
1 byte instead of 2 or 4 per head weight per decoded token (speed). `head=False` leaves the head as it is.

Inference only: the int8 weights and scales are buffers, not Parameters (no gradients, no optimizer
picks them up), and `quantize_int8` refuses a model in training mode. The parameter count
(`num_params`, `flops_per_token`, the model's repr) keeps counting the quantized weights, as before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable

# PyTorch's fused weight-only int8 matmul (CPU kernel since ~2.3; absent in some builds).
_PACK_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None) if hasattr(torch.ops, "aten") else None
# Its CPU kernel is a loop of matrix-vector products: its time grows with the rows of x. Up to these many
# rows it beats dequantize + F.linear (measured on a 2-core AVX-512 CPU, torch 2.14: bf16 2-4x faster at 1
# row, even at 8, 2-3x slower at 64); its fp32 path is slow (2-4x slower than an fp32 F.linear at 1 row,
# still faster than dequantizing to fp32 there, slower from 4 rows on).
_PACK_MM_MAX_ROWS = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 1}


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), per-output-channel scale (out,)) of a float weight, symmetric:
    scale = max|row| / 127 (a zero row gets scale 1), q = round(w / scale). The scale is stored in
    scale_dtype (default: the weight's dtype); q is rounded against the stored scale, so
    |w - q * scale| <= scale / 2 holds for the scale actually used."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight takes a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    scale = scale.to(scale_dtype or weight.dtype)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8).contiguous()
    return q, scale


def int8_matmul(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x @ weight_int8.T) * scale over the last dim of x, in x's dtype: x (..., in) -> (..., out)."""
    if scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    if (_PACK_MM is not None and x.device.type == "cpu" and 0 < rows <= _PACK_MM_MAX_ROWS.get(x.dtype, 0)
            and not (torch.is_grad_enabled() and x.requires_grad)):   # the fused op has no backward
        x2 = x.reshape(rows, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return _PACK_MM(x2, weight_int8, scale).view(*x.shape[:-1], weight_int8.shape[0])
    return F.linear(x, weight_int8.to(x.dtype)) * scale


class Int8Linear(nn.Module):
    """y = (x @ weight_int8.T) * scale (+ bias): an inference-only stand-in for `nn.Linear` (buffers only).

    Under autocast the input is cast to the autocast dtype first, as autocast does for `nn.Linear`;
    otherwise the matmul runs in the input's dtype, and the output has that dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> "Int8Linear":
        """The int8 version of `linear` (its weight quantized per output channel, its bias kept as is)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=False, device=w.device)
        m.weight_int8, m.scale = quantize_weight(w, scale_dtype)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        for name, value in vars(linear).items():   # plain attributes the model set (residual_projection)
            if not name.startswith("_") and name not in ("in_features", "out_features", "training"):
                setattr(m, name, value)
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, weight_int8 * scale, as a float (out, in) tensor."""
        return self.weight_int8.to(dtype) * self.scale.to(dtype).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = int8_matmul(x, self.weight_int8, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 weight, {str(self.scale.dtype).removeprefix('torch.')} per-channel scale")


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of the stored weights: parameters and persistent buffers (the state dict), a tied tensor
    counted once; the RoPE tables (not saved) are left out."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _keep_param_count(model) -> None:
    """`num_params` counts nn.Parameters, and the int8 weights are buffers: record the model's counts
    before quantization, which GPT.num_params (and so flops_per_token and the repr) then reports."""
    if getattr(model, "quantized_param_counts", None) is not None or not hasattr(model, "num_params"):
        return   # quantized before (the counts are already kept), or not a GPT
    model.quantized_param_counts = (model.num_params(), model.num_params(non_embedding=True))


def quantize_int8(model: nn.Module, head: bool = True) -> nn.Module:
    """Replace every nn.Linear inside model.blocks (and, with head=True, model.lm_head) with an
    `Int8Linear`, in place; returns the model. For inference: the model must be in eval mode.

    The embedding table stays float. With a tied head, head=True quantizes a copy of the embedding for
    the head (vocab x n_embd int8 bytes more memory, 1 byte per head weight read per token instead of
    2 or 4); head=False leaves the head float. Scales are stored in each weight's dtype (cast the model
    with `cast_weights_` first to get bf16 scales). Layers that are already Int8Linear are left as they are.
    """
    if model.training:
        raise ConfigError("quantize_int8 is for inference only (int8 weights have no gradients): "
                          "call model.eval() first")
    _keep_param_count(model)
    with torch.no_grad():
        for parent in list(model.blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Int8Linear.from_linear(child))
        if head and type(model.lm_head) is nn.Linear:
            # Tied: the head's weight is the embedding's; the int8 copy is the head's own, wte keeps the float table.
            model.lm_head = Int8Linear.from_linear(model.lm_head)
    return model


__all__ = ["Int8Linear", "int8_matmul", "quantize_int8", "quantize_weight", "weight_nbytes"]
