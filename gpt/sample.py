"""python -m gpt.sample: generate text from a checkpoint, once or interactively, streaming tokens.

One prompt and one sample: the text is streamed as it is generated. Several (--num-samples N, a
--prompts-file): every prompt x sample is a row, generated --batch-size rows at a time whatever the
prompts' lengths (each row has its own position in the KV cache, gpt/generation/api.py), and each is
printed under a `--- prompt P, sample S ---` line, in order.

The screen shows the model's text (stdout) and the sampler's own messages (stderr, and the interactive
commands' replies on stdout) only, each message on a line of its own (`Screen`). What other libraries
print while the sampler runs, PyTorch's log records and warnings, inductor's compile and autotuning
output, goes to a log file instead, gpt-sample-PID.log in the temp directory (`LibraryLog`; one line
names it, once something is in it).

Interactive mode compiles prefill for one shape, the prompt padded to block_size (`prefill_pad="block"`,
gpt/generation/compiled.py), so the compilation of the first turn covers every context the session can
reach, the re-prefill past block_size included: with the default prompt-length buckets every new bucket
(32, 64, ... tokens) stopped the conversation to compile again. Measured on a 2-core CPU with the
0.86M-parameter recipe model (block_size 256, bf16), four turns of 100 tokens, a cold inductor cache:
before, the first turn took 68 s (prefill 32 s, step 35 s) and the next three 9.7, 14.6 and 5.5 s, nearly
all of it compiling prefill buckets (0.7-1.6 s with a warm cache); now the first turn takes 67 s (prefill
28 s, step 38 s) and every later turn under 0.1 s, the prefill over 256 positions included. The simpler
of the two ways: prefilling only a turn's new tokens at an offset would also keep one shape, but needs a
chunked prefill with its own masking, and still re-prefills the whole window past block_size. What
still compiles again in a session: a change of which sampling steps run (/topk, /topp, /minp turned on
or off, a penalty turned on or off), once per combination; new values (/temp 0.5) do not.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from .cli import UNDERSCORE_NOTE, command_line_main
from .checkpoint import load_model
from .errors import USER_ERRORS, ConfigError, GPTWarning
from .generation import compiled
from .generation.api import DEFAULT_BATCH_SIZE, Completion, generate_completions, held_back
from .generation.sampling import check_sampling_value
from .ops import KERNEL_MODES
from .quantize import quantize_int8, weight_nbytes
from .runtime import dtype_name, resolve_device, resolve_dtype

INTERACTIVE_HELP = """commands:
  /temp X     sampling temperature (0 = greedy)      /topk K   keep the K most likely tokens (0 = off)
  /topp P     nucleus sampling (1 = off)             /minp P   drop tokens below P x the top probability (0 = off)
  /rep X      repetition penalty (1 = off)           /freq X   frequency penalty (0 = off)
  /pres X     presence penalty (0 = off)             /tokens N tokens to generate per turn
  /stop STR   also stop at STR (\\n for a newline); /stop alone clears the stop strings
  /eot on|off stop at the end-of-text token or not   /show     print the current settings
  /reset      forget the conversation so far         /help     this text
  /quit       exit (or Ctrl-D)
Anything else is appended to the session text and the model continues it."""

# Interactive command -> (the setting in args, its type); sampling settings are checked by gpt.generation's rules.
COMMANDS = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float),
            "/minp": ("min_p", float), "/rep": ("repetition_penalty", float), "/freq": ("frequency_penalty", float),
            "/pres": ("presence_penalty", float), "/tokens": ("max_tokens", int)}
SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                  "repetition_penalty": "--repetition-penalty", "frequency_penalty": "--frequency-penalty",
                  "presence_penalty": "--presence-penalty"}

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` in text as a newline, tab, carriage return and backslash; any other
    backslash is kept as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_prompts(path: str) -> list[str]:
    """The prompts of a text file: one per line, blank lines skipped, `\\n` (and `\\t`, `\\\\`) escapes
    for newlines inside a prompt."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts-file {path} does not exist; pass a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"save it as UTF-8") from None
    prompts = [unescape(line) for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts-file {path} holds no prompt; write one prompt per line")
    return prompts


def _same_file(a, b) -> bool:
    """Whether two streams reach one file (a terminal, or one pipe: `2>&1`); True where that cannot be told
    (a StringIO, a test's capture)."""
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):     # io.UnsupportedOperation is an OSError and a ValueError
        return True
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)


