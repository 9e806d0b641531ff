"""Runs training scenarios on every rank of a torchrun job, for tests/train/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/train/distributed_worker.py SPEC.json

SPEC: {"results": path, "scenarios": [{"name", "cfg": TrainConfig fields, "stop_at", "signal_at",
"raise_at", "logits", "audit", "single"}]}. One process group serves every scenario, in order; rank 0 rewrites
the results file after each one, so a scenario that ends the job (raise_at) comes last.
- signal_at k: rank 1 sends itself SIGTERM during step k (only rank 1 is signalled);
- raise_at k: rank 1 raises during step k;
- budget_at k: rank 1's clock says the time budget is spent from step k on (rank 0's never does);
- nan_at k: rank 1 sets a weight to NaN before step k (its loss, then everyone's gradients, go NaN);
- replicas: whether every rank ends with bit-identical weights (DDP);
- logits: the trained model's logits on fixed tokens (an FSDP forward on every rank) are saved;
- audit: every file rank 1 opens for writing, creates, renames or removes under out_dir is recorded;
- single: rank 0 alone runs the scenario as one process (no torchrun environment) while rank 1 waits,
  so one job can alternate one process, DDP and FSDP over the same run directory;
- documents: a directory of token shards (tests/train/test_loop.py ShardedData) the run trains on instead
  of its dataset, for --batching documents.
Every scenario records the iteration it started from, the checkpoint it resumed from, and whether the
files under its out_dir were left untouched (size, mtime and bytes).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

from pathlib import Path

import torch
import torch.distributed as dist

import train.loop
from train.config import TrainConfig
from train.distributed import TORCHRUN_VARS
from train.errors import TrainingError
from train.loop import Trainer, _Clock

WRITE_EVENTS = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.rmdir", "shutil.rmtree",
                "tempfile.mkstemp", "os.truncate"}
audited: list[str] = []
audit_root: list[str] = []  # the current scenario's out_dir while auditing, else empty


def _audit(event: str, args) -> None:
    if not audit_root or not args:
        return
    path = str(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
    writes = event in WRITE_EVENTS
    if event == "open" and len(args) >= 3:  # (path, mode or None, flags)
        mode, flags = args[1], args[2]
        writes = bool((isinstance(mode, str) and any(c in mode for c in "wax+")) or
                      (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    if writes and path and os.path.abspath(path).startswith(audit_root[0]):
        audited.append(f"{event} {path}")


def snapshot(out_dir: str) -> dict:
    found = {}
    for root, _, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[path] = (os.stat(path).st_mtime_ns, f.read())
    return found


@contextlib.contextmanager
def one_process():
    """No torchrun variables: a Trainer made here is a World of one (the job's process group stays up)."""
    saved = {v: os.environ.pop(v) for v in TORCHRUN_VARS if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_single(sc: dict, rank: int) -> dict:
    out = {}
    if rank == 0:
        cfg = TrainConfig(**sc["cfg"])
        before = snapshot(cfg.out_dir)
        with one_process():
            trainer = Trainer(cfg)
            out = {"start_iter": trainer.state.iter, "resumed_from": str(trainer.resumed_from)}
            out.update(trainer.train(stop_at=sc.get("stop_at")))
            trainer.close()
        out["untouched"] = snapshot(cfg.out_dir) == before
    dist.barrier()
    return out


@contextlib.contextmanager
def documents_data(shards: str | None):
    """With a shard directory: the Trainer made inside trains on those shards (train.loop.open_data patched)."""
    if not shards:
        yield
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: tests.train.test_loop
    from tests.train.test_loop import ShardedData
    data = ShardedData(Path(shards), write=False)
    real = train.loop.open_data
    train.loop.open_data = lambda cfg, tokenizer=None: data
    try:
        yield
    finally:
        train.loop.open_data = real


def run(spec: dict) -> None:
    rank = dist.get_rank()
    results = {}
    sys.addaudithook(_audit)
    for sc in spec["scenarios"]:
        if sc.get("single"):
            results[sc["name"]] = run_single(sc, rank)
            if rank == 0:
                with open(spec["results"], "w") as f:
                    json.dump(results, f)
            continue
        cfg = TrainConfig(**sc["cfg"])
        before = snapshot(cfg.out_dir) if rank == 0 else None
        with documents_data(sc.get("documents")):
            trainer = Trainer(cfg)
        started = {"start_iter": trainer.state.iter, "resumed_from": str(trainer.resumed_from)}
        step, k = trainer._step, {"n": trainer.state.iter}

        def patched_step():
            k["n"] += 1
            if rank == 1 and k["n"] == sc.get("signal_at"):
                os.kill(os.getpid(), signal.SIGTERM)
            if rank == 1 and k["n"] == sc.get("raise_at"):
                with open(spec["results"] + ".raised", "w") as f:
                    f.write(str(time.time()))
                raise RuntimeError(f"injected failure on rank 1 at step {k['n']}")
            if rank == 1 and k["n"] == sc.get("nan_at"):
                with torch.no_grad():
                    next(trainer.model.parameters()).fill_(float("nan"))
            return step()

        trainer._step = patched_step
        real_out_of_time = _Clock.out_of_time
        if rank == 1 and sc.get("budget_at"):
            _Clock.out_of_time = lambda clock: k["n"] >= sc["budget_at"]
        audited.clear()
        if sc.get("audit") and rank == 1:
            audit_root[:] = [os.path.abspath(cfg.out_dir)]
        out, outcome = {}, "done"
        try:
            out = trainer.train(stop_at=sc.get("stop_at"))
        except KeyboardInterrupt:
            outcome = f"interrupted at {trainer.state.iter}"
        except TrainingError:
            outcome = f"TrainingError at {trainer.state.iter}"
        finally:
            audit_root.clear()
            _Clock.out_of_time = real_out_of_time
        if outcome == "done" and "stop_reason" in out:
            outcome = f"{out['stop_reason']} at {out['iters']}"
        out.update(started)
        dist.barrier()  # every rank's writes are done
        if rank == 0:
            out["untouched"] = snapshot(cfg.out_dir) == before
        out["outcomes"] = [None] * dist.get_world_size()
        dist.all_gather_object(out["outcomes"], outcome)  # what every rank did
        if sc.get("logits"):
            idx = torch.arange(2 * 16).remainder(trainer.model_config.vocab_size).view(2, 16)
            trainer.model.eval()
            with torch.no_grad():
                logits, _ = trainer.model(idx)
            if rank == 0:
                torch.save({"idx": idx, "logits": logits}, os.path.join(cfg.out_dir, "logits.pt"))
        if sc.get("replicas"):  # DDP: every rank must hold the very same weights
            flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, flat)
            out["replicas_equal"] = all(torch.equal(c, flat) for c in copies)
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(list(audited), gathered, dst=0)
        if rank == 0:
            out["rank1_writes"] = gathered[1]
        trainer.close()
        results[sc["name"]] = out
        if rank == 0:
            with open(spec["results"], "w") as f:
                json.dump(results, f)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    with open(sys.argv[1]) as f:
        run(json.load(f))
    dist.destroy_process_group()
