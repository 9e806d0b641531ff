"""Checkpoint files: the format, loading them safely, and a model with its tokenizer ready to run.

A checkpoint is one file written by `torch.save` of a dict:
    format_version  int (FORMAT_VERSION)
    model           the state dict
    model_config    GPTConfig fields (architecture only: no kernel choice, nothing about the device)
    tokenizer       the tokenizer's to_dict(), enough to rebuild it
and, when written by `python -m train`: train_config, optimizer, scaler, iter, run_state, rng, data_rng
(train/checkpoint.py). Everything in it is tensors and plain Python values (dicts, lists, tuples, str,
numbers, None), so it loads with `torch.load(weights_only=True)`: opening a file someone sent you runs
no code. A file that needs pickle (format 1, or one written elsewhere) loads only with `trust=True`
(`--trust-checkpoint` on the command line), after a warning.
"""
from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path

import torch

from .config import GPTConfig
from .errors import CheckpointError, ConfigError, option, under_command_line
from .model import GPT
from .tokenizer import Tokenizer, tokenizer_from_dict

FORMAT_VERSION = 2
REQUIRED_KEYS = ("model", "model_config", "tokenizer")
# Fields that format-1 checkpoints saved in model_config and that are run-time choices now.
RUNTIME_FIELDS = ("kernels", "gradient_checkpointing")
# Where `python -m train --parallel fsdp` keeps its sharded checkpoints, inside the run's directory.
SHARDED_DIR = "ckpt_sharded"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def read_checkpoint(path: str | Path, map_location="cpu", trust: bool = False, mmap: bool = False) -> dict:
    """The checkpoint dict at `path`, sanity-checked; any problem is a CheckpointError naming the file and
    the fix. trust=True also reads files that need pickle (only for files you trust: pickle runs code).
    mmap=True maps the tensors instead of reading them (cheap when only the plain values are wanted)."""
    path = Path(path)
    if not path.exists():
        other = "pass --ckpt PATH" if under_command_line() else "give the path of an existing one"
        hint = f" (train one with `python -m train`, or {other})" if path.suffix == ".pt" else ""
        if (path.parent / SHARDED_DIR).is_dir():
            hint = (f": that run saved sharded (FSDP) checkpoints in {path.parent / SHARDED_DIR}; write the "
                    f"single file with `python -m train.consolidate {path.parent}`")
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file, e.g. {path / 'ckpt.pt'}")
    if not trust and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint (not the zip archive torch.save "
                              f"writes); use another file or retrain")
    if trust:
        print(f"warning: loading {path} with pickle ({option('trust', True, flag='--trust-checkpoint')}): this can run code stored in the "
              f"file; only do it for files you trust", file=sys.stderr)
    try:
        state = torch.load(path, map_location=map_location, weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"checkpoint {path} is corrupt ({_first_line(e)}); use another file or "
                                  f"retrain") from None
        # weights_only refuses any object outside tensors and plain values, before building it.
        raise CheckpointError(f"checkpoint {path} holds objects that only pickle can load (an older tritongpt "
                              f"format, or a file from elsewhere), and loading those can run code: refused. If "
                              f"you trust the file, pass {option('trust', True, flag='--trust-checkpoint')}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({_first_line(e)}); "
                              f"use another file or retrain") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a tritongpt checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    return state


def model_config_of(ck: dict, path: str | Path = "the checkpoint") -> GPTConfig:
    """The GPTConfig a checkpoint was trained with. Fields that older checkpoints saved but that are
    run-time choices now (RUNTIME_FIELDS) are dropped, with a one-line notice."""
    fields = dict(ck["model_config"])
    dropped = {k: fields.pop(k) for k in RUNTIME_FIELDS if k in fields}
    if dropped:
        shown = ", ".join(f"{k}={v!r}" for k, v in dropped.items())
        print(f"note: {path} stores {shown} from an older format; these are run-time options now "
              f"(--kernels, --gradient-checkpointing), ignored here", file=sys.stderr)
    try:
        return GPTConfig.from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has a model config this version cannot build ({e})") from None


def tokenizer_of(ck: dict, path: str | Path = "the checkpoint") -> Tokenizer:
    try:
        return tokenizer_from_dict(ck["tokenizer"])
    except ConfigError:  # e.g. an optional package the tokenizer needs is missing: that message says what to do
        raise
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} has a tokenizer this version cannot rebuild ({e})") from None


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               kernels: str = "auto", trust: bool = False) -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode on `device`, its tokenizer, the checkpoint dict) for inference.

    dtype: store the weights in this dtype (bf16 halves the bytes read per decoded token); None keeps
    them in float32, for autocast. kernels: "auto" | "triton" | "torch", whatever the model trained with.
    """
    ck = read_checkpoint(path, trust=trust)
    model = GPT(model_config_of(ck, path), kernels=kernels)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:  # missing/unexpected keys or shapes: the file does not match its own config
        raise CheckpointError(f"checkpoint {path}: the weights do not fit its model config ({_first_line(e)})") \
            from None
    model.to(device).eval()
    if dtype is not None and dtype != torch.float32:
        model.cast_weights_(dtype)
    return model, tokenizer_of(ck, path), ck
