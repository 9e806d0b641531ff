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

from gpt.cli import UNDERSCORE_NOTE, command_line_main
from gpt.config import PRESETS, GPTConfig
from gpt.ops import FUSED_LOSS_MODES, KERNEL_MODES

from .config import BATCHING_MODES, MODEL_FIELDS, OPTIMIZERS, PARALLEL_MODES, SCHEDULES, TRAIN_PRESETS, TrainConfig, resolve_config
from .errors import TRAIN_ERRORS
from .loop import Trainer

HELP = {
    # model and data
    "preset": f"model size: {', '.join(PRESETS)}",
    "dataset": "'shakespeare' (offline) or a UTF-8 text file, a directory of .txt files, or a glob",
    "tokenizer": "char | bpe (trained on the corpus) | gpt2 (the GPT-2 BPE, offline)",
    "vocab_size": "vocabulary size of a trained bpe tokenizer",
    "data_dir": "where tokenized datasets are cached (built on first use, then reused)",
    "hf_dataset": "a Hugging Face dataset instead of --dataset: a name in the local HF cache, or a local "
                  ".txt/.jsonl/.json/.csv/.parquet file",
    "hf_config": "the dataset's configuration name (with --hf-dataset)",
    "hf_split": "the split to train on (with --hf-dataset); the val split is cut from it",
    "text_field": "the column holding the text (with --hf-dataset, or a .jsonl/.parquet/.csv --dataset)",
    "val_fraction": "the share held out for validation: the end of the text for a corpus of fewer "
                    "than 100 documents, else a deterministic sample of whole documents",
    "tokenizer_sample": "MB of text (a deterministic sample of whole documents) a bpe tokenizer is trained on",
    "shard_tokens": "about this many tokens per prepared shard file",
    "workers": "processes that tokenize when the data is prepared",
    "batching": "windows (random windows of the token stream) | documents (every row starts at a document, "
                "rows filled best-fit) | auto (documents when the data was split by document)",
    # optimisation
    "optimizer": "adamw | muon (Muon for the blocks' matrices at --matrix-lr, AdamW at --lr for the rest)",
    "batch_size": "sequences per micro-batch, per rank under torchrun",
    "grad_accum": "micro-batches per optimizer step (tokens/step = batch x block size x this x ranks)",
    "max_iters": "optimizer steps; the schedule's length unless --time-budget ends the run sooner",
    "lr": "peak learning rate (AdamW; with muon: the embedding, head and norms)",
    "matrix_lr": "Muon's peak learning rate (with --optimizer muon)",
    "momentum": "Muon's Nesterov momentum",
    "min_lr": "the rate the decay ends at; after the warmup the rate never goes below it",
    "schedule": "the decay from --lr to --min-lr after warmup: cosine | linear",
    "decay_frac": "the last fraction of the run over which the rate decays; before it the rate stays at its "
                  "peak (1: decay over the whole run; 0.4: warmup-stable-decay)",
    "warmup_iters": "linear warmup steps (at most half of --max-iters: shorter runs warm up over half)",
    "weight_decay": "decoupled weight decay, on 2-D weights only",
    "beta1": "AdamW's first-moment decay", "beta2": "AdamW's second-moment decay",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    # runtime
    "device": "auto | cpu | cuda | cuda:N | mps", "dtype": "auto | float32 | bfloat16 | float16",
    "kernels": "Triton kernels or PyTorch ops (auto: Triton on CUDA)", "compile": "torch.compile the model",
    "fused_loss": "the output head and the loss as one op that never holds the logits (less memory): on | off | "
                  "auto (on for a vocabulary of 16384+ tokens and 8+ times the width, e.g. --tokenizer gpt2)",
    "z_loss": "add this times the mean squared log-sum-exp of the logits to the training loss (PaLM's z-loss, "
              "e.g. 1e-4; the logged train loss includes it, evals do not; 0: off)",
    "parallel": "under torchrun: ddp (replicate, average gradients) | fsdp (shard parameters, gradients, "
                "optimizer state); auto: ddp when there are several ranks",
    "gradient_checkpointing": "recompute each block in the backward (less memory, ~30%% more compute)",
    "seed": "seeds the initial weights, dropout and the batches",
    "time_budget": "minutes of wall clock (evals included); ends cleanly and fits the LR schedule to it",
    # evaluation, logging, checkpoints
    "eval_interval": "steps between evals (each one saves the checkpoint)",
    "eval_iters": "batches per split per eval",
    "log_interval": "steps between log lines (and metrics.jsonl records)",
    "out_dir": "where ckpt.pt, ckpt_best.pt, metrics.jsonl and loss.png go",
    "resume": "continue exactly from the newest checkpoint in OUT_DIR (ckpt.pt or ckpt_sharded/)",
    "init_from": "a Hugging Face Llama folder (python -m gpt.export, or save_pretrained): start from its weights "
                 "and tokenizer; the architecture comes from it (only --dropout and --block-size may change)",
    "progress": "a progress bar on stderr (shown on a terminal only)",
    "log": "also send metrics.jsonl's records to none | tensorboard (OUT_DIR/tensorboard) | wandb, or both: "
           "tensorboard,wandb (rank 0; needs the package: pip install tensorboard / wandb)",
    "wandb_project": "W&B project (with --log wandb)",
    "wandb_run_name": "W&B run name (with --log wandb). --resume continues the same W&B run: its id is kept in "
                      "OUT_DIR/wandb_run_id",
}
MODEL_HELP = {
    "block_size": "context length in tokens", "n_layer": "transformer blocks", "n_head": "query heads",
    "n_kv_head": "key/value heads (= --n-head: MHA, 1: MQA, between: GQA)", "n_embd": "residual stream width",
    "mlp": "swiglu | gelu", "mlp_ratio": "MLP hidden width over n_embd (swiglu takes 2/3 of it: same params)",
    "mlp_hidden": "explicit MLP hidden width (overrides --mlp-ratio)", "norm_eps": "the norms' epsilon",
    "norm": "rms | layer",
    "bias": "biases in the linear layers and norms", "dropout": "on embeddings and residual branches",
    "tie_weights": "the output head shares the token embedding", "rope_theta": "RoPE base",
    "init_std": "std of the initial weights (residual projections scaled by 1/sqrt(2 n_layer))",
}
# How a default of None reads in --help.
DEFAULT_TEXT = {"vocab_size": "8192", "time_budget": "none", "hf_dataset": "none", "hf_config": "none",
                "init_from": "none", "wandb_run_name": "the out dir's name",
                "val_fraction": "0.1", "workers": "the cores"}
CHOICES = {"preset": list(PRESETS), "optimizer": list(OPTIMIZERS), "schedule": list(SCHEDULES),
           "kernels": list(KERNEL_MODES), "fused_loss": list(FUSED_LOSS_MODES), "parallel": list(PARALLEL_MODES), "batching": list(BATCHING_MODES)}
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
    p = argparse.ArgumentParser(prog="python -m train", description="Train a GPT (see docs/training.md). Settings: "
                                "defaults < the preset's training defaults (train/config.py) < --config < flags.",
                                epilog=UNDERSCORE_NOTE)
    p.add_argument("--config", help="a .toml or .py file setting the same names as these flags")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="--resume from a checkpoint that needs pickle (older formats); this can run code in the file")
    train = p.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        conv = _type_of(f)
        default = DEFAULT_TEXT.get(f.name, f.default if f.default is not MISSING else None)
        preset_note = " or the preset's" if any(f.name in d for d in TRAIN_PRESETS.values()) else ""
        help_ = f"{HELP[f.name]} (default: {default}{preset_note})"
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
        help_ = f"{MODEL_HELP[f.name]} (default: the preset's)"
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


@command_line_main
def main(argv: list[str]) -> int:
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
