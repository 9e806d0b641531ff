"""Muon's Newton-Schulz on one training recipe's matrix stacks: train.optim.orthogonalize against the
unfused bf16 steps it replaced (`orthogonalize_unfused`, kept here as the reference).

    python -m bench.muon_ns                                     # configs/shakespeare_cpu.toml, 20 repeats
    python -m bench.muon_ns --config configs/shakespeare_cpu.toml --repeats 30 --threads 2

The stacks are the ones MuonAdamW._muon orthogonalizes each step (the blocks' matrices, split into
their logical parts and grouped by shape), filled with Gaussian noise. The two implementations run
interleaved, after a warm-up, so a load that comes and goes on a shared machine hits both alike;
each line is the median (and 20% / 80% quantiles) over the repeats of one whole optimizer step's
Newton-Schulz work, plus the FLOP rate the median implies (3 GEMMs a step:
2 r^2 c + 2 r^3 + 2 r^2 c FLOPs for an r x c matrix in its wide orientation, r <= c).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

from gpt import GPT
from train.config import resolve_config
from train.optim import NS_COEFFS, orthogonalize


def orthogonalize_unfused(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The previous train.optim.orthogonalize: every product and sum its own bf16 kernel (eight bf16
    roundings a step instead of three)."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def recipe_stacks(config: str) -> dict[tuple[int, int], int]:
    """{(rows, cols): number of matrices} that Muon orthogonalizes each step for a training config."""
    cfg = resolve_config({}, config)
    with torch.device("meta"):  # shapes only
        model = GPT(cfg.model_config(vocab_size=256))
    counts: Counter = Counter()
    for p, splits in model.block_matrices():
        for rows in splits:
            counts[(rows, p.shape[1])] += 1
    return dict(counts)


def flops(n: int, rows: int, cols: int, steps: int) -> int:
    r, c = min(rows, cols), max(rows, cols)
    return steps * n * (4 * r * r * c + 2 * r ** 3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.muon_ns", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shakespeare_cpu.toml",
                   help="training config whose model gives the stacks")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of each implementation (>= 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each implementation first")
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps (MuonAdamW's ns_steps)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = recipe_stacks(args.config)
    gen = torch.Generator().manual_seed(0)
    stacks = [torch.randn((n, rows, cols), generator=gen) for (rows, cols), n in shapes.items()]
    total = sum(flops(*s.shape, args.steps) for s in stacks)
    impls = {"unfused (before)": orthogonalize_unfused, "fused (train.optim)": orthogonalize}

    def one_step(fn) -> list[float]:
        out = []
        for s in stacks:
            t = time.perf_counter()
            fn(s, args.steps)
            out.append(time.perf_counter() - t)
        return out

    for fn in impls.values():
        for _ in range(args.warmup):
            one_step(fn)
    times = {name: [] for name in impls}
    for _ in range(max(args.repeats, 10)):
        for name, fn in impls.items():
            times[name].append(one_step(fn))

    print(f"{args.config}: {', '.join(f'{n} x {r}x{c}' for (r, c), n in shapes.items())}; {args.steps} steps, bf16, "
          f"{torch.get_num_threads()} threads, {total / 1e9:.1f} GFLOP per optimizer step; "
          f"median [p20, p80] of {max(args.repeats, 10)} interleaved repeats")
    for name, runs in times.items():
        whole = sorted(sum(r) for r in runs)
        q = statistics.quantiles(whole, n=10, method="inclusive")
        per = "  ".join(f"{tuple(s.shape)}: {statistics.median(r[i] for r in runs) * 1e3:.1f}"
                        for i, s in enumerate(stacks))
        med = statistics.median(whole)
        print(f"  {name:20s} {med * 1e3:6.1f} ms/step [{q[1] * 1e3:.1f}, {q[7] * 1e3:.1f}]  "
              f"{total / med / 1e12:.3f} TFLOP/s   per stack (ms): {per}")
    diff = max((orthogonalize(s, args.steps) - orthogonalize_unfused(s, args.steps)).abs().max().item() for s in stacks)
    print(f"  max |fused - unfused| over the stacks: {diff:.4f} (entries up to "
          f"{max(orthogonalize(s, args.steps).abs().max().item() for s in stacks):.3f})")


if __name__ == "__main__":
    main()
