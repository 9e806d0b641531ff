"""The eager decoder: one batch decoded token by token on the growing KV cache (`KVCache`).

Each `step()` runs the model on the tokens not yet in the cache (the prompt at first, then the last
sampled token) and chooses the next token of every row with `choose_tokens` (gpt/generation/sampling.py),
the function the compiled decoder's step runs too. A finished row is dropped from the batch (`keep`: its
KV cache rows, its context and its penalty counts are index-selected away), so later steps run on the
rows still going. Rows of one batch share one cache position: there is no per-row position or padding
mask, so a batch holds prompts of one token length.

Past block_size: RoPE positions and the cache end at block_size, so when the cache is full we keep
the most recent `block_size // 2` tokens, re-prefill them from position 0 (one forward over
block_size/2 tokens) and continue one token at a time. Every generated token therefore sees at
least block_size/2 tokens of context, and the amortised cost is about two forward token-passes per
generated token instead of block_size when recomputing the whole window at every step.
`use_cache=False` recomputes the window at every step instead (the slow reference), on the same window
schedule.
"""
from __future__ import annotations

import torch

from ..runtime import autocast, resolve_compute_dtype
from .cache import KVCache
from .sampling import SamplingConfig, SamplingPlan, choose_tokens, draw_exponential, record_tokens, token_counts


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
        self.compute_dtype = resolve_compute_dtype(dtype, self.device)
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


__all__ = ["Decoder"]
