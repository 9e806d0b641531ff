"""Triton kernels for the GPT's hot ops, each with a pure-PyTorch reference in `kernels.reference`.

Public ops (DESIGN.md section 2): rms_norm, rope, swiglu, attention; and the fused forms
rope_qk (q and k in one launch) and swiglu_packed (one [gate | up] tensor). They are imported lazily so
that `import kernels.reference` works without Triton.
"""
from __future__ import annotations

import importlib

_OPS = {
    "rms_norm": "kernels.rms_norm",
    "rope": "kernels.rope",
    "rope_qk": "kernels.rope",
    "swiglu": "kernels.swiglu",
    "swiglu_packed": "kernels.swiglu",
    "attention": "kernels.attention",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
