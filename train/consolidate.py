"""python -m train.consolidate OUT_DIR: write the single-file checkpoints of an FSDP run.

`--parallel fsdp` saves sharded checkpoints (OUT/ckpt_sharded, one file per rank; see
train/checkpoint.py). The sampler, the evaluator and one-process or DDP training read one file:
this loads the sharded checkpoint that `latest` (and `best`) names into a plain model and optimizer
in this one process, with no process group, and writes OUT/ckpt.pt (and OUT/ckpt_best.pt), the same
files a DDP run writes, optimizer state included. It runs at the end of every FSDP run; run it by
hand to sample from a run that is still training or was interrupted. It never replaces a ckpt.pt
that holds a later iteration than the sharded checkpoint (work continued in one process or under
DDP) unless told to with --force.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gpt import GPT
from gpt.checkpoint import SHARDED_DIR, model_config_of
from gpt.cli import UNDERSCORE_NOTE, command_line_main
from gpt.errors import CheckpointError, under_command_line

from .checkpoint import load_sharded, read_meta, save_checkpoint, saved_iter, sharded_checkpoint
from .config import TrainConfig
from .errors import TRAIN_ERRORS
from .optim import make_optimizer

TARGETS = {"latest": "ckpt.pt", "best": "ckpt_best.pt"}


def consolidate(out_dir: str | Path, force: bool = False) -> list[Path]:
    """Write OUT/ckpt.pt from the latest sharded checkpoint and OUT/ckpt_best.pt from the best one;
    returns the paths written. A ckpt.pt at a higher iteration than the sharded checkpoint (a run
    continued in one process or under DDP) is newer work: it is never replaced (a CheckpointError),
    unless force; a newer ckpt_best.pt is kept the same way, with a note."""
    out = Path(out_dir)
    if sharded_checkpoint(out) is None:
        raise CheckpointError(f"no sharded checkpoint in {out / SHARDED_DIR}: consolidate reads the checkpoints "
                              f"of `torchrun ... -m train --parallel fsdp` runs; other runs write {out / 'ckpt.pt'} "
                              f"themselves")
    written, states = [], {}  # states: per sharded directory (latest and best are often the same one)
    for which, name in TARGETS.items():
        step_dir = sharded_checkpoint(out, which)
        if step_dir is None:
            continue
        target, sharded_iter = out / name, read_meta(step_dir)["iter"]
        existing = saved_iter(target) if target.exists() else None
        if existing is not None and existing > sharded_iter and not force:
            if which == "latest":
                flag = "--force" if under_command_line() else "force=True"
                raise CheckpointError(
                    f"{target} is at iter {existing}, newer than the sharded checkpoint {step_dir} (iter "
                    f"{sharded_iter}): not replaced. It continues with `--resume` under any --parallel mode; "
                    f"pass {flag} to replace it with the older sharded state")
            print(f"note: kept {target} (iter {existing}): newer than the sharded best (iter {sharded_iter})",
                  file=sys.stderr)
            continue
        if step_dir not in states:
            states[step_dir] = _single_file_state(step_dir)
        save_checkpoint(states[step_dir], target)
        written.append(target)
    return written


def _single_file_state(step_dir: Path) -> dict:
    """The single-file checkpoint dict of a sharded checkpoint: its meta.pt plus the model and optimizer
    state, loaded into a plain model and optimizer in this process."""
    meta = read_meta(step_dir)
    cfg = TrainConfig(**{k: v for k, v in meta["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    model = GPT(model_config_of(meta, step_dir), kernels="torch")
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    load_sharded(step_dir, model, optimizer, no_dist=True)
    return {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__.splitlines()[0],
                                epilog=UNDERSCORE_NOTE)
    p.add_argument("out_dir", help="the run directory (--out-dir of the FSDP run)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR/ckpt.pt even where it holds a later iteration than the sharded checkpoint")
    return p


@command_line_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in consolidate(args.out_dir, force=args.force):
            print(f"wrote {path}")
        return 0
    except TRAIN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
