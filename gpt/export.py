"""python -m gpt.export --ckpt out/ckpt.pt --out DIR: a checkpoint as a Hugging Face Llama folder.

The folder (see gpt/hf.py) loads with `transformers.LlamaForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, and comes back here with `gpt.load_hf(DIR)` or
`python -m train --init-from DIR`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import load_model
from .cli import UNDERSCORE_NOTE, command_line_main
from .errors import USER_ERRORS
from .hf import export_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt.export", description=__doc__.splitlines()[0],
                                epilog=UNDERSCORE_NOTE)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="the checkpoint to export (default: out/ckpt.pt)")
    p.add_argument("--out", required=True, help="the folder to write (created; files in it are replaced)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights' dtype in model.safetensors (float32: exactly the trained weights)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a checkpoint that needs pickle (older formats); this can run code in the file")
    return p


@command_line_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer, _ = load_model(args.ckpt, kernels="torch", trust=args.trust_checkpoint)
        out = export_hf(model, tokenizer, args.out, DTYPES[args.dtype])
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    c = model.config
    print(f"wrote {out}: Llama, {model.num_params():,} params ({c.n_layer} layers, {c.n_head}/{c.n_kv_head} "
          f"heads, d_model {c.n_embd}, tied head: {c.tie_weights}), {args.dtype}, {tokenizer.kind} tokenizer "
          f"({tokenizer.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
