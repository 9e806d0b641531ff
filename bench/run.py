"""One benchmark runner: kernels, training throughput/MFU, decoding, static GPU estimates, data-parallel scaling, data,
the fused loss.

    python bench/run.py                      # quick suite: all five suites, small sweeps (2-6 min on 2 CPU cores)
    python bench/run.py --full               # the complete sweeps (minutes on a GPU, long on a CPU)
    python bench/run.py --suite kernels --sizes 1024,4096 --device cuda
    python bench/run.py --suite dist         # data-parallel scaling: CPU ranks (measured), H100 clusters (estimated)
    python bench/run.py --suite data --full  # data preparation at 1 and 4 GiB per format, the loader (~25 min on 2 cores)
    python bench/run.py --suite serve        # gpt.serve under load: 1, 4 and 16 clients (not in all)
    python bench/run.py --suite loss --full  # the head + loss fused and unfused, alone and in a training step

Prints aligned tables, writes DIR/results.json (machine, versions, git commit, command, every
measurement, each marked "measured" or "estimated") and PNG plots, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/run.py`: import the repository's packages, not modules beside this file.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from bench import (data_suite, decode_suite, dist_suite, kernel_suite, loss_suite, plots, static_suite,  # noqa: E402
                   train_suite)
from bench import serve_suite  # noqa: E402
from bench.common import RunContext, log, progress  # noqa: E402
from bench.timing import measure_copy_bandwidth  # noqa: E402
from gpt import ops  # noqa: E402
from gpt.cli import UNDERSCORE_NOTE, command_line_main  # noqa: E402
from gpt.config import PRESETS  # noqa: E402
from gpt.errors import USER_ERRORS  # noqa: E402
from gpt.runtime import (DTYPES, cpu_has_native_bf16, dtype_name, measure_matmul_flops, peak_flops,  # noqa: E402
                         resolve_device)

SUITES = ("kernels", "train", "decode", "static", "dist", "data", "loss")
EXPLICIT_SUITES = ("serve",)   # run only when --suite names them: they start servers, not part of "all"
REPO = Path(__file__).resolve().parent.parent
SCHEMA = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0], epilog=UNDERSCORE_NOTE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all",
                   help="comma-separated: kernels, train, decode, static, dist, data, loss, or all (default: all); "
                        "serve (python -m gpt.serve under load) runs only when named")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true",
                       help="small sweeps and few repeats (the default; finishes in minutes on a laptop CPU)")
    level.add_argument("--full", action="store_true",
                       help="complete sweeps, every preset that fits at its default batch and block size")
    p.add_argument("--preset", default=None,
                   help="comma-separated presets for train/decode/dist (default: all on CUDA, tiny,small on CPU "
                        "(decode: also shakespeare_cpu, the CPU recipe's model); dist: tiny measured, every preset "
                        "estimated)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated kernel sweep sizes: rows for row-wise ops, sequence length for attention")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="kernels suite input dtype (default: bfloat16); loss suite autocast dtype (default: what "
                        "training's --dtype auto picks here: bf16 on CUDA and on CPUs with native bf16, else float32)")
    p.add_argument("--kernels", default=None, choices=ops.KERNEL_MODES,
                   help="time only this implementation in the train and decode suites and as the kernels suite's "
                        "`triton` provider (default: every one that runs here: torch, and triton on CUDA)")
    p.add_argument("--out", default=None, help="output directory (default: bench/results/<time>-<device>-<mode>)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers and training modes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="train and loss suites: sequences per step (all presets); dist suite: sequences per rank")
    p.add_argument("--seq-len", type=int, default=None,
                   help="train, dist and loss suites: tokens per sequence (all presets)")
    p.add_argument("--loss-shape", default=None,
                   help="loss suite: ROWS,WIDTH,VOCAB of the head + loss measured alone (default: 256,768,50257 "
                        "quick, 16384,768,50257 full); VOCAB is also the training step's vocabulary")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode suite: tokens to generate (32 quick, 256 full); serve suite: max_tokens of each "
                        "request (64 quick, 128 full)")
    p.add_argument("--contexts", default=None, help="decode suite: comma-separated context lengths to sweep")
    p.add_argument("--data-mb", default=None,
                   help="data suite: comma-separated corpus sizes in MB of text (default: 64 quick, 1024,4096 full)")
    p.add_argument("--data-baseline", action="store_true",
                   help="data suite: also prepare the first jsonl corpus by nanoGPT's method (datasets.map, "
                        "num_proc 2; bench/nanogpt_prepare.py) for comparison (on with --full)")
    p.add_argument("--data-formats", default=None,
                   help=f"data suite: comma-separated corpus formats from {', '.join(data_suite.FORMATS)} "
                        f"(default: jsonl quick, all full)")
    p.add_argument("--report-json", default=None,
                   help="static suite: summarize this kernels.report JSON instead of compiling again")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.suites = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in args.suites if s not in SUITES + EXPLICIT_SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES + EXPLICIT_SUITES)} or all")
    args.presets = [x.strip() for x in args.preset.split(",") if x.strip()] if args.preset else None
    bad = [x for x in args.presets or [] if x not in decode_suite.MODELS]
    if bad:
        p.error(f"unknown preset(s) {bad}; choose from {', '.join(decode_suite.MODELS)}")
    others = [s for s in args.suites if s in ("train", "dist")]
    if decode_suite.RECIPE in (args.presets or []) and others:
        p.error(f"--preset {decode_suite.RECIPE} (the CPU recipe's model) is for the decode suite only, not "
                f"{', '.join(others)}; add --suite decode")
    args.data_formats = [x.strip() for x in args.data_formats.split(",") if x.strip()] if args.data_formats else None
    bad = [x for x in args.data_formats or [] if x not in data_suite.FORMATS]
    if bad:
        p.error(f"unknown data format(s) {bad}; choose from {', '.join(data_suite.FORMATS)}")
    try:
        args.data_mb = _ints(args.data_mb)
    except ValueError:
        p.error(f"--data-mb takes comma-separated whole numbers of MB, got {args.data_mb!r}")
    if any(mb < 1 for mb in args.data_mb or []):
        p.error("--data-mb sizes must be at least 1 MB")
    try:
        args.loss_shape = _ints(args.loss_shape)
    except ValueError:
        args.loss_shape = []
    if args.loss_shape is not None and (len(args.loss_shape) != 3 or min(args.loss_shape) < 1):
        p.error("--loss-shape takes three whole numbers ROWS,WIDTH,VOCAB, each at least 1")
    args.quick = not args.full
    return args


def _ints(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",") if x.strip()] if text else None


# -- the machine ------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_native_bf16": cpu_has_native_bf16(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "gpu": None, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2 ** 30,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_sms=props.multi_processor_count)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_commit"] = commit
    info["git_dirty"] = bool(status) if status is not None else None
    return info


def calibrate(ctx: RunContext, name: str) -> dict:
    """This device's roofline, measured once: copy bandwidth and a large bf16 matmul."""
    progress("[calibrate] copy bandwidth and matmul peak")
    if ctx.device.type == "cuda":
        matmul = measure_matmul_flops(ctx.device, ctx.dtype, n=8192, reps=10 if ctx.quick else 50)
    else:  # the same measured number the train suite's MFU divides by
        matmul = peak_flops(ctx.device, ctx.dtype)[0]
    return {"device_name": name, "kind": "measured",
            "copy_gbps": measure_copy_bandwidth(ctx.device, ctx.quick) / 1e9,
            "matmul_tflops": matmul / 1e12, "matmul_dtype": dtype_name(ctx.dtype)}


