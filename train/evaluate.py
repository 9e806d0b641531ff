"""python -m train.evaluate: a checkpoint's loss on a whole split, every token scored once.

The loop's periodic eval samples eval_iters random windows (cheap, a little noisy); this reads the
split in consecutive windows of block_size (the last one shorter), so the figure is exact for the
split and comparable between runs. Prints the mean loss in nats and in bits per token (bits per
character with the char tokenizer), and in bits per UTF-8 byte of the split's text, which does not
depend on the tokenizer: runs with different tokenizers on one corpus compare by it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from gpt.checkpoint import load_model
from gpt.cli import UNDERSCORE_NOTE, command_line_main
from gpt.errors import CheckpointError, ConfigError
from gpt.ops import FUSED_LOSS_MODES, KERNEL_MODES
from gpt.quantize import quantize_int8
from gpt.runtime import autocast, dtype_name, resolve_device, resolve_dtype

from .config import TrainConfig
from .data import DataError
from .errors import TRAIN_ERRORS
from .loop import open_data, progress_bar


class _Stream:
    """A split's shards read as one token stream: windows may run from one shard into the next, so
    every token but the split's first is predicted once, from the tokens before it."""

    def __init__(self, tokens):
        arrays = [s.tokens for s in tokens.shards] if hasattr(tokens, "shards") else [np.asarray(tokens)]
        self.arrays = [a for a in arrays if len(a)]
        self.ends = np.cumsum([len(a) for a in self.arrays])
        self.n = int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, length: int) -> np.ndarray:
        out, pos, stop = [], start, start + length
        while pos < stop:
            i = int(np.searchsorted(self.ends, pos, side="right"))
            base = int(self.ends[i - 1]) if i else 0
            take = min(stop, int(self.ends[i])) - pos
            out.append(self.arrays[i][pos - base:pos - base + take])
            pos += take
        return out[0] if len(out) == 1 else np.concatenate(out)

    def batch(self, starts: list[int], T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.stack([self.window(s, T + 1) for s in starts]).astype(np.int64)
        x, y = torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
        return x.to(device), y.to(device)


@torch.no_grad()
def split_loss(model, tokens, batch_size: int, device: torch.device, dtype: torch.dtype,
               progress: bool = False) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of tokens scored) of model over a split: every token after
    the first, each predicted from the preceding ones in its window of block_size. `tokens` is a
    TokenSplit (train/data/shards.py; read across its shards as one stream) or a 1-D array."""
    T = model.config.block_size
    stream = _Stream(tokens)
    n_pred = stream.n - 1
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
        x, y = stream.batch(group, L, device)
        with autocast(device, dtype):
            _, loss_sum = model(x, y, reduction="sum")  # the fused head where the model uses it
        total += loss_sum.item()
        if bar is not None:
            bar.update(len(group) * L)
    if bar is not None:
        bar.close()
    return total / n_pred, n_pred


def bits_per_byte(loss: float, n_scored: int, n_bytes: int) -> float | None:
    """The split's total loss in bits over its UTF-8 bytes (None when the byte count is unknown): a
    figure that does not depend on the tokenizer, so char, bpe and gpt2 runs on one corpus compare."""
    if not n_bytes:
        return None
    return loss * n_scored / math.log(2) / n_bytes


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
    p.add_argument("--fused-loss", default="auto", choices=FUSED_LOSS_MODES,
                   help="score with the fused head and loss, which never holds the logits (auto: for large "
                        "vocabularies; the same losses within float rounding)")
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
        model.use_fused_loss(args.fused_loss)
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
        split = data.split(args.split)
        loss, n = split_loss(model, split, args.batch_size, device, dtype, progress=True)
        bpb = bits_per_byte(loss, n, getattr(split, "n_bytes", 0))
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
                          f"bits_per_{unit}": bits, "bits_per_byte": bpb, "iter": ck.get("iter"),
                          "dtype": dtype_name(dtype), "quantize": args.quantize}))
    else:
        per_byte = f", {bpb:.4f} bits/byte" if bpb is not None else ""
        print(f"{args.ckpt} (iter {ck.get('iter')}): {args.split} loss {loss:.4f} nats/{unit} "
              f"({bits:.4f} bits/{unit}{per_byte}) over all {n:,} {unit}s of the split, {dtype_name(dtype)}"
              + (", int8 weights" if args.quantize == "int8" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
