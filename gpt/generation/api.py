"""Generation as the library offers it: choose a decoder, run it, end rows early, batch many prompts.

`make_decoder` picks the decoder: the compiled static-shape one (gpt/generation/compiled.py) when asked
for and available, else the eager one (gpt/generation/eager.py). `generate_stream` yields each new token
of a batch, `generate` returns the whole sequences (`GPT.generate` calls it), `generate_completions`
continues many prompts, several samples each, with stop strings.

Ending a row early: `eot_id` (a row ends when it samples that token) and stop strings (checked on the
decoded text of each row; `generate_completions`, `StopStrings`). The eager decoder drops a finished row
from the batch (its KV cache rows, its context and its penalty counts are index-selected away), so later
steps run on the rows still going; the compiled one keeps its slot in the batch (the batch is part of its
static shapes), held from then on, and stops returning its tokens.

Each row of a batch has its own length in the KV cache (gpt/generation/cache.py), so a batch holds prompts
of any lengths: `generate_completions` runs its rows batch_size at a time, in order, whatever their
lengths.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..ops import _warn_once
from .compiled import CompiledDecoder, compile_unavailable_reason, prefill_length
from .eager import Decoder
from .sampling import SamplingConfig

DEFAULT_BATCH_SIZE = 64   # rows of generate_completions decoded together (each holds a KV cache of block_size)


def make_decoder(model, idx: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
                 use_cache: bool = True, dtype: torch.dtype | str | None = None, compile: bool = False, *,
                 prefill_pad: str = "bucket", lengths=None):
    """The compiled decoder when `compile` (and use_cache) and it is available on idx's device, else the
    eager `Decoder` (saying why, once, when compile was asked for). prefill_pad: how far the compiled
    decoder pads prompts, "bucket" or "block" (gpt/generation/compiled.py). lengths: each row's prompt
    length (row b's prompt is idx[b, :lengths[b]], right-padded); None: every row is idx.shape[1] tokens."""
    prefill_length(1, 1, prefill_pad)        # an unknown value: ConfigError, whichever decoder runs
    if compile and use_cache:
        reason = compile_unavailable_reason(idx.device)
        if reason is None:
            return CompiledDecoder(model, idx, sampling, generator, dtype, prefill_pad=prefill_pad, lengths=lengths)
        _warn_once(f"decoding without compilation: {reason}")
    return Decoder(model, idx, sampling, generator, use_cache, dtype, lengths=lengths)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    dtype: torch.dtype | str | None = None, *, min_p: float | None = None,
                    repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                    presence_penalty: float = 0.0, eot_id: int | None = None,
                    compile: bool = False, prefill_pad: str = "bucket") -> Iterator[torch.Tensor]:
    """Yield each new token (B, 1) as it is sampled. Prompts longer than block_size are cropped to
    their last block_size tokens (the repetition penalty still counts the whole prompt). use_cache=False
    recomputes the window at every step (the slow reference the cached path is tested against; it
    follows the same window schedule). Sampling settings: `SamplingConfig`.

    eot_id: a row that samples this token is finished: it is dropped from the batch (no more compute) and
    its later entries are eot_id; the stream ends early once every row is finished. None (the default)
    never ends early.

    compile: run prefill and each step as compiled static-shape functions (gpt/generation/compiled.py): the
    same tokens for the same seed up to rounding (identical in fp32; bf16 rounds differently), much faster
    per token after a one-time compilation; falls back to the eager path (with one line saying why) where
    compilation is unavailable. prefill_pad: "bucket" (the default) compiles prefill once per prompt-length
    bucket, "block" once for every length (prompts padded to block_size), as `make_decoder`."""
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
                              presence_penalty)
    with _eval_mode(model):
        dec = make_decoder(model, idx, sampling, generator, use_cache, dtype, compile, prefill_pad=prefill_pad)
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


def held_back(text: str, stops) -> int:
    """How many characters at the end of text could be the start of a stop string (not shown yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


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
                         prefill_pad: str = "bucket", on_token: Callable[[int, int], None] | None = None,
                         on_finish: Callable[[int, Completion], None] | None = None,
                         batch_size: int = DEFAULT_BATCH_SIZE, **sampling) -> list[Completion]:
    """num_samples continuations of each prompt (lists of token ids), generated in batches, returned in
    order (prompt 0's samples, then prompt 1's, ...).

    Batching: every prompt x sample is a row, and the rows go in order, batch_size at a time, whatever
    their prompts' lengths (each row of a batch has its own position in the KV cache). A row that finishes
    (eot_id, a stop string) is dropped from its batch at once.

    tokenizer: decodes the text (`Completion.text`) and is needed for stop strings. stop: strings that
    end a row, searched in the decoded generated text (not the prompt); the text is cut before the
    first. eot_id: the end-of-text token ("auto": the tokenizer's, if it has one; None: never stop on a
    token). on_token(i, id): each generated token of completion i as it is sampled (not the end-of-text
    token, nor the token that completes a stop string); on_finish(i, completion): each completion when
    it ends. compile, prefill_pad: as in `generate_stream`. sampling: the fields of `SamplingConfig`
    (temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty).
    """
    cfg = SamplingConfig(**sampling)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be an integer >= 1, got {num_samples}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1 (rows generated together), got {batch_size}")
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

    def finish(i: int, reason: str, ids: list[int], text: str | None = None) -> None:
        c = results[i]
        c.ids, c.finish_reason = ids, reason
        c.text = text if text is not None else (decode(ids) if decode is not None else None)
        if on_finish is not None:
            on_finish(i, c)

    with _eval_mode(model):
        for first in range(0, len(slots), batch_size):
            members = list(range(first, min(first + batch_size, len(slots))))
            rows = [prompts[slots[i][0]] for i in members]
            lengths = [len(r) for r in rows]
            idx = torch.zeros(len(rows), max(lengths), dtype=torch.long)
            for b, r in enumerate(rows):
                idx[b, :len(r)] = torch.tensor(r)
            dec = make_decoder(model, idx.to(device), cfg, generator, use_cache, dtype, compile,
                               prefill_pad=prefill_pad, lengths=lengths)
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


__all__ = ["Completion", "StopStrings", "held_back", "make_decoder", "generate_stream", "generate", "generate_completions"]
