"""Triton kernels for the GPT's hot ops, each with a pure-PyTorch reference in `kernels.reference`.

The public ops are the names in `OPS`: `kernels.rms_norm(x, weight, eps, residual=None)`,
`kernels.rope(x, cos, sin)` and `kernels.rope_qk(q, k, cos, sin)`, `kernels.swiglu(gate, up)` and
`kernels.swiglu_packed(gate_up)`, `kernels.attention(q, k, v, causal, scale)`,
`kernels.attention_with_lse(...)` and `kernels.decode_attention(q, k, v, kv_len, scale)` (a static KV cache
masked by per-row lengths, inference only), `kernels.linear_cross_entropy(x, weight, targets, ignore_index,
reduction, z_loss)` (the output head and its loss, the logits never materialized); `kernels.reference.<op>` has the same signature. They live in private
modules (`kernels._rms_norm`, ...), so a public name is always the function, never a submodule, and are
imported on first use: `import kernels` and `kernels.reference` work without Triton.
"""
from __future__ import annotations

import importlib

from ._runtime import KernelsUnavailable

# public op -> the private module that defines it
_MODULE_OF = {
    "rms_norm": "_rms_norm",
    "rope": "_rope",
    "rope_qk": "_rope",
    "swiglu": "_swiglu",
    "swiglu_packed": "_swiglu",
    "attention": "_attention",
    "attention_with_lse": "_attention",
    "decode_attention": "_attention",
    "linear_cross_entropy": "_linear_cross_entropy",
}
OPS = tuple(_MODULE_OF)
# The modules holding @triton.jit kernels, in the order `python -m kernels.report` compiles them.
KERNEL_MODULES = tuple(f"kernels.{m}" for m in dict.fromkeys(_MODULE_OF.values()))

__all__ = [*OPS, "OPS", "KERNEL_MODULES", "KernelsUnavailable"]


def __getattr__(name: str):
    """PEP 562: the op is imported from its module the first time it is asked for, then cached here."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"kernels.{_MODULE_OF[name]}"), name)
    globals()[name] = fn
    return fn


def __dir__():
    return sorted([*globals(), *OPS])
