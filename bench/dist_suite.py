"""`dist` suite: data-parallel training over several processes, measured on CPU and estimated for GPUs.

1. MEASURED on this machine's CPU: `python -m torch.distributed.run --standalone --nproc_per_node W
   bench/dist_worker.py ...` for W = 1 and 2 (--full: every power of two up to the core count), with
   CUDA_VISIBLE_DEVICES="" and OMP_NUM_THREADS=1, so each rank is one process with one thread and the
   ranks talk over gloo. The worker wraps the model as training does (one process: the plain model;
   several: DDP, and FSDP2 as a second row) and times forward + backward + clip + AdamW steps on random
   tokens, fp32, no torch.compile, PyTorch kernels. Weak scaling: the batch per rank is fixed, so a step
   of W ranks trains W times the tokens of one rank.
   - tokens/s = W x batch x seq / median step time (the slowest rank's time per step);
   - scaling efficiency = tokens/s(W) / (W x tokens/s(1)): 1 is perfect weak scaling; the ranks share
     the machine's memory bandwidth and caches as well as exchanging gradients, and both lower it;
   - exposed communication share = max(0, 1 - t_no_sync / t_sync), where t_no_sync times the same DDP
     steps under `no_sync()` (no gradient all-reduce): the part of the step that communication adds
     and the overlap with the backward did not hide. FSDP cannot skip its collectives: throughput only.

2. ESTIMATED for H100 clusters (no GPU is run; every number follows from the formulas below, the
   datasheet numbers and one assumed MFU). Per optimizer step and GPU, with N GPUs and P parameters:

       DDP  (fp32 gradients, ring all-reduce):          bytes = 2 (N-1)/N x 4 P
       FSDP (bf16 parameters, fp32 gradient reduce):     bytes = (N-1)/N x 2 x A + (N-1)/N x 4 P
            A, the parameters all-gathered per optimizer step = micro_steps x (2 P_blocks + P_root):
            every block is gathered for its forward and again for its backward (FSDP2 reshards
            non-root modules after the forward); the root module (the tied embedding and the final
            norm) keeps its gathered parameters from the forward to the backward (FSDP2's default for
            the root), and gradients are reduce-scattered once, on the last micro-step (train.loop's
            grad_sync). With one micro-step and P_root = 0 this is 2 (N-1)/N x 2 P + (N-1)/N x 4 P.
       comm time    = bytes / link bandwidth per GPU per direction (the slowest link the ring crosses)
       compute time = flops_per_token(T) x tokens per GPU per step / (peak bf16 x ASSUMED_MFU)
       efficiency   = compute / (compute + comm)        with no overlap (a lower bound)
                      compute / max(compute, comm)      with full overlap (an upper bound)

   Tokens per GPU per step: the preset's training defaults (train.config.TRAIN_PRESETS batch_size x
   grad_accum) x its block size (gpt.config.PRESETS), at the default 8192-token vocabulary, AdamW.
   Achieved NCCL bus bandwidth is below these link rates, so the communication times are optimistic.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt import create_model
from gpt.config import PRESETS
from gpt.runtime import GPU_PEAK_TFLOPS
from train.config import TRAIN_PRESETS

from .common import RunContext, format_table, log, progress

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "bench" / "dist_worker.py"

# -- the measured part ------------------------------------------------------------------------------------
# --quick: the preset shrunk to 2 layers of width 128 (its vocabulary and block size kept), so that a
# step takes a fraction of a second on one core and the whole suite stays under a minute.
QUICK_MODEL = dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2)
QUICK_SHAPE = (8, 128)          # sequences per rank, tokens per sequence
FULL_BATCH = 8                  # --full: sequences per rank; the sequence is the preset's block size
QUICK_STEPS, FULL_STEPS = (2, 6), (3, 20)  # (warmup, timed) steps; DDP times each twice (sync, no_sync)
RANK_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # CPU ranks, one thread each
MEASURED_DTYPE = "float32"      # the same arithmetic on every CPU (bf16 autocast is fast only on some)

# -- the estimated part -----------------------------------------------------------------------------------
# NVIDIA H100 SXM datasheet: NVLink 4 at 900 GB/s per GPU, both directions together: 450 GB/s each way.
NVLINK4_BYTES_PER_S = 450e9
# InfiniBand NDR: 400 Gb/s per port = 50 GB/s each way; one NIC per GPU (as in a DGX H100: 8 x
# ConnectX-7 400 Gb/s).
IB_NDR_BYTES_PER_S = 400e9 / 8
H100_BF16_FLOPS = dict(GPU_PEAK_TFLOPS)["H100"]["bf16"] * 1e12  # gpt.runtime's datasheet table (dense)
ASSUMED_MFU = 0.4               # an assumption, not a measurement: a well-tuned single-GPU step
DEFAULT_VOCAB = 8192            # GPTConfig's default (the BPE tokenizer's default vocabulary)
FP32, BF16 = 4, 2               # bytes per element


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus: int
    link: str
    link_bytes_per_s: float     # per GPU, per direction, on the slowest link the ring crosses


CLUSTERS = [Cluster("1 node x 8 H100", 8, "NVLink 4", NVLINK4_BYTES_PER_S),
            Cluster("2 nodes x 8 H100", 16, "IB NDR 400G/GPU", IB_NDR_BYTES_PER_S)]


def ddp_bytes_per_gpu(params: int, gpus: int) -> float:
    """Bytes each GPU sends (and receives) in a ring all-reduce of fp32 gradients: 2 (N-1)/N x 4 P."""
    return 2 * (gpus - 1) / gpus * FP32 * params


def fsdp_bytes_per_gpu(params: int, gpus: int, root_params: int = 0, micro_steps: int = 1) -> float:
    """Bytes each GPU sends per optimizer step under FSDP2 with bf16 parameters and fp32 reduction:
    all-gathers of micro_steps x (2 x block parameters + root parameters) in bf16, and one
    reduce-scatter of fp32 gradients: (N-1)/N x (2 x gathered + 4 x P). See the module docstring."""
    frac = (gpus - 1) / gpus
    gathered = micro_steps * (2 * (params - root_params) + root_params)
    return frac * BF16 * gathered + frac * FP32 * params


def compute_seconds(flops_per_token: float, tokens: int, peak_flops: float = H100_BF16_FLOPS,
                    mfu: float = ASSUMED_MFU) -> float:
    """Seconds of forward + backward for `tokens` tokens on one GPU running at `mfu` of its peak."""
    return flops_per_token * tokens / (peak_flops * mfu)


def efficiency_bounds(compute_s: float, comm_s: float) -> tuple[float, float]:
    """(no overlap, full overlap) scaling efficiency: compute / (compute + comm), compute / max(...)."""
    return compute_s / (compute_s + comm_s), compute_s / max(compute_s, comm_s)


def _model_counts(preset: str) -> tuple[int, int, float]:
    """(parameters, root parameters (outside the blocks), training FLOPs per token at the block size) of
    the preset at the default vocabulary; the model is built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = create_model(preset, kernels="torch", vocab_size=DEFAULT_VOCAB)
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("blocks."))
    return model.num_params(), root, model.flops_per_token(model.config.block_size)


