"""python -m train: train a GPT. Flags mirror TrainConfig and GPTConfig fields (kebab-case).

Under `torchrun --nproc_per_node N -m train ...` every rank runs this; rank 0 alone prints results,
and any rank's error reaches stderr (with torchrun's summary naming the rank that failed first)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields

import torch

from gpt.config import PRESETS, GPTConfig
from gpt.ops import KERNEL_MODES

from .config import MODEL_FIELDS, OPTIMIZERS, PARALLEL_MODES, SCHEDULES, TRAIN_PRESETS, TrainConfig, resolve_config
from .errors import TRAIN_ERRORS
from .loop import Trainer

HELP = {
    "preset": f"model size: {', '.join(PRESETS)}", "kernels": "Triton kernels or PyTorch ops (auto: Triton on CUDA)",
    "dataset": "'shakespeare' (default, offline) or a text file / directory / glob",
    "tokenizer": "char | bpe | gpt2", "vocab_size": "bpe vocabulary size (default 8192)",
    "device": "auto | cpu | cuda | cuda:N | mps", "dtype": "auto | float32 | bfloat16 | float16",
    "time_budget": "minutes of wall clock; ends cleanly and fits the LR schedule to it",
    "resume": "continue exactly from OUT_DIR/ckpt.pt", "compile": "torch.compile the model",
    "gradient_checkpointing": "recompute each block in the backward (less memory, ~30%% more compute)",
    "optimizer": "adamw | muon (Muon for the blocks' matrices at --matrix-lr, AdamW at --lr for the rest)",
    "schedule": "the decay from --lr to --min-lr after warmup: cosine | linear",
    "decay_frac": "the last fraction of the run over which the rate decays; before it the rate stays at its "
                  "peak (1: decay over the whole run; 0.4: warmup-stable-decay)",
    "matrix_lr": "Muon's peak learning rate (with --optimizer muon)", "momentum": "Muon's Nesterov momentum",
    "parallel": "under torchrun: ddp (replicate, average gradients) | fsdp (shard parameters, gradients, "
                "optimizer state); auto: ddp when there are several ranks",
    "batch_size": "sequences per micro-batch, per rank under torchrun",
    "init_from": "a Hugging Face Llama folder (python -m gpt.export, or save_pretrained): start from its weights "
                 "and tokenizer; the architecture comes from it (only --dropout and --block-size may change)",
    "log": "also send metrics.jsonl's records to none | tensorboard (OUT_DIR/tensorboard) | wandb, or both: "
           "tensorboard,wandb (rank 0; needs the package: pip install tensorboard / wandb)",
    "wandb_project": "W&B project (with --log wandb)",
    "wandb_run_name": "W&B run name (with --log wandb; unset: the out dir's name). --resume continues the same "
                      "W&B run: its id is kept in OUT_DIR/wandb_run_id",
}
CHOICES = {"preset": list(PRESETS), "optimizer": list(OPTIMIZERS), "schedule": list(SCHEDULES),
           "kernels": list(KERNEL_MODES), "parallel": list(PARALLEL_MODES)}
ALIASES = {"dataset": ["--data"], "gradient_checkpointing": ["--grad-checkpointing"]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(f):
    t = f.type if isinstance(f.type, str) else f.type.__name__
    for py, conv in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(py):
            return conv
    return str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="Train a GPT (see README.md). Settings: "
                                "defaults < the preset's training defaults (train/config.py) < --config < flags.")
    p.add_argument("--config", help="a .toml or .py file setting the same names as these flags")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="--resume from a checkpoint that needs pickle (older formats); this can run code in the file")
    train = p.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        conv = _type_of(f)
        default = f.default if f.default is not MISSING else None
        preset_note = " or the preset's" if any(f.name in d for d in TRAIN_PRESETS.values()) else ""
        help_ = (HELP.get(f.name, "") + f" (default: {default}{preset_note})").strip()
        names = [_flag(f.name), *ALIASES.get(f.name, [])]
        if conv is bool:
            train.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            train.add_argument(*names, type=conv, default=None, help=help_,
                               **({"choices": CHOICES[f.name]} if f.name in CHOICES else {}))
    model = p.add_argument_group("model (override the preset)")
    for f in fields(GPTConfig):
        if f.name not in MODEL_FIELDS:
            continue
        conv = _type_of(f)
        help_ = f"GPTConfig.{f.name} (default: the preset's)"
        if conv is bool:
            model.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                               dest=f"model.{f.name}", help=help_)
        else:
            model.add_argument(_flag(f.name), type=conv, default=None, dest=f"model.{f.name}",
                               metavar=f.name.upper(), help=help_)
    return p


def parse(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    cli: dict = {"model": {}}
    for k, v in vars(args).items():
        if v is None or k in ("config", "print_config", "trust_checkpoint"):
            continue
        if k.startswith("model."):
            cli["model"][k[len("model."):]] = v
        else:
            cli[k] = v
    return resolve_config(cli, args.config), args


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; 0 for one process
    out = print if rank == 0 else (lambda *a, **k: None)
    prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
    trainer = None
    try:
        cfg, args = parse(argv)
        out("config: " + json.dumps(cfg.to_dict(), sort_keys=True), flush=True)
        if args.print_config:
            return 0
        trainer = Trainer(cfg, trust_checkpoint=args.trust_checkpoint)
        out("model config: " + json.dumps(trainer.model_config.to_dict(), sort_keys=True), flush=True)
        result = trainer.train()
        out("result: " + json.dumps(result), flush=True)
        code = 0
    except KeyboardInterrupt:
        code = 130
    except TRAIN_ERRORS as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        code = 2
    except torch.OutOfMemoryError:
        print(f"{prefix}error: out of GPU memory; lower --batch-size (raise --grad-accum to keep tokens per step), "
              f"use --gradient-checkpointing, or a smaller --preset", file=sys.stderr)
        code = 2
    # Any other error propagates without this teardown: a rank that failed inside a collective could hang
    # in it. The process exits instead, and torchrun stops the other ranks.
    if trainer is not None:
        trainer.close()
    return code


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record  # torchrun's summary shows the error
    sys.exit(record(main)())
