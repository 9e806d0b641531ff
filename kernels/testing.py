"""Accuracy checks shared by every kernel test (and usable by anyone adding a kernel).

The rule (after flash-attention's tests): an op's error against a float64 reference must be at most
`factor` times the error that PyTorch itself makes computing the same thing in the same dtype
(2x for forward outputs, 3x for gradients), plus one unit of rounding at the output's scale.
The extra ulp covers the case where the same-dtype PyTorch result happens to be exact.
"""
from __future__ import annotations

import torch

FWD_FACTOR = 2.0
GRAD_FACTOR = 3.0


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def error_bound(ref64: torch.Tensor, same_dtype: torch.Tensor, factor: float, dtype: torch.dtype) -> float:
    """factor * max|same_dtype - ref64| + one ulp of `dtype` at the reference's scale."""
    base = (same_dtype.double() - ref64.double()).abs().max().item() if ref64.numel() else 0.0
    scale = max(ref64.double().abs().max().item(), 1.0) if ref64.numel() else 1.0
    return factor * base + ulp(dtype) * scale


def assert_close_to_reference(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor,
                              factor: float = FWD_FACTOR, dtype: torch.dtype | None = None) -> None:
    """Assert |out - ref64| <= error_bound(...) everywhere; on failure report max/mean error,
    the worst index, how many elements are off, and the PyTorch baseline error."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    dtype = dtype or out.dtype
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite values in output")
    err = (out.double().cpu() - ref64.double().cpu()).abs()
    bound = error_bound(ref64.cpu(), same_dtype.cpu(), factor, dtype)
    if err.numel() == 0:
        return
    max_err = err.max().item()
    if max_err > bound:
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        base = (same_dtype.double().cpu() - ref64.double().cpu()).abs()
        raise AssertionError(
            f"{name} ({str(dtype).replace('torch.', '')}, shape {tuple(out.shape)}): max error {max_err:.3e} > bound "
            f"{bound:.3e} ({factor}x PyTorch's same-dtype max error {base.max().item():.3e} + 1 ulp); "
            f"mean error {err.mean().item():.3e} (PyTorch {base.mean().item():.3e}); "
            f"worst at {worst}: got {out.double().cpu()[worst].item():.6g}, want {ref64.double().cpu()[worst].item():.6g}; "
            f"{(err > bound).sum().item()}/{err.numel()} elements over the bound")
