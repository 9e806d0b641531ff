"""What the server's tests share: tiny models and checkpoints, a server on 127.0.0.1 in a thread of the test
process (`LiveServer`) or as `python -m gpt.serve` in a child process (`ServerProcess`), each stopped by the
test that started it, and a model slowed down to a known time per step."""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from gpt import GPT, GPTConfig
from gpt.tokenizer import CharTokenizer
from tests.gpt.test_sampling import CHARS, successor_gpt

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["CHARS", "ROOT", "SUCCESSOR_TOKENIZER", "TEXT_CHARS", "LiveServer", "ServerProcess", "random_model",
           "save_checkpoint", "slow_down", "successor_gpt", "successor_text"]
SUCCESSOR_TOKENIZER = CharTokenizer(CHARS)
TEXT_CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def successor_text(prompt: str, n: int) -> str:
    """What the successor model (tests/gpt/test_sampling.py) continues `prompt` with: the characters after
    its last one, cyclically."""
    i = CHARS.index(prompt[-1])
    return "".join(CHARS[(i + k) % len(CHARS)] for k in range(1, n + 1))


def random_model(seed: int = 0, block_size: int = 64) -> tuple[GPT, CharTokenizer]:
    """A small random character model whose greedy continuations vary with the prompt and along the text
    (untied head; every matrix scaled up 4x, so the logits are far apart and greedy ties cannot happen)."""
    tok = CharTokenizer(TEXT_CHARS)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                          block_size=block_size, tie_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval(), tok


def save_checkpoint(model: GPT, tokenizer, path: Path) -> str:
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                "tokenizer": tokenizer.to_dict()}, path)
    return str(path)


def slow_down(model: GPT, seconds: float):
    """Every forward of the model takes at least `seconds` longer (a hook on its first block): streamed text
    then arrives over a time a test can watch. Returns the hook's handle (.remove() undoes it)."""
    return model.blocks[0].register_forward_pre_hook(lambda module, args: time.sleep(seconds))


class LiveServer:
    """The application on 127.0.0.1 (a free port) in a thread of this process, with the same pieces
    `python -m gpt.serve` builds; a context manager that stops it."""

    def __init__(self, model, tokenizer, slots: int = 4, max_tokens: int = 256, max_prompt_tokens: int | None = None,
                 max_body_bytes: int = 1 << 20, max_queued: int = 256, name: str = "tiny"):
        import uvicorn

        from gpt.generation.engine import Engine
        from gpt.sample import encode_prompt
        from gpt.serve.app import create_app
        from gpt.serve.protocol import Limits
        from gpt.serve.server import Server, listen
        from gpt.serve.service import Service

        self.engine = Engine(model, tokenizer, slots=slots, dtype=torch.float32, eot_id=tokenizer.eot_id)
        self.service = Service(self.engine, name, max_queued=max_queued)
        limits = Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens or model.config.block_size,
                        vocab_size=tokenizer.vocab_size, model_names=(name,))
        app = create_app(self.service, limits, functools.partial(encode_prompt, tokenizer), tokenizer,
                         max_body_bytes=max_body_bytes)
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = Server(config, self.service, drain_timeout=0)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.torch_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.torch_threads - 1))    # as python -m gpt.serve on a CPU
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        torch.set_num_threads(self.torch_threads)
        assert not self.thread.is_alive(), "the test server did not stop"


class ServerProcess:
    """`python -m gpt.serve ARGS --port 0` in a child process; waits for its "serving ... on URL" line.
    A context manager that ends it (SIGTERM, then SIGKILL after a timeout) if the test did not."""

    def __init__(self, *args: str, timeout: float = 60):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt.serve", "--port", "0", "--device", "cpu",
                                      "--kernels", "torch", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = None
        deadline = time.monotonic() + timeout
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"python -m gpt.serve exited ({self.proc.wait()}): {''.join(self.lines)}")
            self.lines.append(line)
            found = re.search(r" on (http://\S+?)/? \(", line)
            if found:
                self.url = found.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"python -m gpt.serve did not start in {timeout} s: {''.join(self.lines)}")
        self.pid = self.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        """Send sig (None: none, it was sent already), wait for the exit; (exit status, all of stderr)."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the server did not exit within {timeout} s of {sig!r}") from None
        return self.proc.returncode, "".join(self.lines) + err

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
