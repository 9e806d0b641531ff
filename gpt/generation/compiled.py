"""Compiled decoding: prefill and the one-token step as compiled functions on static shapes.

Why. Batch-1 decoding reads every weight once per token, so its floor is (weight bytes + KV-cache bytes
read) / memory bandwidth. Run eagerly, a small model is nowhere near it: each of the dozen ops per layer
is a Python call and a dispatch, and that overhead, not memory, sets the speed. Compiled, the whole step
(every layer, the cache write, the last position's logits and the sampling) is one function: inductor's
generated C++ on the CPU (the row-wise ops fused around the matmuls), one CUDA-graph replay on a GPU
(`mode="reduce-overhead"`, with the Triton split-KV decode kernel inside).

What is static. `torch.compile(fullgraph=True, dynamic=False)` needs shapes that do not change between
tokens, so:
- the KV cache, each row's length and the penalty state live in a `DecodeState`
  (gpt/generation/cache.py): a fixed number of rows (slots), the cache block_size long (plus a scratch
  position), `pos` a (slots,) device tensor the step advances itself, and the step attends over the
  whole cache with each row's keys past its own `pos` masked (`ops.decode_attention`, kv_len per row);
- sampling: which steps run (`SamplingPlan`) is fixed, their values are a tensor, and the Exp(1) noise
  of the draw is made before the step with the caller's generator (gpt/generation/sampling.py `race`),
  so a new temperature does not recompile and the step never waits for the host;
- the batch: a row that does not decode in a step (finished, free in the engine, or re-prefilled in this
  step) is held by the step's `active` mask (its placeholder token written to the scratch position, no
  keys attended, its length unchanged) instead of leaving the batch, which would change the shape.

Prefill is a second compiled function, on the prompts right-padded to one length (a fresh buffer each time,
so its strides never differ: a view would make it compile again), into every slot or into chosen ones;
causal attention keeps the padding out of every real position, so rows of different lengths need no mask,
and each row's `pos` becomes its own length. How far it is padded (`prefill_pad`):
- "bucket" (the default): to the next power of two from 16 (16, 32, 64, ..., capped at block_size), so a
  new prompt length compiles again only when it falls in a new bucket, and a short prompt is prefilled
  over few positions;
- "block": always to block_size, so one prefill graph serves every prompt length and the re-prefill
  past block_size. The sampler's interactive mode uses it: the context grows with every turn, and with
  buckets each new one (32, 64, ... tokens) stopped the conversation for another compilation (~10 s each
  on a 2-core CPU for the 0.86M-parameter recipe model, block_size 256, with a cold inductor cache).
  Padding to block_size costs a prefill over block_size positions per turn instead: a later turn of 100
  tokens takes under 0.1 s in all for that model (gpt/sample.py has the numbers). Prefilling only the
  tokens a turn adds, at an offset, would keep one shape too, but needs a chunked prefill with its own
  masking and cache bookkeeping, and each turn would still re-prefill the whole window once the context
  passes block_size.

Past block_size: as the eager decoder (gpt/generation/eager.py), keep the last block_size // 2 tokens and
prefill them again from position 0 (one more prefill of the same shape with "block"; of the
block_size // 2 bucket with "bucket"); rows of different lengths get there at different steps, and such a
row is prefilled alone into its slot (a batch-1 graph) while the step holds it.

The engine (gpt/generation/engine.py) runs `rows_step` (each slot with its own sampling settings) and
`prefill_logits` (one request into its slot; the engine samples it) through the same `Compiled` calls.

Cost. Compiling takes seconds to a minute, once per (batch size, prefill shape, sampling plan, weights)
in a process; `compile_log` records each call that compiled and how long it took (the sampler prints
it), and inductor keeps its generated code on disk, so a later process compiles faster. The state
buffers are reused from one generation to the next (`DecodeState.take`), as the compiled step is
specialized on them. Where compilation is unavailable (`compile_unavailable_reason`: no C++ compiler for
inductor on the CPU, MPS, Python without TorchDynamo) gpt/generation/api.py's `make_decoder` uses the
eager decoder and says why, once; where compiling fails, the decoder runs the same functions eagerly.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import time
import weakref
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ops import _warn_once
from ..runtime import autocast, resolve_compute_dtype
from .cache import DecodeState, PrefillView, StepView
from .eager import prompt_lengths
from .sampling import (SamplingConfig, SamplingPlan, choose_tokens, choose_tokens_rows, draw_exponential,
                       record_tokens, token_counts)

PREFILL_MIN = 16
PREFILL_PADS = ("bucket", "block")   # how far a prompt is padded for prefill (the module docstring)
RECOMPILE_LIMIT = 64   # graphs per compiled function: buckets x batch sizes x sampling plans


def prefill_bucket(length: int, block_size: int) -> int:
    """The padded length a prompt of `length` tokens is prefilled at: the next power of two >= 16,
    capped at block_size."""
    bucket = PREFILL_MIN
    while bucket < length:
        bucket *= 2
    return min(bucket, block_size)


def prefill_length(length: int, block_size: int, pad: str = "bucket") -> int:
    """The padded length a prompt of `length` tokens is prefilled at: its bucket (`prefill_bucket`), or
    block_size with pad="block"."""
    if pad not in PREFILL_PADS:
        raise ConfigError(f"prefill_pad must be one of {', '.join(PREFILL_PADS)}, got {pad!r}")
    return block_size if pad == "block" else prefill_bucket(length, block_size)


def _record(nxt, seen, counts, active=None) -> None:
    """record_tokens for the rows where active (B,) is True (every row when None)."""
    if active is None:
        record_tokens(nxt, seen, counts)
        return
    if seen is not None:
        seen.scatter_(1, nxt, seen.gather(1, nxt) | active[:, None])
    if counts is not None:
        counts.scatter_add_(1, nxt, active[:, None].to(counts.dtype))


def _prefill_logits(model, state: DecodeState, tokens, rows, last, device, dtype):
    with autocast(device, dtype):
        h = model.hidden_states(tokens, cache=PrefillView(state, rows))
        logits = model.lm_head(h[torch.arange(tokens.shape[0], device=tokens.device), last])
    if rows is None:
        state.pos.copy_(last + 1)
    else:
        state.pos.index_copy_(0, rows, last + 1)
    return logits


def prefill(model, state: DecodeState, tokens, rows, last, plan: SamplingPlan, params, noise, device, dtype):
    """Fill the cache of the slots `rows` ((m,) tensor; None: every slot, in order) from their prompts
    tokens (m, bucket), right-padded, row i's real part ending at index last[i]; sample the token after it
    for each. state.pos[rows] becomes last + 1."""
    logits = _prefill_logits(model, state, tokens, rows, last, device, dtype)
    seen, counts = state.seen, state.counts
    if rows is not None:
        seen = seen.index_select(0, rows) if seen is not None else None
        counts = counts.index_select(0, rows) if counts is not None else None
    nxt = choose_tokens(logits, plan, params, seen, counts, noise)
    record_tokens(nxt, seen, counts)
    if rows is not None:
        if seen is not None:
            state.seen.index_copy_(0, rows, seen)
        if counts is not None:
            state.counts.index_copy_(0, rows, counts)
    return nxt


def prefill_logits(model, state: DecodeState, tokens, rows, last, device, dtype):
    """`prefill` without the sampling: the logits (m, V) after each prompt (the engine samples them with
    each request's own settings)."""
    return _prefill_logits(model, state, tokens, rows, last, device, dtype)


def _step_logits(model, state: DecodeState, token, active, weights: int, device, dtype):
    if weights < 0:   # never: reading it makes the compiled step specialize on it
        raise ValueError(f"weights key must be >= 0, got {weights}")
    with autocast(device, dtype):
        h = model.hidden_states(token, cache=StepView(state, active))
        logits = model.lm_head(h[:, -1])
    state.pos.add_(active.to(state.pos.dtype))
    return logits


def decode_step(model, state: DecodeState, token, active, plan: SamplingPlan, params, noise, weights: int, device,
                dtype):
    """Put token (B, 1) of each active slot ((B,) bool) at its state.pos, sample the next one, advance its
    state.pos; the other slots' tokens are placeholders (their outputs meaningless, their state unchanged).
    `weights`: `weights_key(model)`."""
    logits = _step_logits(model, state, token, active, weights, device, dtype)
    nxt = choose_tokens(logits, plan, params, state.seen, state.counts, noise)
    _record(nxt, state.seen, state.counts, active)
    return nxt


def rows_step(model, state: DecodeState, token, active, plan: SamplingPlan, params, noise, weights: int, device,
              dtype):
    """`decode_step` with each slot's own sampling settings (`choose_tokens_rows`, params (B, ROW_PARAMS))."""
    logits = _step_logits(model, state, token, active, weights, device, dtype)
    nxt = choose_tokens_rows(logits, plan, params, state.seen, state.counts, noise)
    _record(nxt, state.seen, state.counts, active)
    return nxt


STEPS = (decode_step, rows_step)     # compiled with the step's options (`_compiled_fn`)


@dataclass
class CompileEvent:
    """A call of a compiled function that compiled it (first use of a batch size, prefill length or sampling
    plan, or new weights): what, and its seconds (compile + run)."""
    kind: str          # "prefill" or "step"
    batch: int
    length: int        # the padded prefill length (a bucket, or block_size); 1 for the step
    seconds: float


compile_log: list[CompileEvent] = []
_seen_keys: set = set()
_compiled: dict = {}


def _graphs_compiled() -> int:
    """How many graphs TorchDynamo has compiled in this process (it counts each compilation)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot build the decode step on `device`, or None."""
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {device.type}"
    try:
        import torch._dynamo as dynamo
        if not dynamo.is_dynamo_supported():
            return "TorchDynamo does not support this Python"
    except Exception as e:  # an exotic build without dynamo
        return f"TorchDynamo is unavailable ({type(e).__name__})"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        return "inductor needs a C++ compiler on the CPU and none is on PATH (install g++ or clang++)"
    return None


# How each function is compiled. The step is what decoding repeats, so it gets the expensive options:
# on CUDA a CUDA graph; on the CPU inductor's `freezing` (the weights become constants of the graph,
# prepacked) and `max_autotune` (its C++ GEMM templates for the one-row matmuls of decoding), measured
# 2-5x faster per token than the default on a 2-core AVX-512 CPU (docs/generation.md) for about three
# times the compile time. Freezing is read when dynamo traces, so it is set around each call of the step
# (`_STEP_CONFIG`), not passed as a compile option. Prefill runs once per prompt: default compilation.
STEP_MODE = {"cuda": "reduce-overhead"}
# (autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False: the autotuner's timing
# tables and its "Autotune Choices Stats" lines, which it writes straight to sys.stderr, are not printed.)
_STEP_CONFIG = {"cpu": dict(freezing=True, max_autotune=True, autotune_num_choices_displayed=0,
                            max_autotune_report_choices_stats=False)}


def _compiled_fn(fn, device: torch.device):
    key = (fn.__name__, device.type)
    if key not in _compiled:
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):   # the name changed in torch 2.6
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
        mode = STEP_MODE.get(device.type) if fn in STEPS else None
        _compiled[key] = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
    return _compiled[key]


