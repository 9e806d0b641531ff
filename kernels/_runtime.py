"""What the kernels share: can Triton run here, interpreter detection, dtype helpers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORT = {}  # memo: "error" -> None or the reason triton does not import


def triton_import_error() -> str | None:
    """None if triton imports, else the reason it does not."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_IMPORT["error"] = None
        except Exception as e:  # ImportError, or a broken install raising something else
            _TRITON_IMPORT["error"] = f"{type(e).__name__}: {e}"
    return _TRITON_IMPORT["error"]


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None if Triton kernels can run on tensors of `device`, else a one-line reason and fix."""
    device = torch.device(device)
    err = triton_import_error()
    if err is not None:
        return f"Triton is not importable ({err}); install it with `pip install triton` or use kernels='torch'"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    if device.type == "cpu":
        return ("Triton kernels need a CUDA GPU; on CPU they run only in Triton's interpreter "
                "(set TRITON_INTERPRET=1, slow, for testing) — or use kernels='torch'/'auto'")
    return f"Triton kernels do not run on device '{device.type}'; use kernels='torch' or 'auto'"


def check_tensor(name: str, t: torch.Tensor, *, ndim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)) -> None:
    """Validate a launcher input at the boundary, with an error that names the problem and the fix."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names} (cast it first)")
    reason = triton_unavailable_reason(t.device)
    if reason is not None:
        raise RuntimeError(f"{name} is on {t.device}: {reason}")


TORCH_TO_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class CompileSpec:
    """One kernel + launch configuration for `python -m kernels.report` to compile for real GPU targets.

    signature: kernel argument name -> Triton type string ("*fp16", "*fp32", "i32", "fp32", ...);
    constexprs: name -> value for the tl.constexpr arguments; label: the config as shown in the table.
    Every kernel module exposes `compile_specs(quick: bool = False) -> list[CompileSpec]` listing the
    configurations its launchers can actually choose (quick=True: a small representative subset).
    """

    def __init__(self, kernel: str, fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int,
                 label: str, expects_mma: bool = False):
        self.kernel, self.fn, self.signature, self.constexprs = kernel, fn, signature, constexprs
        self.num_warps, self.num_stages, self.label, self.expects_mma = num_warps, num_stages, label, expects_mma

    def __repr__(self):
        return f"CompileSpec({self.kernel}, {self.label}, warps={self.num_warps}, stages={self.num_stages})"


def compile_signature(fn, pointers: dict, floats=(), constexprs=()) -> dict:
    """A CompileSpec signature for `fn`: `pointers` maps argument -> element type ("bf16"), `floats`
    are fp32 scalars, `constexprs` are typed "constexpr", every other argument (sizes, strides) i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig
