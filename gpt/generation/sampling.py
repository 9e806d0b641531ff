"""Sampling as pure functions: logits (B, V) -> processed logits -> one token per row.

The steps, in order (`process_logits`, `sample_next`; `choose_tokens` runs them all for the decoders):

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
   sampling included, can run inside one compiled function (gpt/generation/compiled.py) and draw the
   same way.

`SamplingPlan` is the structure of a `SamplingConfig` (which steps run) without its values, which
`SamplingPlan.params` puts in a tensor: the compiled decoder specializes on the plan only.
`record_tokens` adds the sampled tokens to the penalty state (tokens seen, tokens generated).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError


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
def token_counts(ids: torch.Tensor, vocab_size: int, lengths=None) -> torch.Tensor:
    """(B, vocab_size) float counts of each token id in each row of ids (B, T); with `lengths` (B ints),
    of row b's first lengths[b] ids only (the rest is padding)."""
    counts = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    ones = torch.ones(ids.shape, device=ids.device)
    if lengths is not None:
        ones = ones * (torch.arange(ids.shape[1], device=ids.device) < torch.tensor(lengths, device=ids.device)[:, None])
    return counts.scatter_add_(1, ids, ones)


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


# -- a batch whose rows have their own settings (the engine, gpt/generation/engine.py) -------------
ROW_PARAMS = 7   # per row: temperature, top_p, min_p, the three penalties, top_k (0 = off)


def rows_plan(configs, vocab_size: int) -> SamplingPlan:
    """The plan of a batch of rows with their own `SamplingConfig`s: a step runs when any row uses it
    (greedy only when every row is), top_k the largest k of the rows (each row's own k is in
    `rows_params`)."""
    plans = [SamplingPlan.of(c, vocab_size) for c in configs]
    return SamplingPlan(greedy=all(p.greedy for p in plans), top_k=max((p.top_k for p in plans), default=0),
                        top_p=any(p.top_p for p in plans), min_p=any(p.min_p for p in plans),
                        repetition=any(p.repetition for p in plans), counts=any(p.counts for p in plans))


def rows_params(configs, vocab_size: int, device) -> torch.Tensor:
    """(B, ROW_PARAMS) float32: each row's values, a row whose setting is off holding the neutral value
    (top_p 1, min_p 0, penalties 1/0/0, top_k 0), so that it is computed as it would be alone."""
    rows = [SamplingPlan.params(c, "cpu").tolist() + [float(SamplingPlan.of(c, vocab_size).top_k)] for c in configs]
    return torch.tensor(rows, dtype=torch.float32).to(device)


def choose_tokens_rows(logits: torch.Tensor, plan: SamplingPlan, params: torch.Tensor, seen: torch.Tensor | None,
                       counts: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """`choose_tokens` with each row's own settings, params (B, ROW_PARAMS) from `rows_params` and `plan`
    from `rows_plan`: every row gets the token it would get alone with its settings and noise (a step
    that only some rows use leaves the others exactly as they are). Device work only."""
    logits = logits.float()
    if plan.repetition:
        logits = _repetition(logits, seen, params[:, 3:4])
    if plan.counts:
        logits = _frequency_presence(logits, counts, params[:, 4:5], params[:, 5:6])
    best = logits.argmax(dim=-1, keepdim=True)
    if plan.greedy:
        return best
    greedy = params[:, :1] == 0
    logits = logits / torch.where(greedy, 1.0, params[:, :1])
    if plan.top_k:
        k = params[:, 6:7].long()
        kth = torch.topk(logits, plan.top_k, dim=-1).values.gather(1, (k - 1).clamp(min=0))
        logits = logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    if plan.top_p:
        p = params[:, 1:2]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = ((probs.cumsum(dim=-1) - probs) >= p) & (p < 1.0)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if plan.min_p:
        logits = _min_p(logits, params[:, 2:3])
    return torch.where(greedy, best, race(torch.softmax(logits, dim=-1), noise))


def record_tokens(nxt: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None) -> None:
    """Add the sampled tokens nxt (B, 1) to the penalty state, in place: `seen` (B, V) bool, `counts` (B, V)."""
    if seen is not None:
        seen.scatter_(1, nxt, True)
    if counts is not None:
        counts.scatter_add_(1, nxt, torch.ones(nxt.shape, device=nxt.device))


__all__ = ["SamplingConfig", "SamplingPlan", "check_sampling_value", "token_counts", "apply_repetition_penalty",
           "apply_frequency_presence_penalty", "apply_top_k", "apply_top_p", "apply_min_p", "process_logits",
           "draw_exponential", "race", "sample_next", "choose_tokens", "record_tokens", "ROW_PARAMS", "rows_plan",
           "rows_params", "choose_tokens_rows"]