class Screen:
    """Where the sampler writes: the model's text to `out` (stdout; `write`, so a Screen is a text stream)
    and its own messages to `err` (stderr) or `out`, every message starting on a line of its own: after
    text that did not end with a newline, a message on the same file starts with one."""

    def __init__(self, out=None, err=None):
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.shared = _same_file(self.out, self.err)
        self.at_line_start = True         # whether the text on `out` ends with a newline (or there is none)

    def write(self, text: str) -> int:
        if text:
            self.out.write(text)
            self.out.flush()
            self.at_line_start = text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def message(self, text: str, to_out: bool = False) -> None:
        """One message, on lines of its own, to stderr (or stdout: the interactive commands' replies)."""
        stream = self.out if to_out else self.err
        (self.err if to_out else self.out).flush()           # what came before it comes out before it
        newline = not self.at_line_start and (to_out or self.shared)
        stream.write(("\n" if newline else "") + text + "\n")
        stream.flush()
        if to_out or self.shared:
            self.at_line_start = True

    def ask(self, prompt: str) -> str:
        """input(prompt): on a terminal the typed line ends with the user's Enter; read from a pipe, the
        prompt is the last thing on the line."""
        self.err.flush()
        try:
            return input(prompt)
        finally:
            try:
                self.at_line_start = sys.stdin.isatty()
            except (AttributeError, OSError, ValueError):      # no stdin, or a closed one
                self.at_line_start = False


def log_path() -> Path:
    """Where the sampler's process puts other libraries' output: `gpt-sample-PID.log` in the temp dir."""
    return Path(tempfile.gettempdir()) / f"gpt-sample-{os.getpid()}.log"


class LibraryLog(io.TextIOBase):
    """A text stream to a log file, opened (and created) on the first write. While `capture()` runs, it is
    sys.stderr, which catches PyTorch's log records (its handlers write to the current sys.stderr), what
    inductor writes there directly, and the Python warnings of other libraries; this project's own
    warnings (`GPTWarning`) are the sampler's messages and go to the screen."""

    def __init__(self, path: Path, screen: Screen):
        self.path, self.screen = Path(path), screen
        self.file = None
        self.announced = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            if self.file is None:
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(text)
            self.file.flush()
        return len(text)

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, GPTWarning):
            self.screen.message(f"warning: {message}")
        else:
            self.write(warnings.formatwarning(message, category, filename, lineno, line))

    @contextlib.contextmanager
    def warnings_routed(self):
        """Python warnings while the block runs: this project's on the screen, other libraries' to the file."""
        with warnings.catch_warnings():
            warnings.showwarning = self._show_warning
            yield

    @contextlib.contextmanager
    def capture(self):
        """sys.stderr is the log file while the block runs (the block must not print messages to
        sys.stderr: they go through the screen, whose stderr is the real one)."""
        with self.warnings_routed(), contextlib.redirect_stderr(self):
            yield

    def announce(self) -> None:
        """Say where the log file is, once, when something has been written to it."""
        if self.file is not None and not self.announced:
            self.announced = True
            self.screen.message(f"(library warnings and compiler logs: {self.path})")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


class Streamer:
    """Turns a growing list of ids into printable text deltas; holds back an unfinished UTF-8 sequence
    and any text that may be the beginning of a stop string (never printed if the stop string follows)."""

    def __init__(self, tokenizer, out=None, stop=()):
        self.tok, self.stop, self.ids, self.printed = tokenizer, tuple(stop), [], ""
        self.out = out if out is not None else sys.stdout

    def _write(self, upto: str) -> str:
        delta = upto[len(self.printed):] if upto.startswith(self.printed) else ""
        if delta:
            self.printed = upto
            self.out.write(delta)
            self.out.flush()
        return delta

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):          # a multi-byte character split across tokens: wait
            return ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        end = min(hits) if hits else len(text) - held_back(text, self.stop)
        return self._write(text[:end])

    def finish(self, text: str) -> str:
        """Print the rest of the final text of the completion (what was held back and belongs to it)."""
        return self._write(text)


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


