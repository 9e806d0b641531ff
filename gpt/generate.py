"""Autoregressive generation: a preallocated KV cache and sampling as pure functions.

Sampling, one step: logits (B, V) -> processed logits -> one token per row. The steps, in order
(`process_logits`, `sample_next`):

1. repetition penalty (CTRL / Hugging Face): the logit of every token that occurs in the row's
   sequence so far, **prompt and generated tokens**, is divided by the penalty where positive and
   multiplied by it where negative (penalty > 1 discourages repeats, 1 = off). Each token is penalised
   once, however often it occurs.
2. frequency and presence penalties (OpenAI): logit -= frequency_penalty * count + presence_penalty *
   (count > 0), count being how often the token occurs among the **generated tokens only** (the prompt
   does not count). 0 = off; negative values encourage repeats.
3. temperature: 0 is greedy (argmax of the penalised logits; the filters below cannot change it),
   otherwise logits / temperature.
4. filters, each setting logits to -inf: top-k (the k largest), top-p (the nucleus), min-p (tokens
   whose probability is below min_p * the largest probability).
5. one draw from the softmax: argmax(probs / noise) with Exp(1) noise from the caller's
   `torch.Generator` (`race`; a CPU generator draws on the CPU, so a seed gives the same tokens on any
   device). Unlike torch.multinomial it never makes the host wait for the device, so the whole step,
   sampling included, can run inside one compiled function (gpt/decode.py) and draw the same way.

Ending a row early: `eot_id` (a row ends when it samples that token) and stop strings (checked on the
decoded text of each row; `generate_completions`). A finished row is dropped from the batch (its KV
cache rows, its context and its penalty counts are index-selected away), so later steps run on the
rows still going.

Rows of one batch share one KV cache position: there is no per-row position or padding mask, so a batch
holds prompts of one token length. `generate_completions` takes prompts of any lengths and runs one
batch per prompt length (the samples of one prompt always share a batch).

Past block_size: RoPE positions and the cache end at block_size, so when the cache is full we keep
the most recent `block_size // 2` tokens, re-prefill them from position 0 (one forward over
block_size/2 tokens) and continue one token at a time. Every generated token therefore sees at
least block_size/2 tokens of context, and the amortised cost is about two forward token-passes per
generated token instead of block_size when recomputing the whole window at every step.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .runtime import autocast, resolve_dtype


class KVCache:
    """Keys and values of every layer, (n_layer, B, n_kv_head, max_len, head_dim) each, preallocated.

    Sized by the KV heads, so GQA with n_kv_head = n_head / g needs 1/g of MHA's memory.
    `pos` is how many positions are filled (the same for every row); layers write at pos, the model
    advances pos once per forward.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.pos = max_len, 0

    @classmethod
    def for_model(cls, model, batch: int, dtype=None) -> "KVCache":
        c = model.config
        p = model.wte.weight
        return cls(c.n_layer, batch, c.n_kv_head, c.block_size, c.head_dim, device=p.device, dtype=dtype or p.dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1; return the filled cache (B, Hkv, pos+T, D)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the RoPE tables (block_size, D/2) for the next T positions."""
        end = self.pos + T
        if end > cos.shape[0]:
            raise ValueError(f"sequence of {end} tokens exceeds block_size={cos.shape[0]}; "
                             f"crop the input to the last {cos.shape[0]} tokens")
        return cos[self.pos:end], sin[self.pos:end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op) -> torch.Tensor:
        """Store the new k, v of `layer`, then causal attention of q over every filled position."""
        k, v = self.update(layer, k, v)
        return op.attention(q, k, v, causal=True)

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (a 1-D index tensor), in that order; the memory of the others
        is released."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


# -- sampling settings ---------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and math.isfinite(v)


# name -> (is the value valid, what a valid value is). None means "off" where it is allowed.
_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "temperature": (lambda v: _finite(v) and v >= 0, ">= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or (isinstance(v, numbers.Integral) and v >= 0), "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: v is None or (_finite(v) and 0 < v <= 1), "in (0, 1] (1 = off)"),
    "min_p": (lambda v: v is None or (_finite(v) and 0 <= v <= 1), "in [0, 1] (0 = off)"),
    "repetition_penalty": (lambda v: _finite(v) and v > 0, "> 0 (1 = off, above 1 discourages repeats)"),
    "frequency_penalty": (_finite, "a finite number (0 = off)"),
    "presence_penalty": (_finite, "a finite number (0 = off)"),
}


def check_sampling_value(name: str, value, label: str | None = None) -> None:
    """Raise a one-line ConfigError if `value` is not valid for the sampling setting `name`; `label`
    is how the caller names it (a CLI flag, an interactive command)."""
    ok, valid = _RULES[name]
    if not ok(value):
        raise ConfigError(f"{label or name} must be {valid}, got {value}")


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen; see the module docstring for the order the steps apply in.

    temperature: 0 = greedy. top_k: keep the k most likely tokens (None or 0 = off). top_p: nucleus mass
    (None or 1 = off). min_p: keep tokens with probability >= min_p * the top probability (None or 0 =
    off). repetition_penalty: CTRL-style, over the prompt and the generated tokens (1 = off).
    frequency_penalty, presence_penalty: OpenAI-style, over the generated tokens only (0 = off).
    Invalid values raise ConfigError.
    """

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        for name in _RULES:
            check_sampling_value(name, getattr(self, name))

    @property
    def uses_repetition(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_counts(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# -- logit processing: pure functions of the logits ----------------------------------------------
def token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, vocab_size) float counts of each token id in each row of ids (B, T)."""
    counts = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones(ids.shape, device=ids.device))


def _repetition(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    seen = seen if seen.dtype == torch.bool else seen > 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def _frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency_penalty, presence_penalty):
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)


def _top_p(logits: torch.Tensor, p) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already reach p; the top token is always kept.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: where `seen` (B, V; bool, or counts > 0) marks a token, its logit is
    divided by `penalty` if positive and multiplied by it if negative. `seen` should cover the prompt and
    the generated tokens (the Hugging Face convention; `generate` does so)."""
    if seen is None or penalty == 1.0:
        return logits
    check_sampling_value("repetition_penalty", penalty)
    return _repetition(logits, seen, penalty)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor | None,
                                     frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency_penalty * counts - presence_penalty * (counts > 0), counts
    (B, V) being how often each token was generated so far (the prompt does not count; `generate` does so)."""
    if counts is None or (frequency_penalty == 0.0 and presence_penalty == 0.0):
        return logits
    return _frequency_presence(logits, counts, frequency_penalty, presence_penalty)


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Logits outside the k largest of each row set to -inf (ties at the k-th value are kept)."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ConfigError(f"top_p must be in (0, 1], got {p}")
    return _top_p(logits, p)


def apply_min_p(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """min-p: logits of tokens whose probability is below min_p * (the row's largest probability) set to
    -inf. The most likely token is always kept; None or 0 = off."""
    if min_p is None or min_p <= 0.0:
        return logits
    check_sampling_value("min_p", min_p)
    return _min_p(logits, min_p)


def process_logits(logits: torch.Tensor, sampling: SamplingConfig, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """The penalties of `sampling` applied to logits (B, V), in float32: the repetition penalty over
    `seen` (tokens in the prompt or generated), then the frequency/presence penalties over `counts` (of
    generated tokens). Temperature and the filters are `sample_next`'s."""
    logits = logits.float()
    logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    return apply_frequency_presence_penalty(logits, counts, sampling.frequency_penalty, sampling.presence_penalty)


# -- drawing a token without waiting for the device ----------------------------------------------
def draw_exponential(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Exp(1) noise (float32, `shape`) for `race`, drawn with `generator` where the generator lives (a
    CPU generator draws on the CPU: the same seed gives the same noise whatever the model's device),
    then moved to `device` without the host waiting for it (pinned memory, non_blocking on CUDA)."""
    device = torch.device(device)
    where = generator.device if generator is not None else device
    noise = torch.empty(shape, dtype=torch.float32, device=where).exponential_(generator=generator)
    if noise.device != device:
        if device.type == "cuda":
            noise = noise.pin_memory().to(device, non_blocking=True)
        else:
            noise = noise.to(device)
    return noise


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token (B, 1) per row of probs (B, V), drawn as argmax(probs / noise) with noise ~ Exp(1): token i
    wins with probability probs_i (noise_i / probs_i ~ Exp(probs_i), and the smallest of independent
    exponentials is the i-th with probability probs_i / sum(probs)). No host sync, unlike multinomial."""
    # Exp(1) can be 0 (probability ~2^-24 per draw); 0 / 0 would be NaN, which argmax would pick.
    return (probs / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float = 0.8, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                min_p: float | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, V). temperature 0 is greedy (argmax); otherwise the logits
    are divided by the temperature, filtered by top-k, top-p and min-p, and one token is drawn by `race`
    with Exp(1) noise (drawn with `generator` unless given). The same steps as the decoders (`choose_tokens`)."""
    s = SamplingConfig(temperature, top_k, top_p, min_p)      # invalid values: ConfigError
    plan = SamplingPlan.of(s, logits.size(-1))
    if noise is None and not plan.greedy:
        noise = draw_exponential(logits.shape, generator, logits.device)
    return choose_tokens(logits, plan, SamplingPlan.params(s, logits.device), None, None, noise)


@dataclass(frozen=True)
class SamplingPlan:
    """Which sampling steps run: the structure of a SamplingConfig without its values. Compiled decoding
    specializes on the plan and takes the values as a tensor (`SamplingPlan.params`), so changing a
    temperature does not recompile, while turning top-p on does."""

    greedy: bool
    top_k: int            # 0 = off
    top_p: bool
    min_p: bool
    repetition: bool
    counts: bool

    @classmethod
    def of(cls, s: SamplingConfig, vocab_size: int) -> "SamplingPlan":
        top_k = s.top_k if s.top_k and s.top_k < vocab_size else 0
        return cls(greedy=s.temperature == 0, top_k=top_k, top_p=s.top_p is not None and s.top_p < 1.0,
                   min_p=bool(s.min_p), repetition=s.uses_repetition, counts=s.uses_counts)

    @staticmethod
    def params(s: SamplingConfig, device) -> torch.Tensor:
        """The values, float32 on `device`: temperature, top_p, min_p and the three penalties."""
        return torch.tensor([s.temperature, s.top_p or 1.0, s.min_p or 0.0, s.repetition_penalty,
                             s.frequency_penalty, s.presence_penalty], dtype=torch.float32, device=device)


def choose_tokens(logits: torch.Tensor, plan: SamplingPlan, params: torch.Tensor, seen: torch.Tensor | None,
                  counts: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """`process_logits` then `sample_next`, with the values in a tensor (`SamplingPlan.params`) and the
    noise drawn beforehand: device work only, so it can run inside a compiled decode step. The eager and
    the compiled decoders both choose with it, so a seed gives the same tokens on either (given the same
    logits: in bf16 the compiled step rounds differently)."""
    logits = logits.float()
    if plan.repetition:
        logits = _repetition(logits, seen, params[3])
    if plan.counts:
        logits = _frequency_presence(logits, counts, params[4], params[5])
    if plan.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / params[0]
    if plan.top_k:
        logits = apply_top_k(logits, plan.top_k)
    if plan.top_p:
        logits = _top_p(logits, params[1])
    if plan.min_p:
        logits = _min_p(logits, params[2])
    return race(torch.softmax(logits, dim=-1), noise)


def _resolve_dtype(dtype, device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return resolve_dtype(dtype, device)
    return dtype


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def record_tokens(nxt: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None) -> None:
    """Add the sampled tokens nxt (B, 1) to the penalty state, in place: `seen` (B, V) bool, `counts` (B, V)."""
    if seen is not None:
        seen.scatter_(1, nxt, True)
    if counts is not None:
        counts.scatter_add_(1, nxt, torch.ones(nxt.shape, device=nxt.device))


# -- the decoding loop ---------------------------------------------------------------------------
class Decoder:
    """The state of one batch being decoded: the context window, the KV cache, the penalty counts and
    which of the original rows are still going. `step()` samples one token for every active row;
    `keep(mask)` drops the rows where mask is False, so later steps run on fewer rows.

    All rows of idx (B, T) share one length (one cache position). The caller puts the model in eval mode.
    """

    def __init__(self, model, idx: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
                 use_cache: bool = True, dtype: torch.dtype | str | None = None):
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.numel() == 0 or idx.shape[1] == 0:
            raise ValueError("generate needs a non-empty prompt (at least one token per row)")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.block = model.config.block_size
        self.keep_len = max(self.block // 2, 1)
        self.device = idx.device
        self.compute_dtype = _resolve_dtype(dtype, self.device)
        vocab = model.config.vocab_size
        self.window = idx[:, -self.block:]       # the tokens the model currently conditions on
        self.pending = self.window               # tokens not yet in the cache
        self.cache = KVCache.for_model(model, idx.shape[0]) if use_cache else None
        self.rows = torch.arange(idx.shape[0], device=self.device)   # original row of each active row
        # Penalty state, only when used: tokens seen in prompt + generated; counts of generated tokens.
        self.seen = token_counts(idx, vocab) > 0 if sampling.uses_repetition else None
        self.counts = torch.zeros(idx.shape[0], vocab, device=self.device) if sampling.uses_counts else None
        self.plan = SamplingPlan.of(sampling, vocab)
        self.params = SamplingPlan.params(sampling, self.device)

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    def step(self) -> torch.Tensor:
        """Sample the next token (n, 1) of each of the n active rows (in the order of `rows`)."""
        if self.window.shape[1] > self.block:    # full: restart from the most recent tokens
            self.window = self.window[:, -self.keep_len:]
            self.pending = self.window
            if self.cache is not None:
                self.cache.reset()
        # autocast per step, not around the loop: a context left open across a caller's `yield` would
        # leak into the caller's code between tokens.
        with autocast(self.device, self.compute_dtype):
            if self.cache is not None:
                h = self.model.hidden_states(self.pending, cache=self.cache)
            else:
                h = self.model.hidden_states(self.window)
            logits = self.model.lm_head(h[:, -1, :])
        noise = None if self.plan.greedy else draw_exponential(logits.shape, self.generator, self.device)
        nxt = choose_tokens(logits, self.plan, self.params, self.seen, self.counts, noise)
        self.window = torch.cat((self.window, nxt), dim=1)
        self.pending = nxt
        record_tokens(nxt, self.seen, self.counts)
        return nxt

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the active rows where mask (n,) is True, drop the others (their compute stops)."""
        index = mask.nonzero().squeeze(1)
        if index.shape[0] == self.batch:
            return
        self.rows = self.rows[index]
        self.window = self.window[index]
        self.pending = self.pending[index]
        if self.cache is not None:
            self.cache.select_rows(index)
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]


@torch.no_grad()
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    dtype: torch.dtype | str | None = None, *, min_p: float | None = None,
                    repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                    presence_penalty: float = 0.0, eot_id: int | None = None,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield each new token (B, 1) as it is sampled. Prompts longer than block_size are cropped to
    their last block_size tokens (the repetition penalty still counts the whole prompt). use_cache=False
    recomputes the window at every step (the slow reference the cached path is tested against; it
    follows the same window schedule). Sampling settings: `SamplingConfig`.

    eot_id: a row that samples this token is finished: it is dropped from the batch (no more compute) and
    its later entries are eot_id; the stream ends early once every row is finished. None (the default)
    never ends early.

    compile: run prefill and each step as compiled static-shape functions (gpt/decode.py): the same tokens
    for the same seed up to rounding (identical in fp32; bf16 rounds differently), much faster per token
    after a one-time compilation; falls back to the eager path (with one line saying why) where
    compilation is unavailable."""
    from .decode import make_decoder
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                              presence_penalty)
    with _eval_mode(model):
        dec = make_decoder(model, idx, sampling, generator, use_cache, dtype, compile)
        B = dec.batch
        for _ in range(max_new_tokens):
            rows = dec.rows
            nxt = dec.step()
            if eot_id is None:
                yield nxt
                continue
            if dec.batch == B:
                yield nxt
            else:
                out = torch.full((B, 1), eot_id, dtype=nxt.dtype, device=nxt.device)
                out[rows] = nxt
                yield out
            going = nxt[:, 0] != eot_id
            if not bool(going.all()):
                if not bool(going.any()):
                    return
                dec.keep(going)


def generate(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx (B, T) continued by max_new_tokens sampled tokens: (B, T + max_new_tokens). With eot_id, fewer
    once every row has sampled eot_id; rows that finished earlier are padded with eot_id. kwargs: those
    of `generate_stream`."""
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, *new], dim=1) if new else idx


# -- many prompts, several samples each, stop strings --------------------------------------------
@dataclass
class Completion:
    """One generated continuation.

    ids: the generated tokens, without the end-of-text token; after a stop string, the tokens wholly
        before it. text: the decoded continuation, cut just before the stop string (None without a
        tokenizer). finish_reason: "eot" (sampled the end-of-text token), "stop" (produced a stop
        string) or "length" (max_new_tokens reached).
    """

    prompt_index: int
    sample_index: int
    ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"


class StopStrings:
    """Finds the first of several stop strings in the decoded text of a token list."""

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]):
        self.stops, self.decode = tuple(stops), decode
        # A stop string of c characters is at most 4c UTF-8 bytes and every token is at least one byte,
        # so a stop string completed by the newest token lies within the last 4c + 2 tokens.
        self.tail = 4 * max((len(s) for s in self.stops), default=0) + 4

    def find(self, ids: list[int]) -> tuple[int, str] | None:
        """(where the first stop string starts in decode(ids), that text) or None."""
        if not self.stops or not ids:
            return None
        tail = self.decode(ids[-self.tail:])
        if not any(s in tail for s in self.stops):
            return None
        text = self.decode(ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (min(hits), text) if hits else None

    def ids_before(self, ids: list[int], text: str, cut: int) -> list[int]:
        """The longest prefix of ids whose text lies wholly before the cut."""
        before = text[:cut]
        k = len(ids)
        while k > 0 and not before.startswith(self.decode(ids[:k])):
            k -= 1
        return ids[:k]


def _check_stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")
    return stop


@torch.no_grad()
def generate_completions(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, num_samples: int = 1,
                         tokenizer=None, stop: Sequence[str] | str | None = None, eot_id: int | None | str = "auto",
                         generator: torch.Generator | None = None, use_cache: bool = True,
                         dtype: torch.dtype | str | None = None, compile: bool = False,
                         on_token: Callable[[int, int], None] | None = None,
                         on_finish: Callable[[int, Completion], None] | None = None,
                         **sampling) -> list[Completion]:
    """num_samples continuations of each prompt (lists of token ids), generated in batches, returned in
    order (prompt 0's samples, then prompt 1's, ...).

    Batching: rows of a batch share one cache position, so the rows of prompts of one token length form
    one batch (all samples of a prompt, and every other prompt of that length); lengths run one after
    the other, in order of first appearance. A row that finishes (eot_id, a stop string) is dropped from
    its batch at once.

    tokenizer: decodes the text (`Completion.text`) and is needed for stop strings. stop: strings that
    end a row, searched in the decoded generated text (not the prompt); the text is cut before the
    first. eot_id: the end-of-text token ("auto": the tokenizer's, if it has one; None: never stop on a
    token). on_token(i, id): each generated token of completion i as it is sampled (not the end-of-text
    token, nor the token that completes a stop string); on_finish(i, completion): each completion when
    it ends. compile: as in `generate_stream`. sampling: the fields of `SamplingConfig` (temperature,
    top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty).
    """
    from .decode import make_decoder
    cfg = SamplingConfig(**sampling)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be an integer >= 1, got {num_samples}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise ConfigError("generate_completions needs at least one prompt")
    if any(not p for p in prompts):
        raise ConfigError("every prompt needs at least one token (start an empty one with the end-of-text or "
                          "a newline token)")
    stops = _check_stops(stop)
    if stops and tokenizer is None:
        raise ConfigError("stop strings need the tokenizer to decode the text: pass tokenizer=")
    if eot_id == "auto":
        eot_id = getattr(tokenizer, "eot_id", None)
    decode = tokenizer.decode if tokenizer is not None else None
    matcher = StopStrings(stops, decode) if stops else None
    device = model.wte.weight.device

    slots = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    results: list[Completion] = [Completion(p, s) for p, s in slots]
    groups: dict[int, list[int]] = {}
    for i, (p, _) in enumerate(slots):
        groups.setdefault(len(prompts[p]), []).append(i)

    def finish(i: int, reason: str, ids: list[int], text: str | None = None) -> None:
        c = results[i]
        c.ids, c.finish_reason = ids, reason
        c.text = text if text is not None else (decode(ids) if decode is not None else None)
        if on_finish is not None:
            on_finish(i, c)

    with _eval_mode(model):
        for members in groups.values():
            idx = torch.tensor([prompts[slots[i][0]] for i in members], dtype=torch.long, device=device)
            dec = make_decoder(model, idx, cfg, generator, use_cache, dtype, compile)
            active = list(members)               # the completion index of each decoder row
            ids: dict[int, list[int]] = {i: [] for i in members}
            for _ in range(max_new_tokens):
                tokens = dec.step()[:, 0].tolist()
                going = []
                for i, t in zip(active, tokens):
                    if eot_id is not None and t == eot_id:
                        finish(i, "eot", ids[i])
                        going.append(False)
                        continue
                    ids[i].append(t)
                    hit = matcher.find(ids[i]) if matcher is not None else None
                    if hit is not None:
                        cut, text = hit
                        finish(i, "stop", matcher.ids_before(ids[i], text, cut), text[:cut])
                        going.append(False)
                        continue
                    if on_token is not None:
                        on_token(i, t)
                    going.append(True)
                if not all(going):
                    active = [i for i, g in zip(active, going) if g]
                    if not active:
                        break
                    dec.keep(torch.tensor(going, device=device))
            for i in active:
                finish(i, "length", ids[i])
    return results


__all__ = ["KVCache", "SamplingConfig", "Decoder", "Completion", "StopStrings", "check_sampling_value",
           "token_counts", "apply_repetition_penalty", "apply_frequency_presence_penalty", "apply_top_k",
           "apply_top_p", "apply_min_p", "process_logits", "sample_next", "draw_exponential", "race", "SamplingPlan",
           "choose_tokens", "record_tokens", "generate_stream", "generate",
           "generate_completions"]
