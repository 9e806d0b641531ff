"""python -m train.prepare: prepare a dataset once (tokenize it into shards and a manifest under --data-dir),
with the same data flags as python -m train, which then finds it instead of preparing it again.

Prints where the data is and a one-line summary on stdout; progress and notes go to stderr. --verify also
re-hashes every shard against the manifest.

Memory: reading the flags and the config takes the package's torch-importing modules (about 0.5 GB of
resident memory), which the preparation does not need. So the command, once its settings are resolved,
replaces itself (exec) with a fresh `python -m train.prepare` that gets the settings in JOB_ENV and imports
only the light modules (train/data/_worker.py light_imports): numpy, pyarrow and the tokenizer libraries.
Its tokenizing processes (multiprocessing's spawn) import this module again as their main module, which
is why nothing heavy is imported at its top.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

# The TrainConfig fields that decide the prepared data (the flags python -m train has for them).
DATA_FIELDS = ("dataset", "hf_dataset", "hf_config", "hf_split", "text_field", "tokenizer", "vocab_size", "data_dir",
               "val_fraction", "tokenizer_sample", "shard_tokens", "workers")
PROG = "python -m train.prepare"
JOB_ENV = "TGPT_PREPARE_JOB"  # the resolved settings, for the process the command execs into


def build_parser() -> argparse.ArgumentParser:
    from dataclasses import MISSING, fields

    from gpt.cli import UNDERSCORE_NOTE

    from .__main__ import ALIASES, DEFAULT_TEXT, HELP, _flag, _type_of
    from .config import TrainConfig

    p = argparse.ArgumentParser(prog=PROG, epilog=UNDERSCORE_NOTE, description=(
        "Prepare a dataset (token shards and manifest.json under --data-dir) once; python -m train with the same "
        "data flags then uses it (see docs/training.md)."))
    p.add_argument("--config", help="a .toml or .py file (as for python -m train); its data settings are used")
    p.add_argument("--verify", action="store_true",
                   help="also re-hash every shard and compare it with the sha256 in manifest.json")
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name in DATA_FIELDS:
        f = by_name[name]
        default = DEFAULT_TEXT.get(name, f.default if f.default is not MISSING else None)
        p.add_argument(_flag(name), *ALIASES.get(name, []), type=_type_of(f), default=None,
                       help=f"{HELP[name]} (default: {default})")
    return p


def summary(data, seconds: float | None = None) -> str:
    """One line: the splits (tokens, shards, documents, text bytes), the tokenizer and the split."""
    from .data.sources import _fmt_count

    parts = []
    for name in ("train", "val"):
        info = data.meta["splits"][name]
        n = len(info["shards"])
        parts.append(f"{name} {_fmt_count(info['tokens'])} tokens in {n} shard{'s' if n != 1 else ''} "
                     f"({info['docs']:,} docs, {info['n_bytes'] / 1e6:,.1f} MB of text)")
    tok = data.tokenizer
    split = data.meta["split"]
    how = "reused (already prepared)" if data.from_cache else f"prepared in {seconds:.1f}s" if seconds else "prepared"
    return (f"{'; '.join(parts)}; {tok.kind} tokenizer ({tok.vocab_size} tokens); split by {split['method']} "
            f"(val_fraction {split['val_fraction']}); {how}")


def run_job(job: dict) -> int:
    """Prepare (job["kwargs"]: prepare_dataset's arguments), print the result, verify if asked: the exit code."""
    import time

    from .errors import TRAIN_ERRORS

    try:
        from .data.tokens import prepare_dataset, verify

        t0 = time.perf_counter()
        data = prepare_dataset(**job["kwargs"])
        seconds = time.perf_counter() - t0
        checked = None
        if job.get("verify"):
            t1 = time.perf_counter()
            n, size = verify(data)
            checked = f"verified: all {n} shards ({size / 1e6:,.1f} MB) match their sha256 ({time.perf_counter() - t1:.1f}s)"
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except TRAIN_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"prepared data: {data.dir}")
    print(summary(data, seconds))
    if checked:
        print(checked)
    return 0


def _main(argv: list[str], handoff: bool = False) -> int:
    from .errors import TRAIN_ERRORS

    args = build_parser().parse_args(argv)
    try:
        from .config import resolve_config
        from .data.tokens import prepare_kwargs

        cfg = resolve_config({k: getattr(args, k) for k in DATA_FIELDS}, args.config)
    except TRAIN_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    job = {"kwargs": prepare_kwargs(cfg), "verify": args.verify}
    if handoff:  # the same command in a fresh process that imports no torch (see the module docstring)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "train.prepare"], {**os.environ, JOB_ENV: json.dumps(job)})
    return run_job(job)


def main(argv: list[str] | None = None, handoff: bool = False) -> int:
    """The command. handoff: exec into a light process once the settings are resolved (python -m
    train.prepare does; a caller in Python gets the work done in its own process)."""
    job = os.environ.pop(JOB_ENV, None)
    if job is not None:
        from .data._worker import light_imports

        light_imports()
        from gpt.cli import command_line_main

        return command_line_main(lambda _: run_job(json.loads(job)))([])
    from gpt.cli import command_line_main

    return command_line_main(functools.partial(_main, handoff=handoff))(argv)


if __name__ == "__main__":
    sys.exit(main(handoff=True))
