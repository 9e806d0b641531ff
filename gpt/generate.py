"""Autoregressive generation: a preallocated KV cache and sampling as pure functions.

Past block_size: RoPE positions and the cache end at block_size, so when the cache is full we keep
the most recent `block_size // 2` tokens, re-prefill them from position 0 (one forward over
block_size/2 tokens) and continue one token at a time. Every generated token therefore sees at
least block_size/2 tokens of context, and the amortised cost is about two forward token-passes per
generated token instead of block_size when recomputing the whole window at every step.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .runtime import autocast, resolve_dtype


class KVCache:
    """Keys and values of every layer, (n_layer, B, n_kv_head, max_len, head_dim) each, preallocated.

    Sized by the KV heads, so GQA with n_kv_head = n_head / g needs 1/g of MHA's memory.
    `pos` is how many positions are filled; layers write at pos, the model advances pos once per forward.
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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions pos..pos+T-1; return the filled cache (B, Hkv, pos+T, D)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


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
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens ranked above it already reach p; the top token is always kept.
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 0.8, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, V). temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator draws on the CPU: same seed, same tokens on any device.
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def _resolve_dtype(dtype, device) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return resolve_dtype(dtype, device)
    return dtype


@torch.no_grad()
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    dtype: torch.dtype | str | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token (B, 1) as it is sampled. Prompts longer than block_size are cropped to
    their last block_size tokens. use_cache=False recomputes the window at every step (the slow
    reference the cached path is tested against; it follows the same window schedule)."""
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.numel() == 0 or idx.shape[1] == 0:
        raise ValueError("generate needs a non-empty prompt (at least one token per row)")
    block = model.config.block_size
    keep = max(block // 2, 1)
    device = idx.device
    compute_dtype = _resolve_dtype(dtype, device)
    was_training = model.training
    model.eval()
    try:
        window = idx[:, -block:]                 # the tokens the model currently conditions on
        cache = KVCache.for_model(model, idx.shape[0]) if use_cache else None
        pending = window                         # tokens not yet in the cache
        for _ in range(max_new_tokens):
            if window.shape[1] > block:          # full: restart from the most recent tokens
                window = window[:, -keep:]
                pending = window
                if cache is not None:
                    cache.reset()
            # autocast per step, not around the loop: a context left open across `yield` would
            # leak into the caller's code between tokens.
            with autocast(device, compute_dtype):
                h = model.hidden_states(pending, cache=cache) if cache is not None else model.hidden_states(window)
                logits = model.lm_head(h[:, -1, :])
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            window = torch.cat((window, nxt), dim=1)
            pending = nxt
            yield nxt
    finally:
        model.train(was_training)


def generate(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """idx (B, T) continued by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, *new], dim=1) if new else idx


__all__ = ["KVCache", "apply_top_k", "apply_top_p", "sample_next", "generate_stream", "generate"]