# -- output -----------------------------------------------------------------------------------------------

def summary(results: dict, out_dir: Path, seconds: float, ctx: RunContext, device_name: str) -> dict:
    s: dict = {"results": str(out_dir / "results.json"), "device": device_name, "mode": "quick" if ctx.quick else "full",
               "seconds": round(seconds, 1), "records": {k: len(v) for k, v in results.items()},
               "notes": len(ctx.notes)}
    kern = [r for r in results.get("kernels", []) if "median_ms" in r]
    if kern:
        best = {}
        for r in kern:  # at each op's largest size: the best provider's headline number
            key = f"{r['op']} {r['direction']}"
            metric = kernel_suite.OPS[r["op"]].metric
            top = best.get(key)
            if top is None or (r["size"], r[metric]) > (top["size"], top["value"]):
                best[key] = {"size": r["size"], "provider": r["provider"], "value": r[metric],
                             "unit": "TFLOP/s" if metric == "tflops" else "GB/s"}
        s["kernels_best"] = {k: f"{v['value']:.3g} {v['unit']} ({v['provider']}, size {v['size']}, measured)"
                             for k, v in best.items()}
    train = [r for r in results.get("train", []) if "tokens_per_s" in r]
    if train:
        s["train_tokens_per_s"] = {f"{r['preset']} {r['kernels']}{'+compile' if r['compile'] else ''} {r['dtype']}":
                                   round(r["tokens_per_s"], 1) for r in train}
    dec = [r for r in results.get("decode", []) if r.get("test") == "generate"]
    if dec:
        s["decode_tokens_per_s"] = {f"{r['preset']} {r['kernels']} {r['mode']} b{r['batch']} "
                                    f"{'cache' if r['kv_cache'] else 'no-cache'}":
                                    round(r["tokens_per_s"], 1) for r in dec}
    dist = [r for r in results.get("dist", []) if r.get("table") == "measured" and "tokens_per_s" in r]
    if dist:
        s["dist_tokens_per_s"] = {f"{r['preset']} {r['world_size']} CPU rank(s) {r['parallel']}":
                                  round(r["tokens_per_s"], 1) for r in dist}
    prep = [r for r in results.get("data", []) if r.get("test") == "prepare"]
    if prep:
        s["data_prepare_tokens_per_s"] = {f"{r['format']} {r['input_mb']} MB {r['workers']} worker(s)":
                                          round(r["tokens_per_s"]) for r in prep}
        s["data_peak_pss_mb"] = round(max(r["peak_pss_mb"] for r in prep))
    comp = [r for r in results.get("static", []) if r.get("table") == "compile"]
    if comp:
        s["static_compiled"] = f"{sum(r['compiled'] for r in comp)}/{sum(r['configs'] for r in comp)}"
        s["static_problems"] = sum(r["problems"] for r in comp)
    s.update(loss_suite.summary(results.get("loss", [])))
    srv = [r for r in results.get("serve", []) if r.get("test") == "serve"]
    if srv:
        s["serve_tokens_per_s"] = {f"{r['preset']} {r['mode']} {r['clients']} clients": round(r["tokens_per_s"], 1)
                                   for r in srv}
    return s


