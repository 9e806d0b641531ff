"""Static compile report: every kernel, in every launch configuration its launcher can choose,
compiled for real NVIDIA targets by Triton's own compiler (ptxas included) — no GPU needed.

    python -m kernels.report [--quick] [--json FILE] [--targets 80,90] [--jobs N]

For each (kernel, config, target) it reads the cubin with cuobjdump (shipped with Triton):
registers per thread, spill bytes (STACK/LOCAL), shared memory (Triton's dynamic allocation and any
static), and the tensor-core instruction class in the SASS (HGMMA on sm_90, HMMA on sm_80). It
exits non-zero on a compile failure, any spill, shared memory over the target's per-block limit, or
a kernel that expects tensor cores but uses none.

Triton specializes a launch on whether its pointers are 16-byte aligned and its integers multiples
of 16; a spec says which variant it is (`CompileSpec.divisible_by_16`, set by `CompileSpec.aligned`), by
default the common case: aligned pointers, strides divisible by 16.

Kernel modules are imported here, so this must run without TRITON_INTERPRET=1 (under the
interpreter @triton.jit gives functions triton.compile cannot take); `main` re-executes itself
without the variable.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from . import KERNEL_MODULES as MODULES
from ._runtime import interpreting

# Largest dynamic shared memory per block (opt-in), bytes: A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TENSOR_CORE_OPS = ("HGMMA", "HMMA", "IMMA", "UTCHMMA", "UTCQMMA")


def load_specs(quick: bool, modules=MODULES) -> tuple[list[tuple[str, int, object]], list[str]]:
    """[(module, index, spec)] for every module that exposes compile_specs; notes for those skipped."""
    specs, notes = [], []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            notes.append(f"{name}: module not found, skipped")
            continue
        if not hasattr(module, "compile_specs"):
            notes.append(f"{name}: no compile_specs(), skipped")
            continue
        specs += [(name, i, spec) for i, spec in enumerate(module.compile_specs(quick=quick))]
    return specs, notes


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}; it ships with Triton's NVIDIA backend")
    return path


def _full_signature(spec) -> dict:
    """The spec's signature with constexprs typed 'constexpr', in the kernel's argument order."""
    sig = {**spec.signature, **{k: "constexpr" for k in spec.constexprs if k not in spec.signature}}
    missing = [a for a in spec.fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"spec for {spec.kernel} does not type arguments {missing}")
    return {a: sig[a] for a in spec.fn.arg_names}


def _alignment_attrs(spec, signature: dict) -> dict:
    """tt.divisibility=16 for the arguments in spec.divisible_by_16 (see CompileSpec.aligned)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in spec.divisible_by_16}


def _parse_resources(text: str) -> dict:
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump resource usage:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


@functools.lru_cache(maxsize=None)
def _specs_of(module: str, quick: bool) -> list:
    return importlib.import_module(module).compile_specs(quick=quick)


def compile_one(module: str, index: int, quick: bool, cc: int) -> dict:
    """Compile one spec for sm_`cc` and measure it; never raises (failures become rows)."""
    t0 = time.perf_counter()
    spec = _specs_of(module, quick)[index]
    row = {"module": module, "kernel": spec.kernel, "config": spec.label, "target": f"sm_{cc}",
           "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    try:
        signature = _full_signature(spec)
        src = triton.compiler.ASTSource(spec.fn, signature, spec.constexprs, _alignment_attrs(spec, signature))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            tool = _cuobjdump()
            usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
            sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
        row.update(_parse_resources(usage.stdout))
        row["shared"] = max(int(compiled.metadata.shared), row["static_shared"])
        ops = sorted({op for op in TENSOR_CORE_OPS if re.search(rf"\b{op}\b", sass)})
        row["tensor_cores"] = ",".join(ops) or "-"
        row["error"] = None
    except Exception as e:  # a compile failure is a result to report, not a crash
        row.update(registers=None, stack=None, local=None, shared=None, tensor_cores=None,
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["problems"] = _problems(row, spec, cc)
    return row


def _problems(row: dict, spec, cc: int) -> list[str]:
    if row["error"]:
        return ["compile failed: " + row["error"]]
    problems = []
    if row["stack"] or row["local"]:
        problems.append(f"spills (stack {row['stack']} B, local {row['local']} B)")
    limit = SMEM_LIMIT.get(cc)
    if limit is not None and row["shared"] > limit:
        problems.append(f"shared memory {row['shared']} B > sm_{cc} limit {limit} B")
    if spec.expects_mma and row["tensor_cores"] == "-":
        problems.append("no tensor-core instructions in a kernel that expects them")
    return problems


def run(quick: bool = False, targets=(80, 90), jobs: int | None = None, modules=MODULES):
    """Compile every spec for every target; returns (rows, notes)."""
    if interpreting():
        raise RuntimeError("kernels.report cannot run with TRITON_INTERPRET=1 (interpreted kernels cannot be "
                           "compiled); run `python -m kernels.report` in an environment without it")
    specs, notes = load_specs(quick, modules)
    work = [(module, index, quick, cc) for cc in targets for module, index, _ in specs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))
    if jobs == 1:
        rows = [compile_one(*w) for w in work]
    else:
        # fork: workers inherit the imported modules and the environment without TRITON_INTERPRET.
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            rows = list(pool.map(compile_one, *zip(*work))) if work else []
    return rows, notes


def format_table(rows: list[dict]) -> str:
    headers = ["kernel", "config", "target", "warps", "stages", "regs", "spill B", "smem B", "tensor cores", "status"]
    lines = []
    for r in rows:
        spill = None if r["error"] else r["stack"] + r["local"]
        lines.append([r["kernel"], r["config"], r["target"], str(r["num_warps"]), str(r["num_stages"]),
                      "-" if r["registers"] is None else str(r["registers"]), "-" if spill is None else str(spill),
                      "-" if r["shared"] is None else str(r["shared"]), r["tensor_cores"] or "-",
                      "; ".join(r["problems"]) or "ok"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    numeric = {3, 4, 5, 6, 7}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def _target_list(text: str) -> list[int]:
    try:
        targets = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected compute capabilities like 80,90, got {text!r}") from None
    if not targets:
        raise argparse.ArgumentTypeError("no targets given")
    return targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small representative subset of the configs")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and a summary as JSON to FILE")
    parser.add_argument("--targets", type=_target_list, default=[80, 90],
                        help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated kernel modules to compile")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    targets = args.targets
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]

    if interpreting():
        # Kernel modules imported under the interpreter cannot be compiled: start over without it.
        print("kernels.report: TRITON_INTERPRET=1 is set; re-running without it", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "kernels.report", *argv], env=env).returncode

    print(f"kernels.report: triton {triton.__version__}, targets {', '.join(f'sm_{t}' for t in targets)}, "
          f"{'quick' if args.quick else 'full'} set", flush=True)
    t0 = time.perf_counter()
    rows, notes = run(args.quick, targets, args.jobs, modules)
    elapsed = time.perf_counter() - t0
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    bad = [r for r in rows if r["problems"]]
    summary = {"compiled": sum(r["error"] is None for r in rows), "total": len(rows), "failed": len(bad),
               "max_registers": max((r["registers"] for r in rows if r["registers"] is not None), default=None),
               "seconds": round(elapsed, 1)}
    print(f"{summary['compiled']}/{summary['total']} compiled, {len(bad)} with problems, "
          f"max registers {summary['max_registers']}, {elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "targets": targets, "quick": args.quick, "notes": notes,
                       "summary": summary, "rows": rows}, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
