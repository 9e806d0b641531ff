"""Writing training checkpoints: atomic saves, sharded (FSDP) checkpoints, and the RNG states exact
resume needs.

The single-file format and its loading live in gpt/checkpoint.py. What training adds (optimizer,
scaler, run state, RNG states) is stored as tensors and plain values too, so every checkpoint loads
with weights_only=True.

Sharded checkpoints (`--parallel fsdp`) live in OUT/ckpt_sharded/:
    iter-00000500-<id>/     torch.distributed.checkpoint files (one per rank: model and optimizer
                            shards, then `.metadata`) and meta.pt (everything else, from rank 0)
    latest, best            one line each: the name of a complete iter-* directory
A save writes a new directory and only then points `latest` at it (an atomic rename), so a crash or
kill mid-save leaves `latest` on the previous, complete checkpoint. Directories no pointer names are
removed after the switch. torch.distributed.checkpoint reshards on load: N ranks' checkpoint resumes
on M ranks, or in one process (`consolidate`, which writes the single-file checkpoint).
"""
from __future__ import annotations

import pickle
import random
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from gpt.checkpoint import FORMAT_VERSION, SHARDED_DIR, read_checkpoint
from gpt.errors import CheckpointError
from gpt.files import atomic_open, atomic_write_text



def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically (gpt/files.py): a crash or kill at any moment leaves either the
    old file or the new one, never a torn one; the file gets the mode the umask gives any other."""
    with atomic_open(path, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def saved_iter(path: str | Path, trust: bool = False) -> int:
    """The training iteration a single-file checkpoint holds, without reading its tensors (mmap)."""
    ck = read_checkpoint(path, trust=trust, mmap=True)
    if "iter" not in ck:
        raise CheckpointError(f"{path} holds a model but no training state (no iter): it cannot be resumed; "
                              f"start a new run from it with --init-from after `python -m gpt.export`")
    return int(ck["iter"])


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain values (numpy's key array as an int64 tensor)."""
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": bit_generator, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["bit_generator"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)  # a format-1 checkpoint (read with --trust-checkpoint) holds numpy's own tuple
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- sharded checkpoints (FSDP) -------------------------------------------------------------------------
def sharded_checkpoint(out_dir: str | Path, which: str = "latest") -> Path | None:
    """The complete sharded checkpoint directory that OUT/ckpt_sharded/<which> names, or None."""
    pointer = Path(out_dir) / SHARDED_DIR / which
    if not pointer.exists():
        return None
    step_dir = pointer.parent / pointer.read_text().strip()
    if not (step_dir / ".metadata").exists() or not (step_dir / "meta.pt").exists():
        raise CheckpointError(f"{pointer} names {step_dir.name}, which is incomplete or missing; the sharded "
                              f"checkpoints in {pointer.parent} were changed by hand. Point {which} at a "
                              f"complete iter-* directory (one with .metadata and meta.pt)")
    return step_dir


def read_meta(step_dir: Path) -> dict:
    """meta.pt of a sharded checkpoint: the run's configs, tokenizer, run state and RNG states."""
    path = step_dir / "meta.pt"
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"sharded checkpoint {step_dir}: meta.pt is corrupt ({type(e).__name__}: {e}); "
                              f"point {step_dir.parent / 'latest'} at an older iter-* directory") from None


def save_sharded(out_dir: str | Path, name: str, model, optimizer, meta: dict | None, best: bool) -> Path:
    """Write model and optimizer shards from every rank (a collective: all ranks call it with the same
    `name`), then, on the rank that passes `meta` (rank 0), meta.pt and the pointers; see the module
    docstring for the layout. Returns the new directory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out_dir) / SHARDED_DIR
    step_dir = root / name
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=step_dir)
    if meta is not None:
        save_checkpoint(meta, step_dir / "meta.pt")
        atomic_write_text(root / "latest", name + "\n")
        if best:
            atomic_write_text(root / "best", name + "\n")
        keep = {(root / p).read_text().strip() for p in ("latest", "best") if (root / p).exists()}
        for d in root.glob("iter-*"):
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # nobody goes on (or resumes) before the pointer names the new directory
    return step_dir


def load_full_state(model, optimizer, plain_model, plain_optimizer) -> None:
    """Copy the state of an unsharded model and optimizer (loaded from a single-file checkpoint) into
    `model` and `optimizer`, which FSDP shards: every rank passes the same full state and keeps its own
    shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(plain_model, plain_optimizer)  # keyed by parameter name
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def load_sharded(step_dir: Path, model, optimizer, no_dist: bool = False) -> None:
    """Load a sharded checkpoint into `model` and `optimizer`, whatever their sharding: FSDP over any
    number of ranks, or a plain model in one process (no_dist=True)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it assumes one process, as asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=step_dir, no_dist=no_dist)
    except Exception as e:  # DCP raises its own CheckpointException, wrapping the per-rank errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"sharded checkpoint {step_dir} does not load into this model and optimizer "
                              f"({first}); resume with the model and --optimizer it was trained with") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
