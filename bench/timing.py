"""Timers, one-off device calibration (copy bandwidth) and peak-memory tracking.

CPU: torch.utils.benchmark (blocked autorange over all intra-op threads). CUDA: triton.testing.do_bench
(it flushes L2 before every run; callers also rotate through input copies larger than L2).
Every time is reported as the median with the 20% and 80% quantiles of the samples.
"""
from __future__ import annotations

import contextlib
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    samples: int
    method: str

    def to_dict(self) -> dict:
        return {"median_ms": self.median_s * 1e3, "p20_ms": self.p20_s * 1e3, "p80_ms": self.p80_s * 1e3,
                "samples": self.samples, "timer": self.method}


def summarize(times: list[float], method: str) -> Timing:
    """Median and 20/80% quantiles (linear interpolation) of per-run times in seconds."""
    if not times:
        raise ValueError("no timing samples")
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1, method)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = 20%, q[7] = 80%
    return Timing(statistics.median(times), q[1], q[7], len(times), method)


def time_cpu(fn, min_run_time: float = 0.2, min_samples: int = 5) -> Timing:
    """torch.utils.benchmark over all of torch's intra-op threads (its default is one thread)."""
    # Imported here: it loads torch's C++-extension machinery, slow and (with no CUDA runtime) chatty.
    from torch.utils import benchmark
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    while len(times) < min_samples:
        times += timer.timeit(1).times
    return summarize(times, "torch.utils.benchmark")


def time_cuda(fn, rep_ms: int = 100, warmup_ms: int = 25) -> Timing:
    """do_bench's median and 20/80% quantiles; it flushes L2 before every run. samples=0: do_bench
    picks the count (about rep_ms of runs) and does not report it."""
    from triton.testing import do_bench
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, 0, "triton.testing.do_bench")


def time_fn(fn, device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, rep_ms=50 if quick else 200)
    return time_cpu(fn, min_run_time=0.1 if quick else 0.5, min_samples=3 if quick else 7)


def rotation_copies(bytes_per_call: int, device: torch.device, cap: int = 32) -> int:
    """How many input copies to cycle through so one pass touches more than 2x the GPU's L2 (1 on CPU)."""
    if device.type != "cuda" or bytes_per_call <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
    return max(1, min(cap, math.ceil(2 * l2 / bytes_per_call)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(step, n: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of n calls of step(), synchronizing the device around each."""
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# -- calibration: the copy bandwidth of this device, measured once (the matmul peak: gpt.runtime) ------------

def measure_copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (64 if quick else 256) * 2 ** 20 // 4 if device.type == "cpu" else 512 * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick)
    return 2 * src.numel() * src.element_size() / t.median_s


# -- peak memory ------------------------------------------------------------------------------------------

def _reset_cpu_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS, where the reset above is unavailable anyway).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict filled on exit with peak_memory_mb and memory_kind (what the number is)."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["memory_kind"] = "CUDA max allocated"
        return
    reset = _reset_cpu_peak_rss()
    yield out
    out["peak_memory_mb"] = _cpu_peak_rss_bytes() / 2 ** 20
    out["memory_kind"] = ("CPU peak RSS of the process (high-water mark reset before this run)" if reset
                          else "CPU peak RSS of the process since start (could not reset)")
