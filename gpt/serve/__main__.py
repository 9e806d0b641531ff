"""python -m gpt.serve: serve a checkpoint (or a Hugging Face folder) over HTTP with the OpenAI completions
API, and a web page at /.

    python -m gpt.serve --ckpt out/ckpt.pt                 # http://127.0.0.1:8000/
    python -m gpt.serve --ckpt hf_out --slots 8 --port 8080

The model is loaded as the sampler loads it (the same --dtype, --kernels, --quantize and --compile), and
one engine (gpt/generation/engine.py) decodes every request in flight together, `--slots` at a time; the
others wait their turn. The options that bound what one request may ask for (--max-tokens,
--max-prompt-tokens, --max-body-bytes) answer a request over them with a 400 or 413 naming the field.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..cli import UNDERSCORE_NOTE, command_line_main
from ..errors import USER_ERRORS, ConfigError
from ..generation import prefill_bucket
from ..generation.engine import Engine, RequestParams
from ..hf import load_hf
from ..ops import KERNEL_MODES
from ..optional import import_optional
from ..quantize import quantize_int8, weight_nbytes
from ..runtime import dtype_name, resolve_device, resolve_dtype
from ..sample import encode_prompt

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt.serve", description="Serve a checkpoint over HTTP: the OpenAI "
                                "completions API (POST /v1/completions, GET /v1/models), GET /health and a web "
                                "page at /.", epilog=UNDERSCORE_NOTE)
    p.add_argument("--ckpt", default="out/ckpt.pt",
                   help="checkpoint written by python -m train, or a Hugging Face model folder (python -m gpt.export)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                        "server, which has no authentication, to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--slots", type=int, default=4, metavar="N",
                   help="requests decoded together, one token each per engine step (default 4); more wait their turn")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=1024, metavar="N",
                   help="the most tokens one choice may ask for (default 1024; a request's max_tokens above it is "
                        "a 400)")
    p.add_argument("--max-prompt-tokens", dest="max_prompt_tokens", type=int, default=None, metavar="N",
                   help="the longest prompt in tokens (a longer one is a 400; default: the model's block_size)")
    p.add_argument("--max-queued", dest="max_queued", type=int, default=256, metavar="N",
                   help="choices that may wait for a slot (default 256); a request past that is refused with 503 "
                        "(overloaded)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=1 << 20, metavar="N",
                   help="the largest request body accepted (default 1048576, 1 MiB; a larger one is a 413)")
    p.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, how long the requests in flight get to finish before they are "
                        "cancelled (default 10; 0: cancel at once)")
    p.add_argument("--served-model-name", dest="served_model_name", default=None, metavar="NAME",
                   help="the model's name in the API (GET /v1/models, the `model` field; default: --ckpt as given)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--kernels", default="auto", choices=KERNEL_MODES,
                   help="Triton kernels or PyTorch ops (auto: Triton on CUDA); whatever the model trained with")
    p.add_argument("--quantize", default="none", choices=("none", "int8"),
                   help="int8: weight-only int8 linear layers with per-channel scales (gpt/quantize.py)")
    p.add_argument("--compile", dest="compile", action="store_true", default=False,
                   help="compile the engine's decode step and prefill (faster per token; compiled at start, up to a "
                        "minute or two on a small CPU, while requests wait)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="decode eagerly (the default: the server answers at once)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads for decoding (default on a CPU: one per core but one, at least 1, "
                        "which leaves a core to the HTTP side; on a GPU: torch's choice)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="also load checkpoints that need pickle (older formats); this can run code in the file")
    p.add_argument("--access-log", action="store_true", help="print one line per HTTP request on stderr")
    return p


def check_args(args) -> None:
    for name, low in (("slots", 1), ("max_tokens", 1), ("max_queued", 0), ("max_body_bytes", 1024)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens must be at least 1, got {args.max_prompt_tokens}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.drain_timeout < 0:
        raise ConfigError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")


def load(args):
    """(model, tokenizer, compute dtype, a one-line description) as --ckpt and the runtime flags say."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if Path(args.ckpt).is_dir():      # a Hugging Face folder
        model, tokenizer = load_hf(args.ckpt, device, args.kernels)
        if dtype != torch.float32:
            model.cast_weights_(dtype)
    else:
        model, tokenizer, _ = load_model(args.ckpt, device, dtype, args.kernels, args.trust_checkpoint)
    kernels_used = model.kernels_in_use()      # 'triton' where it cannot run: one clear line, before any work
    line = (f"loaded {args.ckpt}: {model.num_params():,} params, {tokenizer.kind} tokenizer, {device} "
            f"{dtype_name(dtype)}, kernels {args.kernels} -> {kernels_used}")
    if args.quantize == "int8":
        before = weight_nbytes(model)
        quantize_int8(model)
        line += f", int8 weights ({before / 1e6:.2f} -> {weight_nbytes(model) / 1e6:.2f} MB)"
    return model, tokenizer, dtype, line


