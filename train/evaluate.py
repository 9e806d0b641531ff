"""python -m train.evaluate: a checkpoint's loss on a whole split, every token scored once.

The loop's periodic eval samples eval_iters random windows (cheap, a little noisy); this reads the
split in consecutive windows of block_size (the last one shorter), so the figure is exact for the
split and comparable between runs. Prints the mean loss in nats and in bits per token (bits per
character with the char tokenizer).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from gpt.checkpoint import load_model
from gpt.cli import UNDERSCORE_NOTE, command_line_main
from gpt.errors import CheckpointError, ConfigError
from gpt.ops import KERNEL_MODES
from gpt.quantize import quantize_int8
from gpt.runtime import autocast, dtype_name, resolve_device, resolve_dtype

from .config import TrainConfig
from .data import DataError, windows_at
from .errors import TRAIN_ERRORS
from .loop import open_data, progress_bar


@torch.no_grad()
def split_loss(model, tokens: np.ndarray, batch_size: int, device: torch.device, dtype: torch.dtype,
               progress: bool = False) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of tokens scored) of model over tokens[1:], each token
    predicted from the preceding ones in its window of block_size."""
    T = model.config.block_size
    n_pred = len(tokens) - 1
    if n_pred < 1:
        raise DataError("the split has fewer than 2 tokens: nothing to evaluate")
    starts = list(range(0, n_pred - T + 1, T))            # full windows
    batches = [(starts[i:i + batch_size], T) for i in range(0, len(starts), batch_size)]
    if n_pred % T:                                          # and the shorter one that ends the split
        batches.append(([len(starts) * T], n_pred % T))
    bar = None
    if progress and sys.stderr.isatty():  # None without tqdm: no bar
        bar = progress_bar(total=n_pred, unit="tok", unit_scale=True, leave=False)
    total = 0.0
    for group, L in batches:
        x, y = windows_at(tokens, group, L, device)
        with autocast(device, dtype):
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        if bar is not None:
            bar.update(len(group) * L)
    if bar is not None:
        bar.close()
    return total / n_pred, n_pred


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", epilog=UNDERSCORE_NOTE,
                                description="Loss of a checkpoint on a whole split of its dataset.")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by python -m train")
    p.add_argument("--split", default="val", choices=("train", "val"), help="the split to score (default: val)")
    p.add_argument("--data-dir", default=None, help="where the tokenized data is cached (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="Triton kernels or PyTorch ops (auto: Triton on CUDA); whatever the model trained with")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also load checkpoints that need pickle (older formats); this can run code in the file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8: score the model with weight-only int8 linear layers (gpt/quantize.py), as "
                        "python -m gpt.sample --quantize int8 runs it")
    return p


@command_line_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer, ck = load_model(args.ckpt, device, kernels=args.kernels, trust=args.trust_checkpoint)
        model.kernels_in_use()  # 'triton' where it cannot run: one clear line, before the data is opened
        if args.quantize == "int8":
            quantize_int8(model.eval())
        if "train_config" not in ck:
            raise CheckpointError(f"checkpoint {args.ckpt} does not say which data it was trained on "
                                  f"(no train_config); evaluate a checkpoint written by python -m train")
        try:
            cfg = TrainConfig(**ck["train_config"])
        except TypeError as e:  # a setting this version does not know
            raise CheckpointError(f"checkpoint {args.ckpt} has a train_config this version cannot read ({e})") from None
        if args.data_dir:
            cfg.data_dir = args.data_dir
        data = open_data(cfg)
        if data.tokenizer.to_dict() != ck["tokenizer"]:
            raise CheckpointError(f"the data at {cfg.data_dir} is tokenized differently from "
                                  f"checkpoint {args.ckpt}; pass the run's --data-dir")
        loss, n = split_loss(model, data.split(args.split), args.batch_size, device, dtype, progress=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except TRAIN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unit = "char" if tokenizer.kind == "char" else "token"
    bits = loss / float(np.log(2))
    if args.json:
        print(json.dumps({"ckpt": args.ckpt, "split": args.split, "tokens": n, "loss": loss,
                          f"bits_per_{unit}": bits, "iter": ck.get("iter"), "dtype": dtype_name(dtype),
                          "quantize": args.quantize}))
    else:
        print(f"{args.ckpt} (iter {ck.get('iter')}): {args.split} loss {loss:.4f} nats/{unit} "
              f"({bits:.4f} bits/{unit}) over all {n:,} {unit}s of the split, {dtype_name(dtype)}"
              + (", int8 weights" if args.quantize == "int8" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