def kernel_modes(choice: str | None, device: torch.device) -> list[str]:
    """The implementations to time: --kernels resolved on `device` (KernelsUnavailable for 'triton' where it
    cannot run), or by default PyTorch and, where 'auto' picks them, the Triton kernels."""
    if choice is None:
        return list(dict.fromkeys(["torch", ops.resolve("auto", device)]))
    return [ops.resolve(choice, device)]


@command_line_main
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        kernels = kernel_modes(args.kernels, device)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({_cpu_model()})"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or REPO / "bench" / "results" / f"{stamp}-{device.type}-{'quick' if args.quick else 'full'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(device=device, quick=args.quick, dtype=DTYPES[args.dtype or "bfloat16"], kernels=kernels, sizes=_ints(args.sizes),
                     presets=args.presets,
                     compile=not args.no_compile, batch_size=args.batch_size, seq_len=args.seq_len,
                     new_tokens=args.new_tokens, contexts=_ints(args.contexts))

    t0 = time.perf_counter()
    doc = {"schema": SCHEMA, "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None
           else "python bench/run.py " + " ".join(argv),
           "argv": sys.argv[1:] if argv is None else list(argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {"suites": args.suites, "mode": "quick" if args.quick else "full", "device": str(device),
                        "kernels": kernels,
                        "kernels_dtype": dtype_name(ctx.dtype), "sizes": ctx.sizes, "presets": ctx.presets,
                        "compile": ctx.compile, "threads": torch.get_num_threads()},
           "machine": machine_info(device), "calibration": {}, "results": {}, "plots": [], "notes": ctx.notes}
    log(f"bench: {device_name} | torch {torch.__version__} | triton {doc['machine']['triton']} | "
        f"{torch.get_num_threads()} threads | suites {','.join(args.suites)} | "
        f"{'quick' if args.quick else 'full'} | out {out_dir}")
    if ctx.compile and any(s in args.suites for s in ("kernels", "train", "decode", "loss")):
        progress("note: the torch.compile providers and the compiled decoders compile on first use, up to a minute "
                 "or two each on a 2-core CPU with an empty compile cache (inductor keeps them on disk for later "
                 "runs); --no-compile leaves them out")

    def save():
        doc["seconds"] = time.perf_counter() - t0
        tmp = out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(out_dir / "results.json")

    if any(s in args.suites for s in ("kernels", "train", "decode")):
        ctx.calibration = doc["calibration"] = calibrate(ctx, device_name)
        log(f"calibration (MEASURED): copy {ctx.calibration['copy_gbps']:.1f} GB/s, "
            f"{ctx.calibration['matmul_dtype']} matmul {ctx.calibration['matmul_tflops']:.3f} TFLOP/s")
    suites = {
        "kernels": (lambda: kernel_suite.run(ctx), kernel_suite.print_tables,
                    lambda r: plots.kernels(r, out_dir, device_name)),
        "train": (lambda: train_suite.run(ctx), train_suite.print_tables,
                  lambda r: plots.train(r, out_dir, device_name)),
        "decode": (lambda: decode_suite.run(ctx), decode_suite.print_tables,
                   lambda r: plots.decode(r, out_dir, device_name)),
        "static": (lambda: static_suite.run(ctx, out_dir, args.report_json), static_suite.print_tables,
                   lambda r: plots.static(r, out_dir)),
        "dist": (lambda: dist_suite.run(ctx), dist_suite.print_tables, lambda r: plots.dist(r, out_dir)),
        "data": (lambda: data_suite.run(ctx, args.data_mb, args.data_formats, args.data_baseline or args.full),
                 data_suite.print_tables,
                 lambda r: []),
        "loss": (lambda: loss_suite.run(ctx, args.loss_shape, args.dtype), loss_suite.print_tables, lambda r: []),
        "serve": (lambda: serve_suite.run(ctx), serve_suite.print_tables, lambda r: []),
    }
    for name in args.suites:
        run, print_tables, plot = suites[name]
        t_suite = time.perf_counter()
        try:
            records = run()
        except Exception as e:  # one broken suite must not lose the others' results
            traceback.print_exc()
            ctx.note(f"suite {name} failed: {type(e).__name__}: {str(e).strip()[:300]}")
            records = []
        doc["results"][name] = records
        if records:
            log("")
            print_tables(records, ctx)
            doc["plots"] += [str(p.name) for p in plot(records)]
        log(f"[{name}: {time.perf_counter() - t_suite:.0f} s]")
        save()
    log("")
    for note in ctx.notes:
        log(f"note: {note}")
    log(f"plots: {', '.join(doc['plots']) or 'none'} | results: {out_dir / 'results.json'}")
    doc["summary"] = summary(doc["results"], out_dir, time.perf_counter() - t0, ctx, device_name)
    save()
    print(json.dumps(doc["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