def estimates(presets: list[str]) -> list[dict]:
    """ESTIMATED communication and compute per optimizer step for each preset, cluster and mode."""
    records = []
    for preset in presets:
        params, root, flops_per_token = _model_counts(preset)
        train = TRAIN_PRESETS.get(preset, {})
        batch, accum, seq = train.get("batch_size", 32), train.get("grad_accum", 1), PRESETS[preset]["block_size"]
        tokens = batch * accum * seq
        compute = compute_seconds(flops_per_token, tokens)
        for cluster in CLUSTERS:
            for mode in ("ddp", "fsdp"):
                nbytes = (ddp_bytes_per_gpu(params, cluster.gpus) if mode == "ddp"
                          else fsdp_bytes_per_gpu(params, cluster.gpus, root, accum))
                comm = nbytes / cluster.link_bytes_per_s
                low, high = efficiency_bounds(compute, comm)
                global_tokens = tokens * cluster.gpus
                records.append({
                    "suite": "dist", "table": "estimated", "kind": "estimated", "preset": preset,
                    "params": params, "root_params": root, "flops_per_token": flops_per_token,
                    "batch_per_gpu": batch, "grad_accum": accum, "seq": seq, "tokens_per_gpu_step": tokens,
                    "cluster": cluster.name, "gpus": cluster.gpus, "link": cluster.link,
                    "link_gbps": cluster.link_bytes_per_s / 1e9, "parallel": mode, "bytes_per_gpu": nbytes,
                    "comm_ms": comm * 1e3, "compute_ms": compute * 1e3,
                    "efficiency_no_overlap": low, "efficiency_full_overlap": high,
                    "tokens_per_s_low": global_tokens / (compute + comm),
                    "tokens_per_s_high": global_tokens / max(compute, comm),
                    "peak_tflops": H100_BF16_FLOPS / 1e12, "assumed_mfu": ASSUMED_MFU,
                    "source": "formula (bench/dist_suite.py docstring); datasheet link rates and peak; assumed MFU"})
    return records