@functools.cache
def _step_patch(device_type: str):
    """The inductor config patch for the step on this device type, built once: building one costs ~0.1 ms
    (most of a small model's CPU step), entering a built one ~0.01 ms."""
    settings = _STEP_CONFIG.get(device_type)
    if not settings:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config
    return inductor_config.patch(**{k: v for k, v in settings.items() if hasattr(inductor_config, k)})


def _step_config(device: torch.device, compiled: bool):
    """The inductor settings the compiled step is traced and compiled under (nothing for prefill)."""
    return _step_patch(device.type) if compiled else contextlib.nullcontext()


_weights_keys: dict[tuple, int] = {}


def weights_key(model) -> int:
    """A number for the weights `model` holds now: the same while the same tensors are unmodified, a new one
    after an in-place change (an optimizer step, load_state_dict: `_version`) or a replacement (a cast,
    quantize_int8). The frozen step holds a copy of the weights, so it takes this number as an argument it
    is specialized on: changed weights compile a new step instead of running stale ones."""
    sig = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    return _weights_keys.setdefault(sig, len(_weights_keys))


class Compiled:
    """Calls the functions of this module compiled for `device` (or eagerly: compile=False), with the
    bookkeeping: `compile_log` entries for calls that compiled, CUDA-graph step marks and output copies,
    the step's inductor settings, and a fall back to eager calls (said once) where compiling fails."""

    def __init__(self, device: torch.device, compile: bool = True):
        self.device, self.compile = device, compile
        self._fns = {}

    def _fn(self, fn):
        if not self.compile:
            return fn
        if fn not in self._fns:
            self._fns[fn] = _compiled_fn(fn, self.device)
        return self._fns[fn]

    def __call__(self, fn, kind: str, batch: int, length: int, key, *args, dtype=None):
        """fn(*args, device, dtype). kind, batch, length: what `compile_log` records; key: the rest of what
        the call is specialized on (weights, sampling plan, ...)."""
        key = (fn.__name__, batch, length, key)
        first = self.compile and key not in _seen_keys
        if self.device.type == "cuda" and self.compile:
            torch.compiler.cudagraph_mark_step_begin()
        graphs = _graphs_compiled()
        start = time.perf_counter()
        try:
            with _step_config(self.device, self.compile and fn in STEPS):
                out = self._fn(fn)(*args, self.device, dtype)
        except Exception as e:
            if not first:
                raise
            # Compilation itself failed (the eager functions are the same code): run them eagerly.
            _warn_once(f"compiling the decode step failed ({type(e).__name__}: {str(e).strip()[:200]}); "
                      f"decoding without compilation")
            self.compile = False
            return fn(*args, self.device, dtype)
        _seen_keys.add(key)
        if self.compile and _graphs_compiled() > graphs:   # this call compiled (or compiled again)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            compile_log.append(CompileEvent(kind, batch, length, time.perf_counter() - start))
        return out.clone() if self.device.type == "cuda" and self.compile else out   # the graph reuses its output


class CompiledDecoder:
    """The eager `Decoder`'s interface (`rows`, `batch`, `step()`, `keep(mask)`) on static shapes.

    idx (B, T): the prompts; with `lengths`, row b's prompt is idx[b, :lengths[b]] (right padding), each
    row then at its own length in the cache. compile=False runs the same functions eagerly (for tests: the
    compiled path must give their tokens). prefill_pad: "bucket" or "block", how far prompts are padded for
    prefill (the module docstring). The caller puts the model in eval mode and disables autograd.
    """

    def __init__(self, model, idx: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
                 dtype: torch.dtype | str | None = None, compile: bool = True, prefill_pad: str = "bucket",
                 lengths=None):
        prefill_length(1, 1, prefill_pad)        # an unknown value: ConfigError before any work
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.numel() == 0 or idx.shape[1] == 0:
            raise ValueError("generate needs a non-empty prompt (at least one token per row)")
        full = prompt_lengths(idx, lengths)
        self.model, self.generator = model, generator
        self.block = model.config.block_size
        self.keep_len = max(self.block // 2, 1)
        self.device = idx.device
        self.compute_dtype = resolve_compute_dtype(dtype, self.device)
        # The dtype k and v come out in: autocast's, or the weights' where there is no autocast.
        kv_dtype = self.compute_dtype if self.compute_dtype != torch.float32 else model.wte.weight.dtype
        vocab = model.config.vocab_size
        B = idx.shape[0]
        self.plan = SamplingPlan.of(sampling, vocab)
        self.params = SamplingPlan.params(sampling, self.device)
        seen = token_counts(idx, vocab, full) > 0 if self.plan.repetition else None
        self.kv_dtype = kv_dtype
        self.state = DecodeState.take(model, B, kv_dtype, seen, self.plan.counts)
        weakref.finalize(self, self.state.release)   # free for the next generation once this one is gone
        # Each row's window is ctx[b, :lens[b]] (as in the eager Decoder).
        self.lens = [min(n, self.block) for n in full]
        self.ctx = idx.new_zeros(B, self.block + 1)
        for b, (n, kept) in enumerate(zip(full, self.lens)):
            self.ctx[b, :kept] = idx[b, n - kept:n]
        self.fresh = [True] * B                    # rows whose cache does not hold their window
        self.going = [True] * B                    # rows still returned (a dropped row is held from then on)
        self.pending = idx.new_zeros(B, 1)         # the last sampled token of each row, not yet in the cache
        self.rows = torch.arange(B, device=self.device)   # original row of each active row
        self.active: torch.Tensor | None = None    # where the active rows are in the full batch (None: all)
        self.prefill_pad = prefill_pad
        self.weights: int | None = None
        self.calls = Compiled(self.device, compile)

    @property
    def compile(self) -> bool:
        return self.calls.compile

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    @property
    def window(self) -> torch.Tensor:
        """The context of each row, right-padded to the longest."""
        return self.ctx[:, :max(self.lens)]

    def _noise(self):
        if self.plan.greedy:
            return None
        return draw_exponential((self.ctx.shape[0], self.model.config.vocab_size), self.generator, self.device)

    def _prefill(self, rows: list[int] | None, noise):
        """Prefill the rows (None: every row) from their windows; their next tokens."""
        lens = self.lens if rows is None else [self.lens[b] for b in rows]
        length = prefill_length(max(lens), self.block, self.prefill_pad)
        # A fresh buffer, never a view of the window: the compiled prefill is specialized on the strides
        # (a batch-1 slice of the window keeps the window's row stride), which would compile it again.
        tokens = self.ctx.new_zeros(len(lens), length)
        tokens[:, :max(lens)] = self.ctx[:, :max(lens)] if rows is None else self.ctx[rows, :max(lens)]
        last = torch.tensor(lens, device=self.device) - 1
        index = None if rows is None else torch.tensor(rows, device=self.device)
        if index is not None and noise is not None:
            noise = noise.index_select(0, index)
        return self.calls(prefill, "prefill", len(lens), length, (self.weights, self.plan, self.kv_dtype, index is None),
                          self.model, self.state, tokens, index, last, self.plan, self.params, noise,
                          dtype=self.compute_dtype)

    def step(self) -> torch.Tensor:
        """Sample the next token (n, 1) of each of the n active rows (in the order of `rows`)."""
        if self.weights is None:
            self.weights = weights_key(self.model)
        B = self.ctx.shape[0]
        for b, n in enumerate(self.lens):
            if n > self.block and self.going[b]:   # full: restart from the most recent tokens
                self.ctx[b, :self.keep_len] = self.ctx[b, n - self.keep_len:n].clone()
                self.lens[b] = self.keep_len
                self.fresh[b] = True
        noise = self._noise()
        prefill_rows = [b for b in range(B) if self.fresh[b]]
        if len(prefill_rows) == B:       # the start, or rows of one length cropped together: one prefill
            nxt = self._prefill(None, noise)
        else:
            active = torch.tensor([not f and g for f, g in zip(self.fresh, self.going)], device=self.device)
            nxt = self.calls(decode_step, "step", B, 1, (self.weights, self.plan, self.kv_dtype),
                             self.model, self.state, self.pending, active, self.plan, self.params, noise, self.weights,
                             dtype=self.compute_dtype)
            for b in prefill_rows:       # rows cropped past block_size while the others decode
                nxt = nxt.index_copy(0, torch.tensor([b], device=self.device), self._prefill([b], noise))
        if min(self.lens) == max(self.lens) and all(self.going):
            self.ctx[:, self.lens[0]] = nxt[:, 0]
        else:
            going = [b for b in range(B) if self.going[b]]
            self.ctx[torch.tensor(going, device=self.device), torch.tensor([self.lens[b] for b in going],
                                                                           device=self.device)] = nxt[going, 0]
        self.lens = [n + 1 if g else n for n, g in zip(self.lens, self.going)]
        self.fresh = [False] * B
        self.pending = nxt
        return nxt if self.active is None else nxt.index_select(0, self.active)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the active rows where mask (n,) is True. The others stop being returned and are held in the
        step from then on (the batch shape is part of the compiled step)."""
        index = mask.nonzero().squeeze(1)
        if index.shape[0] == self.batch:
            return
        self.rows = self.rows[index]
        self.active = index if self.active is None else self.active[index]
        kept = set(self.active.tolist())
        self.going = [b in kept for b in range(self.ctx.shape[0])]


__all__ = ["CompiledDecoder", "Compiled", "CompileEvent", "PREFILL_PADS", "compile_log", "compile_unavailable_reason",
           "decode_step", "rows_step", "prefill", "prefill_logits", "prefill_bucket", "prefill_length",
           "weights_key"]
