"""`static` suite: what the kernels should do on GPUs we do not have.

1. The compile report (`python -m kernels.report --json`), run in a subprocess whose environment lacks
   TRITON_INTERPRET (interpreted kernels cannot be compiled), summarized per kernel and target:
   registers, spills, shared memory and tensor-core instructions read from the real sm_80/sm_90 cubins.
2. ESTIMATED rooflines: each op's bytes and FLOPs (bench/roofline.py, the formulas the measurements use)
   at a representative size, on H100 and A100 datasheet bandwidth and bf16 peak. Not measurements.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import roofline
from .common import RunContext, format_table, log, progress
from .kernel_suite import GPU_GEOMETRY, OPS, op_cost

REPO = Path(__file__).resolve().parent.parent
# (op, direction, size): size = rows for row-wise ops (D = 4096), sequence length for attention.
REPRESENTATIVE = [
    ("rms_norm", "fwd", 4096), ("rms_norm", "bwd", 4096),
    ("rms_norm_residual", "fwd", 4096), ("rms_norm_residual", "bwd", 4096),
    ("rope", "fwd", 4096), ("rope", "bwd", 4096),
    ("swiglu", "fwd", 4096), ("swiglu", "bwd", 4096),
    ("attention", "fwd", 4096), ("attention", "bwd", 4096),
    ("decode_attention", "fwd", 4096),
]
BF16_BYTES = 2


def roofline_estimates() -> list[dict]:
    """ESTIMATED best-case time and throughput of every op at its representative size, per GPU."""
    records = []
    for name, direction, size in REPRESENTATIVE:
        op = OPS[name]
        shape, cost = op_cost(op, size, BF16_BYTES, direction, GPU_GEOMETRY)
        for gpu in roofline.GPUS.values():
            records.append({"suite": "static", "table": "roofline", "op": name, "label": op.label,
                            "direction": direction, "size": size, "shape": shape, "dtype": "bfloat16",
                            "bytes": cost.bytes, "flops": cost.flops or None,
                            "hbm_tbps": gpu.hbm_bytes_per_s / 1e12, "peak_tflops": gpu.bf16_flops / 1e12,
                            **roofline.estimate(cost, gpu)})
    return records


def run_report(ctx: RunContext, out_dir: Path, report_json: str | None) -> dict | None:
    """The compile report's JSON: from `report_json` if given, else by running kernels.report."""
    if report_json:
        with open(report_json) as f:
            return json.load(f)
    if importlib.util.find_spec("kernels.report") is None:
        ctx.note("static: kernels/report.py does not exist yet; compile summary skipped (rooflines below)")
        return None
    path = out_dir / "kernels_report.json"
    cmd = [sys.executable, "-m", "kernels.report", "--json", str(path)] + (["--quick"] if ctx.quick else [])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    progress(f"[static] {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    (out_dir / "kernels_report.txt").write_text(proc.stdout + proc.stderr)
    if not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        ctx.note(f"static: kernels.report exited {proc.returncode} without a JSON ({tail[0]}); "
                 f"see {out_dir / 'kernels_report.txt'}")
        return None
    if proc.returncode:
        ctx.note(f"static: kernels.report exited {proc.returncode} (it fails on spills, shared memory over the "
                 f"limit or missing tensor cores); its rows are summarized below")
    with open(path) as f:
        report = json.load(f)
    report["wall_s"] = time.perf_counter() - t0
    return report


def summarize_report(report: dict) -> list[dict]:
    """One row per (kernel, target): configs compiled, worst registers/spills/shared memory, MMA class."""
    groups: dict[tuple, list[dict]] = {}
    for row in report.get("rows", []):
        groups.setdefault((row["module"], row["kernel"], row["target"]), []).append(row)
    out = []
    for (module, kernel, target), rows in groups.items():
        ok = [r for r in rows if not r.get("error")]
        tensor_cores = sorted({t for r in ok for t in (r.get("tensor_cores") or "-").split(",") if t != "-"})
        out.append({"suite": "static", "table": "compile", "kind": "measured",
                    "source": "kernels.report: Triton + ptxas compile, cuobjdump (no GPU run)",
                    "module": module, "kernel": kernel, "target": target, "configs": len(rows),
                    "compiled": len(ok),
                    "max_registers": max((r["registers"] for r in ok), default=None),
                    "max_spill_bytes": max(((r.get("stack") or 0) + (r.get("local") or 0) for r in ok), default=None),
                    "max_shared_kb": max((r["shared"] for r in ok), default=0) / 1024 if ok else None,
                    "tensor_cores": ",".join(tensor_cores) or "-",
                    "problems": sum(bool(r.get("problems")) for r in rows)})
    for r in report.get("rows", []):
        for problem in r.get("problems") or []:
            out.append({"suite": "static", "table": "compile-problem", "kind": "measured", "kernel": r["kernel"],
                        "config": r["config"], "target": r["target"], "problem": problem})
    return out


def run(ctx: RunContext, out_dir: Path, report_json: str | None = None) -> list[dict]:
    records = []
    report = run_report(ctx, out_dir, report_json)
    if report is not None:
        records += summarize_report(report)
        for note in report.get("notes", []):
            ctx.note(f"kernels.report: {note}")
    return records + roofline_estimates()


COMPILE_COLUMNS = [("kernel", "kernel"), ("target", "target"), ("configs", "configs"), ("compiled", "compiled"),
                   ("max_registers", "max regs"), ("max_spill_bytes", "max spill B"),
                   ("max_shared_kb", "max smem KB"), ("tensor_cores", "tensor cores"), ("problems", "problems")]
ROOF_COLUMNS = [("label", "op"), ("direction", "pass"), ("shape_text", "shape (bf16)"), ("mb", "MB moved"),
                ("gflop", "GFLOP"), ("bound", "bound")] + [
    (f"{gpu}_{key}", f"{gpu} {header}") for gpu in roofline.GPUS
    for key, header in (("time_us", "us"), ("gbps", "GB/s"), ("tflops", "TFLOP/s"))]


def _shape_text(shape: dict) -> str:
    return "x".join(f"{k}{v}" if not k.islower() else str(v) for k, v in shape.items()) if shape else ""


def _roofline_rows(records: list[dict]) -> list[dict]:
    """One row per (op, pass) with each GPU's estimate side by side."""
    by_gpu = {spec.name: key for key, spec in roofline.GPUS.items()}
    rows: dict[tuple, dict] = {}
    for r in records:
        if r.get("table") != "roofline":
            continue
        row = rows.setdefault((r["op"], r["direction"]), {
            "label": r["label"], "direction": r["direction"], "shape_text": _shape_text(r["shape"]),
            "mb": r["bytes"] / 1e6, "gflop": r["flops"] / 1e9 if r["flops"] else None, "bound": r["bound"]})
        gpu = by_gpu[r["gpu"]]
        if r["bound"] not in row["bound"].split("/"):
            row["bound"] += "/" + r["bound"]
        row.update({f"{gpu}_time_us": r["time_us"], f"{gpu}_gbps": r["gbps"], f"{gpu}_tflops": r["tflops"]})
    return list(rows.values())


def print_tables(records: list[dict], ctx: RunContext) -> None:
    compile_rows = [r for r in records if r.get("table") == "compile"]
    if compile_rows:
        log(format_table("static: compile report per kernel and target (from the compiled cubins, no GPU run)",
                         compile_rows, COMPILE_COLUMNS))
        for r in (r for r in records if r.get("table") == "compile-problem"):
            log(f"  problem: {r['kernel']} [{r['config']}] {r['target']}: {r['problem']}")
        log("")
    gpus = "; ".join(f"{g.name}: {g.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, {g.bf16_flops / 1e12:.0f} TFLOP/s bf16"
                     for g in roofline.GPUS.values())
    log(format_table(f"static: ESTIMATED best-case roofline per op (datasheet peaks, not measured; {gpus})",
                     _roofline_rows(records), ROOF_COLUMNS))