# -- the measured part ------------------------------------------------------------------------------------

def world_sizes(quick: bool) -> list[int]:
    """1 and 2 ranks (--quick); --full: every power of two up to the number of cores (at least 2)."""
    if quick:
        return [1, 2]
    sizes, w = [1], 2
    while w <= max(2, os.cpu_count() or 1):
        sizes.append(w)
        w *= 2
    return sizes


def measured_shape(preset: str, ctx: RunContext) -> tuple[dict, int, int]:
    """(GPTConfig overrides, batch per rank, sequence) of the measured runs: --batch-size/--seq-len, else
    the quick shrunken model at 8 x 128, else (--full) the preset itself at 8 x its block size."""
    block = PRESETS[preset]["block_size"]
    model, (batch, seq) = (dict(QUICK_MODEL), QUICK_SHAPE) if ctx.quick else ({}, (FULL_BATCH, block))
    return model, ctx.batch_size or batch, min(ctx.seq_len or seq, block)


def launch(world_size: int, args: list[str], timeout: float) -> dict:
    """Run bench/dist_worker.py on `world_size` CPU ranks under torchrun; its rank 0's JSON result.
    Raises RuntimeError with the end of the output when the job fails or runs past `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
               str(WORKER), *args, "--out", str(out)]
        env = {**os.environ, **RANK_ENV}
        # A session of its own: on a timeout the launcher and its ranks are ended together.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise RuntimeError(f"{world_size} ranks: no result within {timeout:.0f} s; "
                               f"output: {output.strip()[-1500:]}") from None
        if proc.returncode or not out.exists():
            raise RuntimeError(f"{world_size} ranks: torchrun exited {proc.returncode}; "
                               f"output: {output.strip()[-1500:]}")
        return json.loads(out.read_text())


def derive(rows: list[dict]) -> list[dict]:
    """Add tokens/s, per-rank tokens/s, scaling efficiency against the same preset's one-rank row, and
    the exposed communication share, to the rows the workers reported."""
    for r in rows:
        r["tokens_per_step"] = r["world_size"] * r["batch_per_rank"] * r["seq"]
        r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
        r["tokens_per_s_per_rank"] = r["tokens_per_s"] / r["world_size"]
        r["step_ms"] = r["step_s"] * 1e3
        if "nosync_step_s" in r:
            r["nosync_step_ms"] = r["nosync_step_s"] * 1e3
            r["exposed_comm_share"] = max(0.0, 1.0 - r["nosync_step_s"] / r["step_s"])
    for r in rows:
        base = next((b for b in rows if b["preset"] == r["preset"] and b["world_size"] == 1), None)
        if base is not None:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["world_size"] * base["tokens_per_s"])
    return rows


def measured(ctx: RunContext) -> list[dict]:
    """MEASURED data-parallel steps on CPU ranks: one torchrun job per world size and preset."""
    warmup, steps = QUICK_STEPS if ctx.quick else FULL_STEPS
    timeout = 300 if ctx.quick else 600
    rows: list[dict] = []
    for preset in ctx.presets or ["tiny"]:
        model, batch, seq = measured_shape(preset, ctx)
        for w in world_sizes(ctx.quick):
            modes = "none" if w == 1 else "ddp,fsdp"
            progress(f"[dist] {preset} {w} rank(s) {modes} batch={batch}/rank seq={seq}")
            args = ["--preset", preset, "--model", json.dumps(model), "--kernels", "torch", "--dtype", MEASURED_DTYPE,
                    "--batch-size", str(batch), "--seq-len", str(seq), "--warmup", str(warmup),
                    "--steps", str(steps), "--modes", modes]
            try:
                result = launch(w, args, timeout)
            except RuntimeError as e:
                ctx.note(f"dist: {preset} on {w} CPU rank(s) failed: {str(e)[:600]}")
                rows.append({"suite": "dist", "table": "measured", "kind": "measured", "preset": preset,
                             "world_size": w, "error": str(e)[:600]})
                continue
            for r in result["rows"]:
                rows.append({"suite": "dist", "table": "measured", "kind": "measured", "world_size": w,
                             "device": "cpu", "backend": result["backend"],
                             "threads_per_rank": result["threads_per_rank"], **r})
    ok = derive([r for r in rows if "step_s" in r])
    return ok + [r for r in rows if "step_s" not in r]


def run(ctx: RunContext) -> list[dict]:
    if ctx.device.type != "cpu":
        ctx.note("dist: the measured rows run on CPU ranks (gloo) whatever --device says; "
                 "the GPU rows are estimates")
    return measured(ctx) + estimates(ctx.presets or list(PRESETS))


MEASURED_COLUMNS = [("preset", "preset"), ("params", "params"), ("world_size", "ranks"), ("parallel", "parallel"),
                    ("batch_per_rank", "batch/rank"), ("seq", "seq"), ("step_ms", "step ms"),
                    ("nosync_step_ms", "no-sync step ms"), ("tokens_per_s", "tokens/s"),
                    ("tokens_per_s_per_rank", "tokens/s/rank"), ("efficiency_pct", "scaling eff %"),
                    ("comm_pct", "exposed comm %")]
ESTIMATED_COLUMNS = [("preset", "preset"), ("params", "params"), ("tokens_per_gpu_step", "tokens/GPU/step"),
                     ("cluster", "cluster"), ("link", "link"), ("parallel", "parallel"),
                     ("mb_per_gpu", "MB/GPU/step"), ("comm_ms", "comm ms"), ("compute_ms", "compute ms"),
                     ("eff_low_pct", "eff % no overlap"), ("eff_high_pct", "eff % full overlap")]


def _pct(value):
    return None if value is None else 100 * value


def print_tables(records: list[dict], ctx: RunContext) -> None:
    rows = [{**r, "efficiency_pct": _pct(r.get("scaling_efficiency")), "comm_pct": _pct(r.get("exposed_comm_share"))}
            for r in records if r.get("table") == "measured" and "step_s" in r]
    if rows:
        threads = ", ".join(str(t) for t in dict.fromkeys(r["threads_per_rank"] for r in rows))
        log(format_table(f"dist: data-parallel training step on CPU ranks over gloo (MEASURED; {threads} thread(s) "
                         f"per rank, OMP_NUM_THREADS=1; {os.cpu_count()} cores)", rows, MEASURED_COLUMNS))
        r0 = rows[0]
        log(f"  weak scaling: batch per rank fixed, global batch = ranks x batch/rank; {r0['dtype']}, AdamW, "
            f"kernels={r0['kernels']}, no compile; model overrides {r0['model'] or 'none'}; step = median over "
            f"{r0['steps_timed']} steps of the slowest rank")
        log("  scaling eff = tokens/s(W) / (W x tokens/s(1)); exposed comm = 1 - t(no_sync) / t(sync): "
            "communication that overlap with the backward did not hide (DDP only; FSDP cannot skip its "
            "collectives)")
        log("")
    est = [{**r, "mb_per_gpu": r["bytes_per_gpu"] / 1e6, "eff_low_pct": 100 * r["efficiency_no_overlap"],
            "eff_high_pct": 100 * r["efficiency_full_overlap"]} for r in records if r.get("table") == "estimated"]
    if est:
        log(format_table(f"dist: ESTIMATED data-parallel scaling on H100 clusters (formulas, not measured; "
                         f"H100 bf16 {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s at an ASSUMED {ASSUMED_MFU:.0%} MFU; "
                         f"NVLink 4 {NVLINK4_BYTES_PER_S / 1e9:.0f} GB/s, IB NDR {IB_NDR_BYTES_PER_S / 1e9:.0f} GB/s "
                         f"per GPU per direction)", est, ESTIMATED_COLUMNS))
        log("  bytes per GPU per optimizer step: DDP 2(N-1)/N x 4P (fp32 gradient all-reduce); FSDP bf16 all-gathers "
            "(blocks twice, root once, per micro-step) + (N-1)/N x 4P fp32 reduce-scatter; tokens/GPU/step from "
            "the preset's training defaults; achieved NCCL bandwidth is lower than the link rate, so comm times "
            "are optimistic")
