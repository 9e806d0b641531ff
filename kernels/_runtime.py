"""What the kernel modules share: can Triton run here, input checks, dtype and device helpers, and the
description of one compiled configuration (`CompileSpec`) that `python -m kernels.report` compiles."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch


class KernelsUnavailable(RuntimeError):
    """The Triton kernels cannot run here (no CUDA GPU and no interpreter, Triton missing, or an
    unsupported device); the message says why and what to use instead."""


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORT: dict = {}  # memo, "error" -> None or the reason. Not functools.cache: torch.compile traces
                          # this (from the custom ops' fake implementations) and warns about cache wrappers.


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


# ----------------------------------------------------------------------------------------------------------
# Differences between the supported Triton versions. The only place that knows about them: every kernel
# module calls `triton_compat()` once, right after importing Triton, and nothing else checks a version.
# ----------------------------------------------------------------------------------------------------------

def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '3.7.0+git1234'."""
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


_COMPAT_DONE: dict = {}


def triton_compat() -> None:
    """Make the installed Triton behave like the newest one where the kernels depend on it (idempotent).

    Triton < 3.7 with NumPy >= 2.4, interpreter only: the interpreter turns a scalar (held as a 1-element
    NumPy array) into a Python int with `int(array)`, which NumPy 2.4 made a TypeError for arrays with
    ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"). Every `range(lo, hi, STEP)`
    over a run-time bound in a kernel goes through it. Triton 3.7 converts with `int(array.squeeze())`
    (triton-lang/triton#9171); on older Triton the interpreter is given that same conversion here.
    Compiled kernels are unaffected.
    """
    if _COMPAT_DONE:
        return
    _COMPAT_DONE["done"] = True
    import triton

    if interpreting() and _version(triton.__version__) < (3, 7):
        from triton.runtime import interpreter

        patch_tensor = interpreter._patch_lang_tensor
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731

        def _patch_lang_tensor(tensor, *scope):  # 3.6: (tensor, scope) restores the patches after a launch;
            patch_tensor(tensor, *scope)         # 3.5: (tensor) patches for good
            if scope:
                scope[0].set_attr(tensor, "__index__", index)
            else:
                tensor.__index__ = index

        interpreter._patch_lang_tensor = _patch_lang_tensor


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: dtypes as users type them."""
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t: torch.Tensor, *, ndim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)) -> None:
    """Validate a launcher input at the boundary, with an error that names the problem and the fix."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {dtype_name(t.dtype)}; supported: {names} (cast it first)")
    reason = triton_unavailable_reason(t.device)
    if reason is not None:
        raise KernelsUnavailable(f"{name} is on {t.device}: {reason}")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim has stride 1 (the kernels' vectorized loads need it), else a copy.
    Every other stride is passed to the kernels, so transposed views are read in place."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The interpreter sizes its launches like an A100, so CPU tests take the paths a GPU would.
INTERPRETER_NUM_SMS = 108


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (INTERPRETER_NUM_SMS elsewhere)."""
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


TORCH_TO_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class CompileSpec:
    """One kernel + launch configuration for `python -m kernels.report` to compile for real GPU targets.

    Every kernel module exposes `compile_specs(quick: bool = False) -> list[CompileSpec]` listing the
    configurations its launchers can actually choose (quick=True: a small representative subset).
    """
    kernel: str                # the @triton.jit function's name, as shown in the table
    fn: object                 # the @triton.jit function
    signature: dict            # argument -> Triton type ("*fp16", "i32", "fp32", "constexpr"), see `signature`
    constexprs: dict           # tl.constexpr argument -> value
    num_warps: int
    num_stages: int
    label: str                 # the config as shown in the table
    expects_mma: bool = False  # a dot-based kernel: the report fails it if no tensor-core instruction appears
    # Arguments Triton may assume to be multiples of 16 (pointers: 16-byte aligned). Triton specializes a
    # launch on this; by default the common case: every pointer and stride. See `aligned`.
    divisible_by_16: tuple = field(default=None)

    def __post_init__(self):
        if self.divisible_by_16 is None:
            self.divisible_by_16 = tuple(name for name, ty in self.signature.items()
                                         if ty.startswith("*") or name.startswith("stride"))

    def aligned(self, divisible: bool, sizes=()) -> "CompileSpec":
        """This spec as Triton compiles it for a launch whose pointers are 16-byte aligned and whose strides
        and `sizes` are multiples of 16 (divisible=True), or for one where nothing is (divisible=False: no
        vectorized accesses, the worst case for registers)."""
        if divisible:
            self.divisible_by_16 = tuple(name for name, ty in self.signature.items()
                                         if ty.startswith("*") or name.startswith("stride") or name in sizes)
        else:
            self.divisible_by_16 = ()
        return self


def signature(fn, pointers: dict, floats=(), constexprs=()) -> dict:
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
