"""Running one training job over several processes: torchrun's environment, the process group, and
the few collectives the loop needs.

`torchrun --nproc_per_node N -m train ...` starts N copies of the same command with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. `init_distributed` reads them, starts the process group
(NCCL on CUDA, gloo on CPU) and gives each rank its device; a plain `python -m train` gets a `World`
of one and no process group. PyTorch does the communication (DDP, FSDP2's `fully_shard`,
torch.distributed.checkpoint); this module only decides who does what.

`--parallel`:
- ``ddp``: every rank holds the whole model and optimizer; gradients are averaged across ranks in
  the backward (DistributedDataParallel). Rank 0 writes the same single-file checkpoint as one process.
- ``fsdp``: FSDP2 shards parameters, gradients and optimizer state across ranks (`fully_shard` on each
  block and the root); checkpoints are sharded (torch.distributed.checkpoint), one file per rank.
- ``auto``: ddp when the world has more than one rank, nothing otherwise.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt.errors import ConfigError
from gpt.runtime import resolve_device

from .config import PARALLEL_MODES

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class World:
    """This process's place in the job. A World of one (the default) makes every collective a no-op."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    parallel: str = "none"       # none | ddp | fsdp
    owns_group: bool = False     # this World started the process group (and so ends it)

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes metrics, plots and single-file checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (a new tensor; `t` itself on one rank)."""
        if self.size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # SUM and divide: ReduceOp.AVG is new in gloo
        return t / self.size

    def any(self, *flags: bool, device: torch.device | None = None) -> list[bool]:
        """For each flag: is it set on any rank? One small all-reduce; every rank gets the same answer,
        so every rank takes the same branch after it (no rank waits in a collective the others left)."""
        if self.size == 1:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather_objects(self, obj) -> list:
        """`obj` from every rank, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this World started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(parallel: str, device_name: str,
                     timeout: datetime.timedelta | None = None) -> tuple[World, torch.device]:
    """This process's World and device. Under torchrun: the process group (NCCL on CUDA, gloo on
    CPU) is started unless one exists already, and rank r of a node uses cuda:LOCAL_RANK. Without
    torchrun: a World of one; `--parallel ddp/fsdp` is then an error that says how to launch."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"unknown parallel mode {parallel!r}; choose one of: {', '.join(PARALLEL_MODES)}")
    if not launched_by_torchrun():
        if parallel != "auto":
            raise ConfigError(f"--parallel {parallel} needs several processes: launch with "
                              f"`torchrun --nproc_per_node N -m train ...` (or drop --parallel)")
        return World(), resolve_device(device_name)
    rank, local_rank, size = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    mode = parallel if parallel != "auto" else ("ddp" if size > 1 else "none")
    device = _rank_device(device_name, local_rank)
    owns = False
    if mode != "none" and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        owns = True
    if mode != "none" and dist.get_world_size() != size:
        raise ConfigError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {size}")
    return World(rank=rank, local_rank=local_rank, size=size, parallel=mode, owns_group=owns), device


def _rank_device(name: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK on a CUDA machine (for --device auto or cuda), the CPU otherwise."""
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                  f"launch at most that many processes per node (--nproc_per_node)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            return device
        if name == "cuda":
            raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu (gloo)")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device {name} under torchrun: use --device cuda (each rank takes cuda:LOCAL_RANK) "
                      f"or --device cpu")


def parallelize(model: torch.nn.Module, world: World, device: torch.device, dtype: torch.dtype,
                compile: bool) -> torch.nn.Module:
    """The module the training step calls.

    One process: `model`, or torch.compile(model). Under DDP/FSDP, compile (if asked) comes first and
    per block (`block.compile()`, in place): the communication hooks then stay outside the compiled
    graphs, DDP needs no graph splitting at its bucket boundaries, and the blocks, all the same code,
    share one compiled graph. DDP then wraps the model; FSDP2 shards every block and then the root
    (the embedding, tied to the output head, and the final norm), in place. Under bfloat16, FSDP
    keeps bf16 parameter copies for compute and reduces gradients in fp32; the sharded master
    weights stay fp32."""
    if not world.distributed:
        return torch.compile(model) if compile else model
    if compile:
        for block in model.blocks:
            block.compile()
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # The only buffers are the RoPE tables, equal on every rank: no broadcast before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})  # the name before torch 2.14
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world.size,))
    # cast_forward_inputs=False: the RoPE tables reach the blocks in fp32, as they do without FSDP.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def grad_sync(step_model: torch.nn.Module, world: World, sync: bool):
    """Context for one micro-step's forward and backward: gradients are reduced across ranks only
    when `sync` (the last micro-step of an optimizer step); before that they accumulate locally."""
    if world.parallel == "ddp" and not sync:
        return step_model.no_sync()
    if world.parallel == "fsdp":
        step_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm before.
    Under FSDP each rank holds a shard of each gradient: the norm is reduced over all of them."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(total, "full_tensor"):  # a DTensor: partial norms from every rank's shards
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
