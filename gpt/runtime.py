"""Device and precision choices shared by the model, the trainer, the sampler and the benchmarks."""
from __future__ import annotations

import contextlib
import time

import torch

from kernels._runtime import dtype_name

from .errors import ConfigError, option

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if present, else mps, else cpu. An unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} ({e}); use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device 'cuda' requested but no CUDA GPU is visible; use {option('device', 'cpu')} or "
                          f"{option('device', 'auto')}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device 'mps' requested but MPS is not available; use {option('device', 'cpu')} or "
                          f"{option('device', 'auto')}")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively and beat fp32 several times over."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> the fastest safe compute dtype for `device`:
    CUDA: bfloat16 if supported (no loss scaling needed) else float16; CPU: bfloat16 when the CPU has
    native bf16 (AVX-512 BF16 / AMX), else float32; MPS: float32 (its bf16 autocast is partial)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError(f"float16 autocast on CPU is slow and imprecise; use {option('dtype', 'bfloat16')} or "
                          f"{option('dtype', 'float32')}")
    return dtype


def resolve_compute_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The compute dtype of a `dtype` argument: None is float32, a name is `resolve_dtype`'s ('auto' for
    the device's fastest), a torch.dtype is itself."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return resolve_dtype(dtype, device)
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context: weights stay fp32, matmuls run in `dtype` (nothing for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense peak TFLOP/s per GPU family (vendor datasheets; bf16/fp16 tensor cores, fp32 = TF32 dense where
# matmuls run in TF32, which PyTorch does for fp32 only when allowed). First matching name wins.
GPU_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H800", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]

_MEASURED_PEAK: dict = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best observed FLOP/s of an n x n matmul in `dtype` on `device`: the CPU's peak for MFU, and the
    benchmarks' measured matmul roofline on every device."""
    g = torch.Generator().manual_seed(0)  # a private generator: measuring must not shift the global RNG
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _calibration_sizes(device: torch.device, dtype: torch.dtype, budget_s: float = 1.0) -> tuple[int, ...]:
    """The two largest of 256..2048 whose matmul takes at most `budget_s` at the rate a small one shows:
    (1024, 2048) on a CPU with native support for the dtype; smaller where it is emulated (bf16 on a CPU
    without AVX-512 BF16 or AMX runs ~100x slower than fp32, and a 2048 matmul would take ~20 s each)."""
    rate = measure_matmul_flops(device, dtype, 256, reps=2)
    fit = [n for n in (256, 512, 1024, 2048) if 2 * n ** 3 / rate <= budget_s]
    return tuple(fit[-2:]) or (256,)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for MFU: the datasheet table on known GPUs, else a
    matmul measured once per process in the training dtype."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for family, peaks in GPU_PEAK_TFLOPS:
            if family in name and key in peaks:
                return peaks[key] * 1e12, f"{family} {key} datasheet"
    cache_key = (device.type, dtype)
    if cache_key not in _MEASURED_PEAK:
        # Best of two sizes and many repeats: a busy moment must not lower the peak (and inflate MFU).
        _MEASURED_PEAK[cache_key] = max(measure_matmul_flops(device, dtype, n, reps=8)
                                        for n in _calibration_sizes(device, dtype))
    return _MEASURED_PEAK[cache_key], f"measured {dtype_name(dtype)} matmul on {device.type}"