def sampling_kwargs(args) -> dict:
    """The SamplingConfig fields of the parsed arguments."""
    return {"temperature": args.temperature, "top_k": args.top_k or None, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "frequency_penalty": args.frequency_penalty,
            "presence_penalty": args.presence_penalty}


# --compile auto: compile in interactive mode, or when at least this many tokens are asked for in all.
# Compiling costs 35-60 s on a 2-core CPU with a cold cache (docs/generation.md), a little less than
# eager decoding of ~2,000 tokens of the small preset takes.
COMPILE_MIN_TOKENS = 2000


def use_compile(args, n_prompts: int = 1) -> bool:
    if args.no_cache or args.compile == "never":
        return False
    total = args.max_tokens * args.num_samples * n_prompts
    return args.compile == "always" or args.interactive or total >= COMPILE_MIN_TOKENS


def report_compiles(since: int, screen: Screen | None = None) -> None:
    """One message for the compilations since compile_log[since] (what, and how long)."""
    new = compiled.compile_log[since:]
    if new:
        parts = [f"{e.kind} (batch {e.batch}" + (f", {e.length} tokens" if e.kind == "prefill" else "")
                 + f") in {e.seconds:.1f} s" for e in new]
        (screen or Screen()).message(f"compiled {', '.join(parts)}; reused for the rest of the session "
                                     f"(--no-compile: eager decoding)")


def _generation_kwargs(tokenizer, args, generator) -> dict:
    # Interactive: prefill compiled once for every context length the session reaches (module docstring).
    return dict(tokenizer=tokenizer, stop=args.stop, eot_id=None if args.ignore_eot else tokenizer.eot_id,
                generator=generator, use_cache=not args.no_cache, dtype=args.compute_dtype,
                compile=getattr(args, "use_compile", False), prefill_pad="block" if args.interactive else "bucket",
                **sampling_kwargs(args))


def complete(model, tokenizer, ids: list[int], args, generator, out=None) -> Completion:
    """Stream one continuation of ids to `out` (cut before a stop string); return it."""
    streamer = Streamer(tokenizer, out, args.stop)
    [c] = generate_completions(model, [ids], args.max_tokens, on_token=lambda i, t: streamer.push(t),
                               **_generation_kwargs(tokenizer, args, generator))
    streamer.finish(c.text)
    return c


def sample_all(model, tokenizer, texts: list[str], args, generator, out=None) -> list[Completion]:
    """Every prompt x --num-samples, batched; streamed when there is a single one, else each printed under
    a label as soon as it and the ones before it are done."""
    out = out if out is not None else sys.stdout
    prompts = []
    for n, text in enumerate(texts, 1):
        try:
            prompts.append(encode_prompt(tokenizer, text))
        except ConfigError as e:
            raise ConfigError(f"prompt {n}: {e}" if len(texts) > 1 else str(e)) from None
    if len(prompts) * args.num_samples == 1:
        out.write(texts[0])
        c = complete(model, tokenizer, prompts[0], args, generator, out)
        out.write("\n")
        return [c]
    done: dict[int, Completion] = {}
    shown = [0]

    def show(i: int, c: Completion) -> None:
        done[i] = c
        while shown[0] in done:
            c = done.pop(shown[0])
            out.write(f"--- prompt {c.prompt_index + 1}, sample {c.sample_index + 1} ---\n")
            out.write(texts[c.prompt_index] + c.text + "\n")
            out.flush()
            shown[0] += 1

    return generate_completions(model, prompts, args.max_tokens, num_samples=args.num_samples, on_finish=show,
                                batch_size=args.batch_size, **_generation_kwargs(tokenizer, args, generator))