# The sampling steps the warm-up switches on: those of OpenAI's fields (temperature, top_p, the two penalties).
# The compiled step is specialized on the steps any request so far used and compiles again when a request
# switches on a new one (top_k, min_p, repetition_penalty: once each; gpt/generation/engine.py).
WARM_SAMPLING = dict(temperature=1.0, top_p=0.9, frequency_penalty=0.1, presence_penalty=0.1)


def warm_up(engine: Engine, start_ids: list[int], max_prompt_tokens: int, block_size: int) -> None:
    """Run the engine until what requests will need is compiled: the decode step with WARM_SAMPLING's steps,
    and prefill at every prompt-length bucket up to max_prompt_tokens and the re-prefill past block_size
    (a first request of a new bucket would otherwise stop every slot while it compiles)."""
    top = prefill_bucket(max(min(max_prompt_tokens, block_size), block_size // 2), block_size)
    lengths = [prefill_bucket(1, block_size)]
    while lengths[-1] < top:
        lengths.append(prefill_bucket(lengths[-1] + 1, block_size))
    params = RequestParams(max_tokens=2, **WARM_SAMPLING)
    requests = [engine.submit((start_ids * n)[:n], params) for n in lengths]
    while any(r.finish_reason is None for r in requests):
        engine.step()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@command_line_main
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except KeyboardInterrupt:       # while loading or compiling, before the server handles signals
        say("")
        return 130
    except USER_ERRORS as e:
        say(f"error: {e}")
        return 2


def serve(args) -> int:
    check_args(args)
    for module in ("starlette", "uvicorn"):
        import_optional(module, "python -m gpt.serve", pip_name=module,
                        instead="or install both with pip install -e '.[serve]'")
    from .server import listen
    try:        # before the model loads: a port in use is said at once
        sock = listen(args.host, args.port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port "
                          f"(or 0 for any free one) or stop what uses it") from None
    with sock:
        return _serve(args, sock)


def _serve(args, sock) -> int:
    import uvicorn

    from .app import create_app
    from .protocol import Limits
    from .server import Server
    from .service import Service

    model, tokenizer, dtype, line = load(args)
    threads = args.threads or (max(1, torch.get_num_threads() - 1) if model.wte.weight.device.type == "cpu" else None)
    if threads is not None:
        # torch's threads spin-wait for each other while the event loop and the clients need a core: on 2 cores
        # shared with other work, the web page's tiny model ran at 244 tokens/s on 1 thread, 68 on 2.
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    say(line + f", {n} thread{'s' if n != 1 else ''}")
    engine = Engine(model, tokenizer, slots=args.slots, dtype=dtype, compile=args.compile, eot_id=tokenizer.eot_id)
    encode = functools.partial(encode_prompt, tokenizer)
    max_prompt = args.max_prompt_tokens or model.config.block_size
    if args.compile:
        t0 = time.perf_counter()
        say(f"compiling the engine for {args.slots} slots; requests wait until it is done (once; --no-compile to "
            f"skip)")
        warm_up(engine, encode(""), max_prompt, model.config.block_size)
        say(f"compiled in {time.perf_counter() - t0:.0f} s")
    name = args.served_model_name or args.ckpt
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=max_prompt, vocab_size=tokenizer.vocab_size,
                    model_names=(name,))
    service = Service(engine, name, max_queued=args.max_queued)
    app = create_app(service, limits, encode, tokenizer, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, log_level="info" if args.access_log else "warning", access_log=args.access_log,
                            timeout_graceful_shutdown=args.drain_timeout + 5, lifespan="on")

    def announce(address) -> None:
        host, port = address[0], address[1]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        say(f"serving {name!r} on {url} ({args.slots} slots; POST {url}v1/completions; Ctrl-C to stop)")
        if args.host not in LOOPBACK:
            say(f"warning: listening on {args.host}: anyone who can reach this machine can use the model "
                f"(there is no authentication)")

    Server(config, service, args.drain_timeout, announce).run(sockets=[sock])
    say(f"stopped (requests served: {service.served})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
