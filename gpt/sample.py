"""python -m gpt.sample: generate text from a checkpoint, once or interactively, streaming tokens."""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import load_model
from .errors import USER_ERRORS, ConfigError
from .generate import generate_stream
from .ops import KERNEL_MODES
from .runtime import dtype_name, resolve_device, resolve_dtype

INTERACTIVE_HELP = """commands:
  /temp X     sampling temperature (0 = greedy)      /topk K   keep the K most likely tokens (0 = off)
  /topp P     nucleus sampling (1 = off)             /tokens N tokens to generate per turn
  /reset      forget the conversation so far         /show     print the current settings
  /help       this text                              /quit     exit (or Ctrl-D)
Anything else is appended to the session text and the model continues it."""


class Streamer:
    """Turns a growing list of ids into printable text deltas; holds back an unfinished UTF-8 sequence."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tok, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):          # a multi-byte character split across tokens: wait
            return ""
        delta, self.printed = text[len(self.printed):], text
        self.out.write(delta)
        self.out.flush()
        return delta


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of text; an empty prompt starts from a newline (char) or end-of-text (BPE)."""
    bad = tokenizer.unknown_chars(text)
    if bad:
        shown = " ".join(repr(c) for c in bad[:10])
        raise ConfigError(f"the prompt has characters the model's tokenizer does not know: {shown}; "
                         f"remove or replace them")
    ids = tokenizer.encode(text) if text else []
    if not ids:
        if tokenizer.eot_id is not None:
            ids = [tokenizer.eot_id]
        else:
            ids = tokenizer.encode("\n") if not tokenizer.unknown_chars("\n") else [0]
    return ids


def complete(model, tokenizer, ids: list[int], args, generator, out=sys.stdout) -> list[int]:
    """Stream a continuation of ids to `out`; return the new ids."""
    device = model.wte.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    streamer = Streamer(tokenizer, out)
    for tok in generate_stream(model, idx, args.max_tokens, temperature=args.temperature,
                               top_k=args.top_k or None, top_p=args.top_p, generator=generator,
                               use_cache=not args.no_cache, dtype=args.compute_dtype):
        streamer.push(int(tok[0, 0]))
    return streamer.ids


def interactive(model, tokenizer, args, generator) -> None:
    print("interactive mode: type text and press Enter; /help for commands, Ctrl-D to quit", file=sys.stderr)
    history: list[int] = []
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/help":
                print(INTERACTIVE_HELP)
                continue
            if cmd == "/reset":
                history = []
                print("(session cleared)")
                continue
            if cmd == "/show":
                print(f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} "
                      f"tokens={args.max_tokens} history={len(history)} tokens")
                continue
            if cmd in ("/temp", "/topk", "/topp", "/tokens"):
                value = float(arg) if cmd in ("/temp", "/topp") else int(arg)
                if (cmd == "/temp" and value < 0) or (cmd == "/topp" and not 0 < value <= 1) or \
                        (cmd in ("/topk", "/tokens") and value < 0):
                    raise ConfigError(f"{cmd}: value {arg} out of range")
                setattr(args, {"/temp": "temperature", "/topk": "top_k", "/topp": "top_p",
                               "/tokens": "max_tokens"}[cmd], value)
                print(f"({cmd[1:]} = {value})")
                continue
            if cmd.startswith("/"):
                print(f"unknown command {cmd}; /help lists them")
                continue
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        text = line + "\n" if line else ""
        try:
            new = encode_prompt(tokenizer, text) if text else ([] if history else encode_prompt(tokenizer, ""))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        history += new
        try:
            history += complete(model, tokenizer, history, args, generator)
        except KeyboardInterrupt:
            print("\n(generation stopped)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt.sample", description="Generate text from a checkpoint.")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by python -m train")
    p.add_argument("--prompt", default="", help="text to continue (default: start from scratch)")
    p.add_argument("--max-tokens", "--max_tokens", "--max-new-tokens", "--max_new_tokens", dest="max_tokens",
                   type=int, default=500, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="for reproducible samples")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="Triton kernels or PyTorch ops (auto: Triton on CUDA); whatever the model trained with")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also load checkpoints that need pickle (older formats); this can run code in the file")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute the context each step (slow; for checking)")
    p.add_argument("--interactive", action="store_true", help="a prompt loop; /help lists commands")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_tokens < 0:
            raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
        if args.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
        device = resolve_device(args.device)
        args.compute_dtype = resolve_dtype(args.dtype, device)
        # Decoding reads every weight once per token: store them in the compute dtype (half the bytes in bf16).
        model, tokenizer, _ = load_model(args.ckpt, device, args.compute_dtype, args.kernels, args.trust_checkpoint)
        kernels_used = model.kernels_in_use()   # 'triton' where it cannot run: one clear line, before any work
        generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
        print(f"loaded {args.ckpt}: {model.num_params():,} params, {tokenizer.kind} tokenizer, "
              f"{device} {dtype_name(args.compute_dtype)}, kernels {args.kernels} -> {kernels_used}",
              file=sys.stderr)
        if args.interactive:
            interactive(model, tokenizer, args, generator)
            return 0
        ids = encode_prompt(tokenizer, args.prompt)
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40)
            sys.stdout.write(args.prompt)
            complete(model, tokenizer, ids, args, generator)
        print()
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