def show_settings(args, history: list[int]) -> str:
    stops = " ".join(repr(s) for s in args.stop) or "none"
    return (f"temperature={args.temperature} top_k={args.top_k} top_p={args.top_p} min_p={args.min_p} "
            f"repetition_penalty={args.repetition_penalty} frequency_penalty={args.frequency_penalty} "
            f"presence_penalty={args.presence_penalty} stop={stops} eot={'off' if args.ignore_eot else 'on'} "
            f"tokens={args.max_tokens} history={len(history)} tokens")


def interactive(model, tokenizer, args, generator, screen: Screen | None = None,
                log: LibraryLog | None = None) -> None:
    screen = screen or Screen()
    log = log or LibraryLog(log_path(), screen)
    say = functools.partial(screen.message, to_out=True)     # the commands' replies, on stdout
    screen.message("interactive mode: type text and press Enter; /help for commands, Ctrl-D to quit")
    history: list[int] = []
    while True:
        try:
            line = screen.ask("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=screen.err)
            return
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/help":
                say(INTERACTIVE_HELP)
                continue
            if cmd == "/reset":
                history = []
                say("(session cleared)")
                continue
            if cmd == "/show":
                say(show_settings(args, history))
                continue
            if cmd == "/stop":
                # The text after "/stop " as typed (leading spaces included), escapes interpreted.
                text = unescape(line.lstrip()[len("/stop "):]) if line.strip() != "/stop" else ""
                args.stop = [*args.stop, text] if text else []
                say(f"(stop = {' '.join(repr(s) for s in args.stop) or 'none'})")
                continue
            if cmd == "/eot":
                if arg not in ("on", "off"):
                    raise ConfigError(f"/eot: say on or off, got {arg!r}")
                args.ignore_eot = arg == "off"
                say(f"(eot = {arg})")
                continue
            if cmd in COMMANDS:
                name, kind = COMMANDS[cmd]
                try:
                    value = kind(arg)
                except ValueError:
                    raise ConfigError(f"{cmd} needs {'an integer' if kind is int else 'a number'}, "
                                      f"got {arg!r}") from None
                if name == "max_tokens":
                    if value < 0:
                        raise ConfigError(f"{cmd} must be >= 0, got {value}")
                else:
                    check_sampling_value(name, value, cmd)
                setattr(args, name, value)
                say(f"({cmd[1:]} = {value})")
                continue
            if cmd.startswith("/"):
                say(f"unknown command {cmd}; /help lists them")
                continue
        except ValueError as e:
            screen.message(f"error: {e}")
            continue
        text = line + "\n" if line else ""
        try:
            new = encode_prompt(tokenizer, text) if text else ([] if history else encode_prompt(tokenizer, ""))
        except ConfigError as e:
            screen.message(f"error: {e}")
            continue
        history += new
        since = len(compiled.compile_log)
        try:
            with log.capture():
                c = complete(model, tokenizer, history, args, generator, screen)
            history += c.ids
            report_compiles(since, screen)
            log.announce()
            if c.finish_reason == "eot":
                screen.message("(end of text)")
        except KeyboardInterrupt:
            screen.message("(generation stopped)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt.sample", description="Generate text from a checkpoint.",
                                epilog=UNDERSCORE_NOTE)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by python -m train")
    p.add_argument("--prompt", default=None, help="text to continue (default: start from scratch)")
    p.add_argument("--prompts-file", dest="prompts_file", default=None,
                   help="a text file of prompts, one per line (\\n inside a line is a newline; blank lines skipped)")
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens",
                   type=int, default=500, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--min-p", dest="min_p", type=float, default=None,
                   help="keep tokens whose probability is at least this times the top token's (0 = off)")
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.0,
                   help="CTRL-style, over the prompt and the generated tokens: > 1 discourages repeats (1 = off)")
    p.add_argument("--frequency-penalty", dest="frequency_penalty", type=float, default=0.0,
                   help="subtract this x (times the token was generated) from its logit; the prompt does not count")
    p.add_argument("--presence-penalty", dest="presence_penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token generated so far; the prompt does not count")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a sample where this text appears, cut before it (repeatable; \\n for a newline)")
    p.add_argument("--ignore-eot", "--no-eot", dest="ignore_eot", action="store_true",
                   help="keep generating past the tokenizer's end-of-text token (default: a sample ends there)")
    p.add_argument("--seed", type=int, default=None, help="for reproducible samples")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="Triton kernels or PyTorch ops (auto: Triton on CUDA); whatever the model trained with")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also load checkpoints that need pickle (older formats); this can run code in the file")
    p.add_argument("--num-samples", dest="num_samples", type=int, default=1,
                   help="samples per prompt (rows batched together with every other prompt's, up to --batch-size)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="prompt x sample rows decoded together, prompts of any lengths (each row holds a KV cache)")
    p.add_argument("--no-cache", action="store_true", help="recompute the context each step (slow; for checking)")
    p.add_argument("--compile", dest="compile", action="store_const", const="always", default="auto",
                   help="compile prefill and the decode step (gpt/generation/compiled.py): much faster per token "
                        f"after a one-time compilation; default: when generating >= {COMPILE_MIN_TOKENS} tokens in "
                        "all or interactively")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="never",
                   help="decode eagerly (no compilation)")
    p.add_argument("--interactive", action="store_true", help="a prompt loop; /help lists commands")
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8: weight-only int8 linear layers with per-channel scales (half the bytes of bf16; "
                        "gpt/quantize.py)")
    return p


