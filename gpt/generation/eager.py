"""The eager decoder: one batch decoded token by token on the growing KV cache (`KVCache`).

Each `step()` runs the model on the tokens not yet in the cache (the prompt at first, then the last
sampled token) and chooses the next token of every row with `choose_tokens` (gpt/generation/sampling.py),
the function the compiled decoder's step runs too. A finished row is dropped from the batch (`keep`: its
KV cache rows, its context and its penalty counts are index-selected away), so later steps run on the
rows still going.

Per-row positions. The rows of a batch may hold prompts of different lengths (`lengths`: row b's prompt is
idx[b, :lengths[b]], the rest padding). Prefill runs the prompts right-padded to the longest, from position
0: causal attention keeps every real token from the padding after it, so it needs no mask, and each row's
cache length becomes its real length. From then on every row writes its next token at its own position,
with RoPE at that position, and attends over its own keys only (`ops.decode_attention` with kv_len per
row; the padding's keys lie past the row's length). Rows of one length take the single-position path
(no mask, no gather), as before.

Past block_size: RoPE positions and the cache end at block_size, so when a row's cache is full we keep
its most recent `block_size // 2` tokens, re-prefill them from position 0 (one forward over block_size/2
tokens) and continue one token at a time. Every generated token therefore sees at least block_size/2
tokens of context, and the amortised cost is about two forward token-passes per generated token instead
of block_size when recomputing the whole window at every step. Rows reach block_size at their own steps:
a step in which some rows re-prefill runs those rows' prefill, then one decode forward for the others in
which the re-prefilled rows are held (`KVCache.hold`), so every row still gets one token per step and
each row follows the schedule it would follow alone. `use_cache=False` recomputes the window at every
step instead (the slow reference), on the same window schedule.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..runtime import autocast, resolve_compute_dtype
from .cache import KVCache
from .sampling import SamplingConfig, SamplingPlan, choose_tokens, draw_exponential, record_tokens, token_counts


def prompt_lengths(idx: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None) -> list[int]:
    """The real length of each row of idx (B, T): `lengths`, checked, or T for every row."""
    B, T = idx.shape
    if lengths is None:
        return [T] * B
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lengths) != B or any(not 1 <= n <= T for n in lengths):
        raise ValueError(f"lengths must give each of the {B} rows a length in 1..{T} (the prompt is "
                         f"idx[b, :lengths[b]]), got {lengths}")
    return lengths


class Decoder:
    """The state of one batch being decoded: each row's context window, the KV cache, the penalty counts
    and which of the original rows are still going. `step()` samples one token for every active row;
    `keep(mask)` drops the rows where mask is False, so later steps run on fewer rows.

    idx (B, T): the prompts; with `lengths`, row b's prompt is idx[b, :lengths[b]] (right padding, any
    token ids), else every row is T tokens. The caller puts the model in eval mode.
    """

    def __init__(self, model, idx: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
                 use_cache: bool = True, dtype: torch.dtype | str | None = None,
                 lengths: Sequence[int] | torch.Tensor | None = None):
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        if idx.numel() == 0 or idx.shape[1] == 0:
            raise ValueError("generate needs a non-empty prompt (at least one token per row)")
        full = prompt_lengths(idx, lengths)
        self.model, self.sampling, self.generator = model, sampling, generator
        self.block = model.config.block_size
        self.keep_len = max(self.block // 2, 1)
        self.device = idx.device
        self.compute_dtype = resolve_compute_dtype(dtype, self.device)
        vocab = model.config.vocab_size
        B = idx.shape[0]
        # Each row's window (the tokens the model conditions on) is ctx[b, :lens[b]]: its prompt cropped to
        # the last block_size tokens, then the sampled ones; at most block_size + 1 (then it is cropped).
        self.lens = [min(n, self.block) for n in full]
        self.ctx = idx.new_zeros(B, self.block + 1)
        for b, (n, kept) in enumerate(zip(full, self.lens)):
            self.ctx[b, :kept] = idx[b, n - kept:n]
        self.fresh = [True] * B                  # rows whose cache does not hold their window (prefill them)
        self.pending: torch.Tensor | None = None   # the last sampled token of each row, not yet in the cache
        self.cache = KVCache.for_model(model, B) if use_cache else None
        self.rows = torch.arange(B, device=self.device)   # original row of each active row
        # Penalty state, only when used: tokens seen in prompt + generated; counts of generated tokens.
        self.seen = token_counts(idx, vocab, full) > 0 if sampling.uses_repetition else None
        self.counts = torch.zeros(B, vocab, device=self.device) if sampling.uses_counts else None
        self.plan = SamplingPlan.of(sampling, vocab)
        self.params = SamplingPlan.params(sampling, self.device)

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    @property
    def window(self) -> torch.Tensor:
        """The context of each row, right-padded to the longest (rows of one length: exactly the window)."""
        return self.ctx[:, :max(self.lens)]

    def _last(self, h: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """The hidden state (n, C) at each row's last real position of h (n, T, C)."""
        if min(lens) == max(lens) == h.shape[1]:
            return h[:, -1, :]
        return h[torch.arange(h.shape[0], device=h.device), torch.tensor(lens, device=h.device) - 1]

    def _logits(self) -> torch.Tensor:
        n = self.batch
        if self.cache is None:
            return self.model.lm_head(self._last(self.model.hidden_states(self.window), self.lens))
        prefill = [b for b in range(n) if self.fresh[b]]
        decode = [b for b in range(n) if not self.fresh[b]]
        if not decode:      # every row (the start; or rows of one length, cropped together): one prefill
            h = self.model.hidden_states(self.window, cache=self.cache.prefill(None, self.lens))
            return self.model.lm_head(self._last(h, self.lens))
        h = self.model.hidden_states(self.pending, cache=self._hold(prefill))
        logits = self.model.lm_head(h[:, -1, :])
        if prefill:         # rows cropped past block_size while the others decode
            lens = [self.lens[b] for b in prefill]
            index = torch.tensor(prefill, device=self.device)
            h = self.model.hidden_states(self.ctx[index, :max(lens)], cache=self.cache.prefill(prefill, lens))
            logits = logits.index_copy(0, index, self.model.lm_head(self._last(h, lens)).to(logits.dtype))
        return logits

    def _hold(self, rows: list[int]) -> KVCache:
        self.cache.hold(rows)
        return self.cache

    def step(self) -> torch.Tensor:
        """Sample the next token (n, 1) of each of the n active rows (in the order of `rows`)."""
        for b, n in enumerate(self.lens):
            if n > self.block:                   # full: restart from the most recent tokens
                self.ctx[b, :self.keep_len] = self.ctx[b, n - self.keep_len:n].clone()
                self.lens[b] = self.keep_len
                self.fresh[b] = True
        # autocast per step, not around the loop: a context left open across a caller's `yield` would
        # leak into the caller's code between tokens.
        with autocast(self.device, self.compute_dtype):
            logits = self._logits()
        noise = None if self.plan.greedy else draw_exponential(logits.shape, self.generator, self.device)
        nxt = choose_tokens(logits, self.plan, self.params, self.seen, self.counts, noise)
        if min(self.lens) == max(self.lens):
            self.ctx[:, self.lens[0]] = nxt[:, 0]
        else:
            self.ctx[torch.arange(self.batch, device=self.device), torch.tensor(self.lens, device=self.device)] = nxt[:, 0]
        self.lens = [n + 1 for n in self.lens]
        self.fresh = [self.cache is None] * self.batch
        self.pending = nxt
        record_tokens(nxt, self.seen, self.counts)
        return nxt

    def keep(self, mask: torch.Tensor) -> None:
        """Keep the active rows where mask (n,) is True, drop the others (their compute stops)."""
        index = mask.nonzero().squeeze(1)
        if index.shape[0] == self.batch:
            return
        kept = index.tolist()
        self.rows = self.rows[index]
        self.ctx = self.ctx[index]
        self.lens = [self.lens[i] for i in kept]
        self.fresh = [self.fresh[i] for i in kept]
        if self.pending is not None:
            self.pending = self.pending[index]
        if self.cache is not None:
            self.cache.select_rows(index)
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]


__all__ = ["Decoder", "prompt_lengths"]
