"""One rank of the `dist` suite's measured part (bench/dist_suite.py launches it under torchrun).

    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node W \\
        bench/dist_worker.py --preset tiny --model '{"n_layer": 2}' --batch-size 8 --seq-len 128 --out R.json

Every rank builds the same model (`gpt.create_model`, seed 0), wraps it as training does
(`train.distributed.init_distributed` and `parallelize`: a plain model for one rank, DDP for several,
FSDP2 for `--modes fsdp`), builds the optimizer with `train.optim.make_optimizer` (AdamW, the default),
and times training steps on random token ids of the model's vocabulary. One step is what
train.loop.Trainer._step does for one micro-batch: forward, backward (gradient sync inside
`grad_sync`), global-norm clipping at 1.0, optimizer step, zero_grad. Left out: the loop's scalar
all-reduces (the logged loss mean, the stop flags), data loading and logging.

Timing: a barrier before every step lines the ranks up; each rank times its own step; a step's time
is the slowest rank's (the next collective waits for it); the result is the median over the timed
steps. For DDP every timed step with gradient sync is paired with one without (`no_sync()`: the
same work with no gradient all-reduce), interleaved so that both see the same machine. FSDP cannot
skip its collectives (its parameters are sharded), so it is timed with sync only.

Rank 0 writes a JSON file: {"world_size", "threads_per_rank", "rows": [{"parallel", "step_s",
"nosync_step_s", ...}]}. Errors go to stderr with a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script by torchrun: import the repository's packages, not modules beside this file.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from gpt import create_model  # noqa: E402
from gpt.runtime import DTYPES, autocast  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.distributed import World, clip_grad_norm, grad_sync, init_distributed, parallelize  # noqa: E402
from train.optim import make_optimizer  # noqa: E402

GRAD_CLIP = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default="{}", help="GPTConfig overrides as a JSON object")
    p.add_argument("--kernels", default="torch")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (pairs for DDP) first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (pairs with and without sync for DDP)")
    p.add_argument("--modes", default="ddp,fsdp", help="parallel modes to time when there are several ranks")
    p.add_argument("--out", required=True, help="rank 0 writes the results here (JSON)")
    return p.parse_args(argv)


def _timed(world: World, step, sync: bool) -> float:
    """Seconds of one step on this rank, started together with the other ranks."""
    world.barrier()
    t0 = time.perf_counter()
    step(sync)
    return time.perf_counter() - t0


def _slowest(world: World, times: list[float]) -> list[float]:
    """Per step, the slowest rank's time (every rank gets the same list)."""
    return [max(ts) for ts in zip(*world.gather_objects(times))]


def measure(mode: str, world: World, device: torch.device, args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps of a fresh model wrapped for `mode` (none | ddp | fsdp)."""
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)  # the same initial weights on every rank
    model = create_model(args.preset, kernels=args.kernels, **json.loads(args.model)).to(device)
    params = model.num_params()
    seq = min(args.seq_len, model.config.block_size)
    step_model = parallelize(model, world, device, dtype, compile=False)
    optimizer = make_optimizer(model, TrainConfig(preset=args.preset, grad_clip=GRAD_CLIP), device,
                               distributed=world.distributed, sharded=mode == "fsdp")
    gen = torch.Generator().manual_seed(1000 + world.rank)  # each rank its own batches, as in training
    vocab = model.config.vocab_size
    batches = [(torch.randint(0, vocab, (args.batch_size, seq), generator=gen).to(device),
                torch.randint(0, vocab, (args.batch_size, seq), generator=gen).to(device)) for _ in range(2)]
    losses: list[float] = []

    def step(sync: bool) -> None:
        x, y = batches[len(losses) % len(batches)]
        with grad_sync(step_model, world, sync=sync):
            with autocast(device, dtype):
                _, loss = step_model(x, y)
            loss.backward()
        clip_grad_norm(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    can_skip_sync = mode == "ddp"  # one rank has nothing to sync; FSDP cannot skip its collectives
    sync_t, nosync_t = [], []
    for i in range(args.warmup + args.steps):
        t = _timed(world, step, True)
        if i >= args.warmup:
            sync_t.append(t)
        if can_skip_sync:
            t = _timed(world, step, False)
            if i >= args.warmup:
                nosync_t.append(t)
    sync_t = _slowest(world, sync_t)
    nosync_t = _slowest(world, nosync_t) if can_skip_sync else []
    row = {"parallel": mode, "preset": args.preset, "model": json.loads(args.model), "params": params,
           "batch_per_rank": args.batch_size, "seq": seq, "dtype": args.dtype, "kernels": args.kernels,
           "warmup_steps": args.warmup, "steps_timed": args.steps,
           "step_s": statistics.median(sync_t), "step_s_min": min(sync_t), "step_s_max": max(sync_t),
           "step_s_all": sync_t, "final_loss": losses[-1]}
    if nosync_t:
        row.update(nosync_step_s=statistics.median(nosync_t), nosync_step_s_all=nosync_t)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world, device = init_distributed("ddp" if size > 1 else "auto", "cpu")
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()] if size > 1 else ["none"]
        rows = []
        for mode in modes:
            if mode not in ("none", "ddp", "fsdp"):
                raise ValueError(f"unknown mode {mode!r}; use ddp or fsdp")
            # The process group exists already: this only names the mode (the group stays world's).
            mode_world = world if mode == world.parallel else init_distributed(mode, "cpu")[0]
            rows.append(measure(mode, mode_world, device, args))
        if world.main:
            out = Path(args.out)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"world_size": world.size, "threads_per_rank": torch.get_num_threads(),
                                       "backend": "gloo" if world.distributed else None, "torch": torch.__version__,
                                       "rows": rows}, indent=1))
            tmp.replace(out)
        world.barrier()
    finally:
        world.close()
    return 0


if __name__ == "__main__":
    status = main()
    # The result is written and the process group ended: skip the interpreter's teardown (about a second
    # of unloading torch per rank, which the launcher would wait for). Errors raise before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