def check_args(args) -> list[str]:
    """One-line ConfigErrors for settings that cannot work, before the checkpoint is read; returns the prompts."""
    if args.max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    for name, flag in SAMPLING_FLAGS.items():
        check_sampling_value(name, getattr(args, name), flag)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    args.stop = [unescape(s) for s in args.stop]
    if any(not s for s in args.stop):
        raise ConfigError("--stop needs a non-empty string; drop the empty one")
    if args.interactive and (args.prompts_file or args.num_samples > 1 or args.prompt is not None):
        raise ConfigError("--interactive continues one text at a time: drop --prompt, --prompts-file and "
                          "--num-samples")
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ConfigError("pass --prompt or --prompts-file, not both")
        return read_prompts(args.prompts_file)
    return [args.prompt or ""]


@command_line_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    screen = Screen()
    log = LibraryLog(log_path(), screen)
    try:
        with log.warnings_routed():
            return _run(args, screen, log)
    except KeyboardInterrupt:
        print(file=screen.err)
        return 130
    except USER_ERRORS as e:
        screen.message(f"error: {e}")
        return 2
    finally:
        log.close()


def _run(args, screen: Screen, log: LibraryLog) -> int:
    texts = check_args(args)
    device = resolve_device(args.device)
    args.compute_dtype = resolve_dtype(args.dtype, device)
    # Decoding reads every weight once per token: store them in the compute dtype (half the bytes in bf16).
    model, tokenizer, _ = load_model(args.ckpt, device, args.compute_dtype, args.kernels, args.trust_checkpoint)
    kernels_used = model.kernels_in_use()   # 'triton' where it cannot run: one clear line, before any work
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    screen.message(f"loaded {args.ckpt}: {model.num_params():,} params, {tokenizer.kind} tokenizer, "
                   f"{device} {dtype_name(args.compute_dtype)}, kernels {args.kernels} -> {kernels_used}")
    if args.quantize == "int8":
        before = weight_nbytes(model)
        quantize_int8(model)
        screen.message(f"quantized the linear layers to int8: weights {before / 1e6:.2f} MB "
                       f"({dtype_name(args.compute_dtype)}) -> {weight_nbytes(model) / 1e6:.2f} MB")
    args.use_compile = use_compile(args, len(texts))
    if args.use_compile:
        screen.message("compiling prefill and the decode step on first use (once per session, up to a minute on a "
                       "small CPU; --no-compile to skip)")
    if args.interactive:
        interactive(model, tokenizer, args, generator, screen, log)
        return 0
    since = len(compiled.compile_log)
    with log.capture():
        sample_all(model, tokenizer, texts, args, generator, screen)
    report_compiles(since, screen)
    log.announce()
    return 0


if __name__ == "__main__":
    sys.exit(main())
