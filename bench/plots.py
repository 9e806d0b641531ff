"""PNG plots of a benchmark run (matplotlib, Agg backend). Each returns the file it wrote, or None."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_STYLE = {"triton": "o-", "torch": "s--", "compile": "^-.", "sdpa": "d:"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(ax, records, op, direction, metric):
    for provider, style in PROVIDER_STYLE.items():
        pts = sorted((r["size"], r[metric]) for r in records
                     if r["op"] == op and r["direction"] == direction and r["provider"] == provider
                     and r.get(metric) is not None)
        if pts:
            ax.plot(*zip(*pts), style, label=provider, ms=4)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)


def kernels(records: list[dict], out_dir: Path, device_name: str) -> list[Path]:
    ok = [r for r in records if "median_ms" in r]
    if not ok:
        return []
    paths = []
    mem_ops = [(op, d) for op in dict.fromkeys(r["op"] for r in ok if r["op"] != "attention")
               for d in ("fwd", "fwd+bwd") if any(r["op"] == op and r["direction"] == d for r in ok)]
    if mem_ops:
        cols = 2
        rows = (len(mem_ops) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(10, 3 * rows), squeeze=False)
        for ax, (op, d) in zip(axes.flat, mem_ops):
            _lines(ax, ok, op, d, "gbps")
            label = next(r["label"] for r in ok if r["op"] == op)
            ax.set_title(f"{label} {d}", fontsize=10)
            ax.set_xlabel("sequence length (keys)" if "attention" in op else "rows")
            ax.set_ylabel("GB/s")
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(mem_ops):]:
            ax.set_visible(False)
        fig.suptitle(f"Memory-bound ops: GB/s by provider (MEASURED on {device_name})", fontsize=11)
        paths.append(_save(fig, out_dir / "kernels_gbps.png"))
    attn = [r for r in ok if r["op"] == "attention"]
    if attn:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
        for ax, d in zip(axes.flat, ("fwd", "fwd+bwd")):
            _lines(ax, attn, "attention", d, "tflops")
            ax.set_title(f"causal attention {d}", fontsize=10)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=8)
        fig.suptitle(f"Attention TFLOP/s vs sequence length (MEASURED on {device_name})", fontsize=11)
        paths.append(_save(fig, out_dir / "attention_tflops.png"))
    return paths


def train(records: list[dict], out_dir: Path, device_name: str) -> list[Path]:
    ok = [r for r in records if "tokens_per_s" in r]
    if not ok:
        return []
    presets = list(dict.fromkeys(r["preset"] for r in ok))
    modes = list(dict.fromkeys(_mode(r) for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(presets) * max(1, len(modes)) / 2), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, p in enumerate(presets):
            r = next((r for r in ok if r["preset"] == p and _mode(r) == mode), None)
            if r is not None:
                xs.append(j + i * width - 0.4 + width / 2)
                ys.append(r["tokens_per_s"])
        bars = ax.bar(xs, ys, width, label=mode)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    labels = [f"{p}\n(batch {next(r['batch'] for r in ok if r['preset'] == p)} x seq "
              f"{next(r['seq'] for r in ok if r['preset'] == p)})" for p in presets]
    ax.set_xticks(range(len(presets)), labels)
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"Training step (fwd+bwd+AdamW) throughput\nMEASURED on {device_name}", fontsize=10)
    return [_save(fig, out_dir / "train_tokens_per_s.png")]


def _mode(r: dict) -> str:
    return f"{r['kernels']}{' +compile' if r['compile'] else ''} {r['dtype']}"


def decode(records: list[dict], out_dir: Path, device_name: str) -> list[Path]:
    gen = [r for r in records if r["test"] == "generate"]
    sweep = [r for r in records if r["test"] == "context"]
    if not gen and not sweep:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    ax = axes[0, 0]
    keys = list(dict.fromkeys((r["preset"], r["kernels"], r["batch"]) for r in gen))
    series = list(dict.fromkeys((r.get("mode", "eager"), r["kv_cache"]) for r in gen))
    width = 0.8 / max(len(series), 1)
    for i, (mode, cache) in enumerate(series):
        ys = [next((r["tokens_per_s"] for r in gen if (r["preset"], r["kernels"], r["batch"]) == k
                    and r.get("mode", "eager") == mode and r["kv_cache"] == cache), 0) for k in keys]
        bars = ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(keys))], ys, width,
                      label=mode if cache else f"{mode}, no cache (recompute)")
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(keys)), [f"{p} {k}\nbatch {b}" for p, k, b in keys], fontsize=7)
    ax.set_ylabel("generated tokens / s")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    new = gen[0]["new_tokens"] if gen else 0
    ax.set_title(f"Generation, {new} new tokens", fontsize=10)
    ax = axes[0, 1]
    for kernels in dict.fromkeys(r["kernels"] for r in sweep):
        for cache, style in ((True, "o-"), (False, "s--")):
            pts = sorted((r["context"], r["tokens_per_s"]) for r in sweep if r["kv_cache"] == cache
                         and r["kernels"] == kernels)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{kernels}, {'KV cache' if cache else 'no cache (recompute)'}", ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("tokens / s (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Decode step vs context ({sweep[0]['preset'] if sweep else '-'})", fontsize=10)
    fig.suptitle(f"Decoding (MEASURED on {device_name})", fontsize=11)
    return [_save(fig, out_dir / "decode_tokens_per_s.png")]


def static(records: list[dict], out_dir: Path) -> list[Path]:
    roof = [r for r in records if r.get("table") == "roofline"]
    if not roof:
        return []
    cases = list(dict.fromkeys((r["op"], r["direction"]) for r in roof))
    gpus = list(dict.fromkeys(r["gpu"] for r in roof))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(gpus)
    for i, gpu in enumerate(gpus):
        ys = [next(r["time_us"] for r in roof if (r["op"], r["direction"]) == c and r["gpu"] == gpu) for c in cases]
        bars = ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(cases))], ys, width, label=gpu)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(range(len(cases)), [f"{label}\n{d}" for label, d in cases], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ESTIMATED best-case time (us)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("ESTIMATED roofline time per op at representative bf16 sizes (datasheet peaks, not measured)",
                 fontsize=10)
    return [_save(fig, out_dir / "roofline_estimates.png")]


def dist(records: list[dict], out_dir: Path) -> list[Path]:
    """Left: MEASURED tokens/s by number of CPU ranks and mode. Right: ESTIMATED scaling-efficiency range
    (no overlap .. full overlap) per preset on the H100 clusters."""
    meas = [r for r in records if r.get("table") == "measured" and "tokens_per_s" in r]
    est = [r for r in records if r.get("table") == "estimated"]
    if not meas and not est:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    ax = axes[0, 0]
    keys = list(dict.fromkeys((r["preset"], r["world_size"], r["parallel"]) for r in meas))
    bars = ax.bar(range(len(keys)), [next(r["tokens_per_s"] for r in meas
                                          if (r["preset"], r["world_size"], r["parallel"]) == k) for k in keys],
                  color=["C0" if p == "none" else "C1" if p == "ddp" else "C2" for _, _, p in keys])
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), [f"{p}\n{w} rank{'s' if w > 1 else ''}\n{m}" for p, w, m in keys], fontsize=8)
    ax.set_ylabel("global tokens / s")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("MEASURED on CPU ranks (gloo, 1 thread each), weak scaling", fontsize=10)
    ax = axes[0, 1]
    cases = list(dict.fromkeys((r["cluster"], r["parallel"]) for r in est))
    presets = list(dict.fromkeys(r["preset"] for r in est))
    width = 0.8 / max(1, len(cases))
    for i, case in enumerate(cases):
        rows = [next((r for r in est if r["preset"] == p and (r["cluster"], r["parallel"]) == case), None)
                for p in presets]
        xs = [j + i * width - 0.4 + width / 2 for j, r in enumerate(rows) if r]
        lows = [100 * r["efficiency_no_overlap"] for r in rows if r]
        highs = [100 * r["efficiency_full_overlap"] for r in rows if r]
        ax.bar(xs, [h - lo for h, lo in zip(highs, lows)], width, bottom=lows, label=f"{case[0]} {case[1]}")
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("scaling efficiency % (no overlap .. full)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title("ESTIMATED on H100 clusters (formula, assumed MFU)", fontsize=10)
    fig.suptitle("Data-parallel training: measured CPU scaling, estimated GPU scaling", fontsize=11)
    return [_save(fig, out_dir / "dist_scaling.png")]


def loss_curves(records: list[dict], out_dir: Path, device_name: str) -> list[Path]:
    """The training loss per step of each kernel path (records of bench/gpu_check.py's train step)."""
    runs = [r for r in records if r.get("curve")]
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, style in zip(runs, ("-", "--", ":")):
        its = sorted(r["curve"])
        ax.plot(its, [r["curve"][i] for i in its], style, lw=1, label=f"kernels={r['kernels']}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    diff = f"; max |difference| {runs[0]['max_loss_diff']:.4f}" if "max_loss_diff" in runs[0] else ""
    ax.set_title(f"{runs[0]['preset']}: same seed and batches on each kernel path{diff}\n({device_name})", fontsize=10)
    return [_save(fig, out_dir / "train_loss_by_kernels.png")]
